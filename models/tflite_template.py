"""Write the models as .tflite flatbuffers directly, without a converter.

Each architecture of `models.twins` becomes a chain of FULLY_CONNECTED operators
(ReLU fused into the hidden ones) and a final LOGISTIC, so the TFLite output is
the score sigmoid(logit). The input's batch dimension is dynamic (shape signature
[-1, n_features]); a scorer resizes it for a batch.

Trained weights are written into the constant tensors' buffers of a template;
the graph is never rebuilt, so a model from `with_weights` matches its template
everywhere except the weight bytes. Layout follows the TFLite schema
(tensorflow/compiler/mlir/lite/schema/schema.fbs); FULLY_CONNECTED weights are
(out, in), the same layout as torch's `nn.Linear.weight`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flatbuffers
import numpy as np
import tflite
from tflite.ActivationFunctionType import ActivationFunctionType
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.TensorType import TensorType

from models.architectures import layer_shapes

SCHEMA_VERSION = 3
"""TFLite schema version written into the model."""

_ALIGN = 16
"""Byte alignment of weight buffers, so kernels may read floats in place."""

_FC, _LOGISTIC = 0, 1
"""Indices into the model's operator code table."""


class _Writer:
    """Builds one model's flatbuffer: buffers, tensors and operators, then Finish."""

    def __init__(self) -> None:
        self.b = flatbuffers.Builder(1024)
        self.buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel
        self.tensors: list[int] = []
        self.operators: list[int] = []

    def tensor(self, name: str, shape: Sequence[int], data: bytes | None) -> int:
        """Add a float32 tensor (constant when `data` is given); return its index."""
        buffer_index = 0
        if data is not None:
            self.buffers.append(data)
            buffer_index = len(self.buffers) - 1
        b = self.b
        name_off = b.CreateString(name)
        shape_off = b.CreateNumpyVector(np.asarray(shape, dtype=np.int32))
        signature = [-1, *shape[1:]] if data is None else shape
        signature_off = b.CreateNumpyVector(np.asarray(signature, dtype=np.int32))
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_off)
        tflite.TensorAddShapeSignature(b, signature_off)
        tflite.TensorAddType(b, TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, buffer_index)
        tflite.TensorAddName(b, name_off)
        self.tensors.append(tflite.TensorEnd(b))
        return len(self.tensors) - 1

    def operator(
        self, opcode: int, inputs: list[int], outputs: list[int], fused: int | None
    ) -> None:
        """Add an operator; `fused` is the FULLY_CONNECTED activation, or None."""
        b = self.b
        in_off = b.CreateNumpyVector(np.asarray(inputs, dtype=np.int32))
        out_off = b.CreateNumpyVector(np.asarray(outputs, dtype=np.int32))
        options = None
        if fused is not None:
            tflite.FullyConnectedOptionsStart(b)
            tflite.FullyConnectedOptionsAddFusedActivationFunction(b, fused)
            options = tflite.FullyConnectedOptionsEnd(b)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, opcode)
        tflite.OperatorAddInputs(b, in_off)
        tflite.OperatorAddOutputs(b, out_off)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(
                b, BuiltinOptions.FullyConnectedOptions
            )
            tflite.OperatorAddBuiltinOptions(b, options)
        self.operators.append(tflite.OperatorEnd(b))

    def finish(self, input_index: int, output_index: int) -> bytes:
        """Write subgraph, operator codes and buffers; return the model bytes."""
        b = self.b
        subgraph = self._subgraph(input_index, output_index)
        codes = [
            self._opcode(code)
            for code in (BuiltinOperator.FULLY_CONNECTED, BuiltinOperator.LOGISTIC)
        ]
        buffers = [self._buffer(data) for data in self.buffers]
        description = b.CreateString("iomt-gateway ectopy score")
        codes_off = self._vector(tflite.ModelStartOperatorCodesVector, codes)
        subgraphs_off = self._vector(tflite.ModelStartSubgraphsVector, [subgraph])
        buffers_off = self._vector(tflite.ModelStartBuffersVector, buffers)
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, SCHEMA_VERSION)
        tflite.ModelAddOperatorCodes(b, codes_off)
        tflite.ModelAddSubgraphs(b, subgraphs_off)
        tflite.ModelAddDescription(b, description)
        tflite.ModelAddBuffers(b, buffers_off)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _subgraph(self, input_index: int, output_index: int) -> int:
        b = self.b
        tensors_off = self._vector(tflite.SubGraphStartTensorsVector, self.tensors)
        ops_off = self._vector(tflite.SubGraphStartOperatorsVector, self.operators)
        in_off = b.CreateNumpyVector(np.asarray([input_index], dtype=np.int32))
        out_off = b.CreateNumpyVector(np.asarray([output_index], dtype=np.int32))
        name_off = b.CreateString("main")
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensors_off)
        tflite.SubGraphAddInputs(b, in_off)
        tflite.SubGraphAddOutputs(b, out_off)
        tflite.SubGraphAddOperators(b, ops_off)
        tflite.SubGraphAddName(b, name_off)
        return tflite.SubGraphEnd(b)

    def _opcode(self, code: int) -> int:
        b = self.b
        tflite.OperatorCodeStart(b)
        # Readers older than schema 3a look only at the deprecated int8 field.
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, code)
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        return tflite.OperatorCodeEnd(b)

    def _buffer(self, data: bytes) -> int:
        b = self.b
        data_off = None
        if data:
            b.StartVector(1, len(data), _ALIGN)
            b.head -= len(data)
            b.Bytes[b.head : b.head + len(data)] = data
            data_off = b.EndVector()
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        return tflite.BufferEnd(b)

    def _vector(self, start, offsets: list[int]) -> int:
        start(self.b, len(offsets))
        for off in reversed(offsets):
            self.b.PrependUOffsetTRelative(off)
        return self.b.EndVector()


def template(arch: str, n_features: int) -> bytes:
    """The .tflite model of `arch` with all weights zero (its score is 0.5).

    Raises:
        ValueError: If `arch` is unknown or n_features is not positive.
    """
    shapes = layer_shapes(arch, n_features)
    w = _Writer()
    current = w.tensor("features", [1, n_features], None)
    input_index = current
    for i, (out, inp) in enumerate(shapes):
        weight = w.tensor(f"fc{i}/weight", [out, inp], bytes(4 * out * inp))
        bias = w.tensor(f"fc{i}/bias", [out], bytes(4 * out))
        last = i == len(shapes) - 1
        result = w.tensor("logit" if last else f"fc{i}/relu", [1, out], None)
        fused = ActivationFunctionType.NONE if last else ActivationFunctionType.RELU
        w.operator(_FC, [current, weight, bias], [result], fused)
        current = result
    score = w.tensor("score", [1, 1], None)
    w.operator(_LOGISTIC, [current], [score], None)
    return w.finish(input_index, score)


def _constant_slots(model_bytes: bytes) -> list[tuple[int, tuple[int, ...]]]:
    """(byte offset, shape) of each constant tensor's data, in tensor order."""
    model = tflite.Model.GetRootAsModel(model_bytes, 0)
    graph = model.Subgraphs(0)
    slots = []
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        if tensor.Buffer() == 0:
            continue
        buffer = model.Buffers(tensor.Buffer())
        # Offset 4 in the Buffer table is its `data` field (schema field 0).
        data_start = buffer._tab.Vector(4)
        slots.append((data_start, tuple(tensor.ShapeAsNumpy().tolist())))
    return slots


def with_weights(base: bytes | str, arrays: Sequence[np.ndarray]) -> bytes:
    """A model with `arrays` ([W0, b0, W1, b1, ...], as `twins.weights`) as weights.

    Args:
        base: A template's bytes, or an architecture name to build the template
            for (n_features taken from the first weight's shape).
        arrays: One array per constant tensor, in order, shapes as the template's.

    Raises:
        ValueError: If the number or a shape of the arrays does not match, an
            array holds a non-finite value, or the architecture is unknown.
    """
    if isinstance(base, str):
        if not arrays or np.ndim(arrays[0]) != 2:
            raise ValueError("the first array must be a 2-D weight matrix")
        base = template(base, int(np.shape(arrays[0])[1]))
    slots = _constant_slots(base)
    if len(arrays) != len(slots):
        raise ValueError(f"expected {len(slots)} arrays, got {len(arrays)}")
    out = bytearray(base)
    for i, ((start, shape), array) in enumerate(zip(slots, arrays, strict=True)):
        data = np.asarray(array, dtype="<f4")
        if data.shape != shape:
            raise ValueError(f"array {i}: shape {data.shape}, expected {shape}")
        if not np.all(np.isfinite(data)):
            raise ValueError(f"array {i}: holds a non-finite value")
        out[start : start + data.nbytes] = data.tobytes()
    return bytes(out)


def weights_of(model_bytes: bytes) -> list[np.ndarray]:
    """The weights of a model written by `with_weights`, in the same order.

    Raises:
        ValueError: If the bytes are not a model of this template's form.
    """
    try:
        slots = _constant_slots(model_bytes)
    except Exception as exc:  # flatbuffers raises bare struct/index errors
        raise ValueError(f"not a .tflite model of this template: {exc}") from exc
    return [
        np.frombuffer(model_bytes, "<f4", int(np.prod(shape)), start)
        .reshape(shape)
        .copy()
        for start, shape in slots
    ]
