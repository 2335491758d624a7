"""The `iomt-gateway` command line.

Exit codes are those of `gateway.errors.ExitCode` (documented there and in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.errors import ConfigError, ExitCode, GatewayError
from sensors.errors import DecodeError

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger("gateway")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    _setup_logging(
        args.log_level or ("warning" if args.command == "demo" else "info"),
        args.log_format,
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _fail(f"configuration invalid: {exc}", args.log_format)
        return exc.exit_code
    except GatewayError as exc:
        _fail(f"error: {exc}", args.log_format)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK


def _fail(message: str, log_format: str) -> None:
    """Say why the command failed: a line for people, or a JSON log record."""
    if log_format == "json":
        log.error("%s", message)
    else:
        print(message, file=sys.stderr)


def console_main() -> None:
    """The `iomt-gateway` executable: `main()` as a process.

    SIGPIPE stays ignored, as Python sets it: with the default action, a write to
    a socket whose peer has gone (a broker restarting) would kill the agent
    without a word. A reader of our output going away (`alerts | head`) is a
    BrokenPipeError instead, and ends the command quietly.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = ExitCode.OK
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iomt-gateway",
        description="Edge agent for medical IoT wearables and room sensors.",
    )
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="default: info; warning for the demo, whose output is its timeline",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text: one 'LEVEL subsystem: message' line per event (journald); "
        "json: one JSON object per line, for log shippers",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True, type=Path, help="TOML file")
    run.add_argument(
        "--speed",
        type=float,
        default=None,
        help="replay the configured recordings this many times faster than real "
        "time (without it they play in real time)",
    )
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="replay real recordings, print the alerts")
    demo.add_argument(
        "--speed",
        type=float,
        default=None,
        help="replay speed-up (default: as fast as possible)",
    )
    demo.add_argument(
        "--ble",
        action="store_true",
        help="a virtual chest strap over a virtual radio instead of recordings "
        "(real time, about two minutes)",
    )
    demo.add_argument("--config", type=Path, default=None, help="demo TOML file")
    demo.add_argument("--keep", type=Path, default=None, help="keep state in DIR")
    demo.set_defaults(func=_cmd_demo)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_check_config)

    alerts = sub.add_parser("alerts", help="list the alert outbox with states")
    alerts.add_argument("--config", required=True, type=Path)
    alerts.add_argument("--json", action="store_true", help="one JSON object per line")
    alerts.set_defaults(func=_cmd_alerts)

    privacy = sub.add_parser("privacy", help="the privacy budget: spent, left, rounds")
    privacy.add_argument("--config", required=True, type=Path)
    privacy.add_argument("--json", action="store_true", help="print JSON")
    privacy.set_defaults(func=_cmd_privacy)

    federation = sub.add_parser("federation", help="federated learning on this gateway")
    federation_sub = federation.add_subparsers(dest="federation_command", required=True)
    fed_status = federation_sub.add_parser(
        "status", help="last rounds sent, model version installed, epsilon spent"
    )
    fed_status.add_argument("--config", required=True, type=Path)
    fed_status.add_argument("--json", action="store_true", help="print JSON")
    fed_status.add_argument("--last", type=int, default=10, help="rounds to show")
    fed_status.set_defaults(func=_cmd_federation_status)

    model = sub.add_parser("model", help="the on-device model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    evaluate = model_sub.add_parser(
        "evaluate", help="AUROC per record on beat-annotation CSV pairs"
    )
    evaluate.add_argument("dir", type=Path, help="folder of <rec>_all.csv, _pvc.csv")
    evaluate.add_argument(
        "--config", type=Path, default=None, help="use the model installed there"
    )
    evaluate.add_argument("--model", type=Path, default=None, help="a .tflite file")
    evaluate.set_defaults(func=_cmd_evaluate)

    scan = sub.add_parser("scan", help="list nearby BLE devices")
    scan.add_argument("--timeout", type=float, default=10.0, help="seconds to listen")
    scan.add_argument(
        "--virtual",
        action="store_true",
        help="scan the demo's virtual radio (a virtual strap) instead of Bluetooth",
    )
    scan.set_defaults(func=_cmd_scan)

    pair = sub.add_parser("pair", help="add a wearable to the roster")
    pair.add_argument("address", help="BLE address, e.g. C8:4F:2A:10:77:01")
    pair.add_argument("--patient", required=True, help="pseudonymous patient ref")
    pair.add_argument("--config", required=True, type=Path)
    pair.add_argument(
        "--profiles",
        default="heart_rate,battery",
        help="comma-separated: heart_rate battery pulse_oximeter thermometer "
        "blood_pressure (default: heart_rate,battery)",
    )
    pair.add_argument("--model", default=None, help="vendor decoder model, if any")
    pair.set_defaults(func=_cmd_pair)

    _add_operator_commands(sub)
    _add_privacy_commands(sub)
    _add_learning_commands(sub)

    from sensors.ble import registry

    decode = sub.add_parser("decode", help="decode a GATT characteristic value")
    decode.add_argument(
        "characteristic",
        type=registry.short_uuid,
        choices=registry.characteristics() + registry.models(),
        help="characteristic UUID (2a37, 0x2A37 or 128-bit) or vendor model",
    )
    decode.add_argument("hex", nargs="+", help="payload bytes in hex (spaces allowed)")
    decode.set_defaults(func=_cmd_decode)
    return p


def _setup_logging(level: str, log_format: str = "text") -> None:
    from gateway.logfmt import formatter

    # One line per event, level and subsystem first: what journald and grep want.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # apprise logs notification bodies (health data) at debug, and service URLs
    # (tokens) in its warnings: the gateway logs its own redacted account instead.
    logging.getLogger("apprise").setLevel(logging.CRITICAL)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    cfg = load_config(args.file)
    print(
        f"{args.file}: ok ({len(cfg.patients)} patients, {len(cfg.devices)} devices, "
        f"{len(cfg.mqtt.topics)} room-sensor topics, {len(cfg.replay)} recordings)"
    )
    return ExitCode.OK


def _cmd_pair(args: argparse.Namespace) -> int:
    from gateway.roster import add_device

    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    config = add_device(
        args.config,
        address=args.address,
        patient=args.patient,
        profiles=profiles,
        model=args.model,
    )
    print(
        f"{args.address} added to the roster in {args.config} "
        f"({len(config.devices)} devices); restart the agent to connect to it"
    )
    return ExitCode.OK


def _cmd_decode(args: argparse.Namespace) -> int:
    from sensors.ble.registry import decode

    try:
        data = parse_hex(args.hex)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        measurement = decode(args.characteristic, data)
    except DecodeError as err:
        print(f"error: cannot decode: {err}", file=sys.stderr)
        return ExitCode.DECODE_FAILED
    print(json.dumps(measurement.as_dict()))
    return ExitCode.OK


def parse_hex(words: Sequence[str]) -> bytes:
    """Payload bytes as tools print them: "16 4e", "164e", "0x16 0x4e", "16:4E:1B".

    Raises:
        ValueError: Not hex, or an odd number of digits (the message says which).
    """
    digits = "".join(
        w.removeprefix("0x").removeprefix("0X")
        for w in re.split(r"[\s:,-]+", " ".join(words))
    )
    if not re.fullmatch(r"[0-9A-Fa-f]*", digits):
        raise ValueError("not hex bytes: use digits 0-9 and a-f, e.g. 16 4e 1b 03")
    if len(digits) % 2:
        raise ValueError(f"{len(digits)} hex digits: a byte needs two, e.g. 06 not 6")
    return bytes.fromhex(digits)


def _cmd_alerts(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.outbox import Outbox
    from gateway.report import print_outbox

    cfg = load_config(args.config)
    path = cfg.path(cfg.alerts.outbox_file)
    if not path.exists():
        print(f"no outbox at {path} yet: the gateway has not run with this config")
        return ExitCode.OK
    outbox = Outbox(path)
    try:
        rows = outbox.list_alerts()
    finally:
        outbox.close()
    print_outbox(rows, as_json=args.json)
    return ExitCode.OK


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    cfg = load_config(args.config)
    if args.log_level is None:
        logging.getLogger().setLevel(cfg.gateway.log_level.upper())
    return asyncio.run(_run(cfg, args.speed))


async def _run(cfg: Config, speed: float | None) -> int:
    from gateway.agent import Agent
    from gateway.clock import ManualClock, SystemClock

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A crash in native code (SQLite, TFLite, ssl) leaves its Python stacks in the
    # journal; `kill -USR1 PID` writes them too, for a stuck link, without stopping
    # the agent. Code locations only, never data.
    faulthandler.enable(all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    accelerated = bool(cfg.replay) and speed is not None
    now = SystemClock().now()
    agent = Agent(cfg, clock=ManualClock(now) if accelerated else SystemClock())
    await agent.start(live_ticks=not accelerated)
    try:
        if cfg.replay:
            replayed = await _unless_stopped(
                agent.replay(start=now, speed=speed or 1.0), stop
            )
            if replayed and accelerated:
                # The replay's clock ran ahead of the wall clock; live input and
                # escalation timers must not run on it. Deliver, then stop.
                log.info("accelerated replay finished; delivering, then stopping")
                await agent.deliver_pending()
                return ExitCode.OK
            if replayed:
                log.info("replay finished; running until stopped")
        await stop.wait()
    finally:
        await agent.stop()
    return ExitCode.OK


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` until it ends (True) or `stop` is set first (False, cancelled)."""
    task = asyncio.create_task(work, name="replay")
    stopped = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopped):
        pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return not stop.is_set()


def _cmd_privacy(args: argparse.Namespace) -> int:
    from gateway.learning.train import account

    cfg = _state_config(args.config)
    learning = cfg.learning
    with account(cfg) as gateway_account:
        spent, rounds = gateway_account.spent(), gateway_account.history()
    if args.json:
        print(
            json.dumps(
                privacy_dict(spent, rounds, learning.epsilon_max, learning.delta)
            )
        )
        return ExitCode.OK
    print(
        f"epsilon spent {spent:.3f} of {learning.epsilon_max:g} "
        f"(delta {learning.delta:g}); left {max(0.0, learning.epsilon_max - spent):.3f}"
    )
    for r in rounds:
        print(
            f"round {r.id}  {r.status:<8}  sigma {r.noise_multiplier:.3f}  "
            f"q {r.sample_rate:.4f}  steps {r.steps}  "
            f"epsilon after {r.epsilon_after:.3f}"
        )
    return ExitCode.OK


def privacy_dict(
    spent: float, rounds: Sequence[Any], epsilon_max: float, delta: float
) -> dict[str, object]:
    """The privacy account as JSON-ready data."""
    return {
        "epsilon_spent": spent,
        "epsilon_max": epsilon_max,
        "delta": delta,
        "epsilon_left": max(0.0, epsilon_max - spent),
        "rounds": [
            {
                "id": r.id,
                "status": r.status,
                "noise_multiplier": r.noise_multiplier,
                "sample_rate": r.sample_rate,
                "steps": r.steps,
                "epsilon_after": r.epsilon_after,
            }
            for r in rounds
        ],
    }


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from gateway.evaluate import evaluate

    model = args.model
    if model is None and args.config is not None:
        from gateway.config import load_config

        cfg = load_config(args.config)
        installed = cfg.path(cfg.learning.models_dir) / "current.tflite"
        model = installed if installed.exists() else None

    def progress(record: str, figures: dict[str, object]) -> None:
        auroc = figures["auroc"]
        print(
            f"record {record}: {figures['windows']} windows "
            f"({figures['positive_windows']} irregular), AUROC "
            + ("undefined (one class)" if auroc is None else f"{auroc:.4f}"),
            file=sys.stderr,
            flush=True,
        )

    try:
        result = evaluate(args.dir, model, on_record=progress)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(json.dumps(result))
    return ExitCode.OK


def _cmd_scan(args: argparse.Namespace) -> int:
    from gateway.scan import scan

    return asyncio.run(scan(timeout=args.timeout, virtual=args.virtual))


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    if args.ble:
        from gateway.ble_demo import run_ble_demo

        return asyncio.run(run_ble_demo(keep=args.keep))
    return asyncio.run(run_demo(config=args.config, speed=args.speed, keep=args.keep))


def _add_operator_commands(sub: Any) -> None:
    status = sub.add_parser("status", help="is this gateway doing its job")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--data-dir", type=Path, default=None, help="override")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_cmd_status)

    report = sub.add_parser("report", help="a patient's trends and alerts as PNG")
    report.add_argument("--config", required=True, type=Path)
    report.add_argument("--data-dir", type=Path, default=None, help="override")
    report.add_argument("--patient", default=None, help="pseudonymous patient ref")
    report.add_argument(
        "--since", default="24h", help="30m, 24h, 7d, or 'all' (default: 24h)"
    )
    report.add_argument("--out", type=Path, default=None, help="patient PNG")
    report.add_argument(
        "--budget-out", type=Path, default=None, help="privacy budget PNG"
    )
    report.set_defaults(func=_cmd_report)


def _operator_config(args: argparse.Namespace) -> Config:
    from gateway.config import load_config

    if args.data_dir is None:
        return load_config(args.config)
    return load_config(args.config, gateway={"data_dir": str(args.data_dir)})


def _state_config(path: Path) -> Config:
    """The configuration at `path`, for a command that reads the gateway's state."""
    from gateway.config import load_config

    return _with_state(load_config(path))


def _with_state(cfg: Config) -> Config:
    """`cfg`, once its data directory is known to exist.

    Raises:
        StoreError: It does not: the gateway never ran with this configuration.
    """
    from gateway.errors import StoreError

    data_dir = cfg.gateway.data_dir
    if not data_dir.is_dir():
        raise StoreError(
            f"no gateway state in {data_dir}: the gateway has not run with this "
            "configuration yet, or gateway.data_dir is wrong (--data-dir where offered)"
        )
    return cfg


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway.status import gather, render

    status = gather(_operator_config(args))
    print(json.dumps(status) if args.json else render(status))
    return ExitCode.OK


def _cmd_report(args: argparse.Namespace) -> int:
    from gateway.plots import report_command

    return report_command(
        _with_state(_operator_config(args)),
        args.patient,
        args.since,
        args.out,
        args.budget_out,
    )


def _add_privacy_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the roster, pseudonym and signing keys")
    keys.add_argument("keys_command", choices=["init", "rotate"])
    keys.add_argument("--config", required=True, type=Path)
    keys.set_defaults(func=_cmd_keys)

    patient = sub.add_parser("patient", help="roster vault, consent, export, forget")
    patient_sub = patient.add_subparsers(dest="patient_command", required=True)
    add = patient_sub.add_parser("add", help="add a patient; prints their ref")
    add.add_argument("--id", required=True, help="local identifier, e.g. the MRN")
    add.add_argument("--name", required=True)
    add.add_argument("--bed", default=None)
    add.add_argument("--label", default=None, help="what the ERT's phones show")
    add.add_argument("--no-training", action="store_true", help="no model training")
    add.add_argument("--no-monitoring", action="store_true", help="not monitored")
    consent = patient_sub.add_parser("consent", help="change consent")
    consent.add_argument("ref")
    consent.add_argument("--training", choices=["yes", "no"], default=None)
    consent.add_argument("--monitoring", choices=["yes", "no"], default=None)
    patient_sub.add_parser("list", help="the roster vault, with names")
    export = patient_sub.add_parser("export", help="everything stored, JSON + FHIR")
    export.add_argument("ref")
    export.add_argument("--out", type=Path, default=None, help="JSON file (stdout)")
    export.add_argument("--fhir", type=Path, default=None, help="FHIR Bundle file")
    forget = patient_sub.add_parser("forget", help="delete everything stored")
    forget.add_argument("ref")
    for p in patient_sub.choices.values():
        p.add_argument("--config", required=True, type=Path)
    patient.set_defaults(func=_cmd_patient)

    audit = sub.add_parser("audit", help="the hash-chained audit trail")
    audit.add_argument("audit_command", choices=["verify", "show", "checkpoint"])
    audit.add_argument("--config", required=True, type=Path)
    audit.add_argument("--limit", type=int, default=50, help="show: last N entries")
    audit.add_argument("--json", action="store_true", help="show: JSON lines")
    audit.set_defaults(func=_cmd_audit)


def _cmd_keys(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.patients import keys_command

    return keys_command(load_config(args.config), args.keys_command)


def _cmd_patient(args: argparse.Namespace) -> int:
    from gateway.patients import patient_command

    return patient_command(_state_config(args.config), args)


def _cmd_audit(args: argparse.Namespace) -> int:
    from gateway.audit import audit_command

    cfg = _state_config(args.config)
    return audit_command(cfg, args.audit_command, limit=args.limit, as_json=args.json)


def _add_learning_commands(sub: Any) -> None:
    train = sub.add_parser(
        "train", help="one DP-SGD round on the store's windows, then swap the model"
    )
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--json", action="store_true", help="print the result as JSON")
    train.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from gateway.learning.train import train_round

    cfg = _state_config(args.config)
    epochs = cfg.learning.epochs

    def progress(p: dict[str, float]) -> None:
        print(
            f"epoch {int(p['epoch'])}/{epochs}  loss {p['loss']:.4f}  "
            f"epsilon so far {p['epsilon']:.3f}",
            file=sys.stderr if args.json else sys.stdout,
            flush=True,
        )

    report = train_round(cfg, on_progress=progress)
    if args.json:
        print(json.dumps(train_dict(report)))
        return ExitCode.OK
    print(
        f"trained on {report.windows} windows ({report.positives} irregular) of "
        f"{report.patients} consenting patients\n"
        f"epsilon spent {report.epsilon_after:.3f} of {report.epsilon_max:g} "
        f"(this round {report.epsilon_after - report.epsilon_before:.3f}); "
        f"left {report.epsilon_left:.3f}\n"
        f"model swapped in: {report.model} (the previous one kept for rollback)"
    )
    return ExitCode.OK


def train_dict(report: Any) -> dict[str, object]:
    """A training round's report as JSON-ready data."""
    return {
        "windows": report.windows,
        "positives": report.positives,
        "patients": report.patients,
        "epsilon_before": report.epsilon_before,
        "epsilon_after": report.epsilon_after,
        "epsilon_max": report.epsilon_max,
        "epsilon_left": report.epsilon_left,
        "model": str(report.model),
        "metrics": report.metrics,
    }


def _cmd_federation_status(args: argparse.Namespace) -> int:
    from gateway.federation.status import print_status

    print_status(_state_config(args.config), last=args.last, as_json=args.json)
    return ExitCode.OK


if __name__ == "__main__":
    console_main()
