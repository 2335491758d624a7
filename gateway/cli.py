"""The `iomt-gateway` command line.

Exit codes are those of `gateway.errors.ExitCode` (documented there and in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.errors import ConfigError, ExitCode, GatewayError
from sensors.errors import DecodeError

log = logging.getLogger("gateway")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level or ("warning" if args.command == "demo" else "info"))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration invalid: {exc}", file=sys.stderr)
        return exc.exit_code
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK


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

    pair = sub.add_parser("pair", help="add a wearable to the roster")
    pair.add_argument("address", help="BLE address, e.g. C8:4F:2A:10:77:01")
    pair.add_argument("--patient", required=True, help="pseudonymous patient ref")
    pair.add_argument("--config", required=True, type=Path)
    pair.add_argument(
        "--profiles",
        default="heart_rate,battery",
        help="comma-separated: heart_rate battery pulse_oximeter thermometer "
        "blood_pressure glucose (default: heart_rate,battery)",
    )
    pair.add_argument("--model", default=None, help="vendor decoder model, if any")
    pair.set_defaults(func=_cmd_pair)

    decode = sub.add_parser("decode", help="decode a GATT characteristic value")
    decode.add_argument("characteristic", choices=["2a37"], help="characteristic UUID")
    decode.add_argument("hex", nargs="+", help="payload bytes in hex (spaces allowed)")
    decode.set_defaults(func=_cmd_decode)
    return p


def _setup_logging(level: str) -> None:
    # One line per event, level and subsystem first: what journald and grep want.
    logging.basicConfig(
        level=level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # apprise logs notification bodies (alerts: health data) at debug: never that.
    logging.getLogger("apprise").setLevel(max(logging.WARNING, logging.root.level))


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
    from sensors.ble.hrm import decode_heart_rate_measurement

    try:
        data = bytes.fromhex("".join(args.hex))
    except ValueError:
        print("error: not hex bytes", file=sys.stderr)
        return ExitCode.USAGE
    try:
        measurement = decode_heart_rate_measurement(data)
    except DecodeError as err:
        print(f"error: cannot decode: {err}", file=sys.stderr)
        return ExitCode.DECODE_FAILED
    print(json.dumps(measurement.as_dict()))
    return ExitCode.OK


def _cmd_alerts(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.outbox import Outbox

    cfg = load_config(args.config)
    outbox = Outbox(cfg.path(cfg.alerts.outbox_file))
    try:
        rows = outbox.list_alerts()
    finally:
        outbox.close()
    from gateway.report import print_outbox

    print_outbox(rows, as_json=args.json)
    return ExitCode.OK


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    cfg = load_config(args.config)
    return asyncio.run(_run(cfg, args.speed))


async def _run(cfg: object, speed: float | None) -> int:
    from gateway.agent import Agent
    from gateway.clock import ManualClock, SystemClock
    from gateway.config import Config

    assert isinstance(cfg, Config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    accelerated = bool(cfg.replay) and speed is not None
    now = SystemClock().now()
    agent = Agent(cfg, clock=ManualClock(now) if accelerated else SystemClock())
    await agent.start(live_ticks=not accelerated)
    try:
        if cfg.replay:
            await agent.replay(start=now, speed=speed or 1.0)
            log.info("replay finished; running until stopped")
        await stop.wait()
    finally:
        await agent.stop()
    return ExitCode.OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return asyncio.run(run_demo(config=args.config, speed=args.speed, keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
