"""The gateway's exceptions, and the process exit codes they map to.

Exit codes are grouped by subsystem and never reused, so that systemd's
`RestartPreventExitStatus=` and an operator's runbook can act on them:

====  =========================  ==================================================
code  name                       what the operator does next
====  =========================  ==================================================
0     OK                         nothing
1     INTERNAL                   a bug: report it with the journal of the run
2     USAGE                      fix the command line (see `iomt-gateway --help`)
10    CONFIG_INVALID             fix the key named in the message, then
                                 `iomt-gateway check-config FILE`
11    CONFIG_UNREADABLE          check the path and the service user's permissions
20    STORE_UNAVAILABLE          check the data directory: disk full, read-only
                                 mount, permissions
21    STORE_CORRUPT              restore the database from backup; keep the file
30    BROKER_UNREACHABLE         start the MQTT broker, or fix `[mqtt]` host/port
40    DECODE_FAILED              (decode command) the payload is malformed
50    BLE_UNAVAILABLE            start bluetoothd and D-Bus; check the adapter
                                 (`bluetoothctl show`)
60    MODEL_INVALID              the model file is missing or unusable; the previous
                                 one stays installed (`model evaluate` checks one)
61    PRIVACY_BUDGET_EXCEEDED    the round would overspend epsilon_max: nothing ran;
                                 `iomt-gateway privacy` shows what is left
62    TRAINING_DATA_MISSING      too few labelled windows of consenting patients
                                 for a round; nothing ran, nothing was spent
70    AUDIT_TAMPERED             `audit verify` found the audit trail changed: keep
                                 the file as evidence, report it to the data
                                 protection officer
====  =========================  ==================================================
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; see the module docstring for what each asks of you."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG_INVALID = 10
    CONFIG_UNREADABLE = 11
    STORE_UNAVAILABLE = 20
    STORE_CORRUPT = 21
    BROKER_UNREACHABLE = 30
    DECODE_FAILED = 40
    BLE_UNAVAILABLE = 50
    MODEL_INVALID = 60
    PRIVACY_BUDGET_EXCEEDED = 61
    TRAINING_DATA_MISSING = 62
    AUDIT_TAMPERED = 70


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(GatewayError):
    """The configuration file is invalid; `problems` lists every one found.

    Attributes:
        path: The file that was read.
        problems: One line per problem: key, value found, what is expected.
    """

    exit_code = ExitCode.CONFIG_INVALID

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s)\n{listed}")


class ConfigUnreadableError(GatewayError):
    """The configuration file cannot be read or is not TOML."""

    exit_code = ExitCode.CONFIG_UNREADABLE


class StoreError(GatewayError):
    """The SQLite store cannot be opened or written."""

    exit_code = ExitCode.STORE_UNAVAILABLE


class StoreCorruptError(StoreError):
    """The SQLite file is damaged or not a database; keep it for recovery."""

    exit_code = ExitCode.STORE_CORRUPT


class BrokerError(GatewayError):
    """The MQTT broker cannot be reached or refused us.

    Attributes:
        host: Broker host.
        port: Broker port.
    """

    exit_code = ExitCode.BROKER_UNREACHABLE

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"MQTT broker {host}:{port}: {reason}; "
            "check that it runs and that [mqtt] host/port are right"
        )


class DeliveryError(GatewayError):
    """One alert could not be delivered to one target (it will be retried).

    Attributes:
        target: The target's redacted name.
    """

    def __init__(self, target: str, reason: str) -> None:
        self.target = target
        super().__init__(f"delivery to {target} failed: {reason}")
