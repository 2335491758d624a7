"""`iomt-gateway report`: a patient's night on one picture, and the privacy budget.

The patient figure puts heart rate, RR-derived variability (RMSSD), SpO2 and body
temperature on one time axis, with the stretches where a sensor reported "no
measurement" shaded in its panel, the alerts marked by priority in a strip above
(technical alarms drawn as bars from raise to clear), and the model's score
beneath. The gateway figure draws epsilon after each training round against the
cap. Both are made with matplotlib's object API on the Agg canvas: no pyplot, no
display, and the agent never imports this module.

Artists carry gids ("alerts-<priority>-<category>", "sensor-off-<kind>",
"technical-alarm", "series-<kind>") so tests can read positions back.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gateway.alarms import Category, Priority
from gateway.errors import ExitCode, GatewayError
from gateway.outbox import AlertRecord, Outbox
from gateway.readings import TECHNICAL, Kind, Reading
from gateway.store import ReadingStore

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.learning.privacy import Round

log = logging.getLogger(__name__)

VITALS = (Kind.HEART_RATE, Kind.SPO2, Kind.BODY_TEMPERATURE)
HRV_WINDOW_S = 300.0
"""RMSSD over 5-minute windows, the short-term HRV standard (Task Force of the ESC
and NASPE 1996, "Heart rate variability: standards of measurement")."""
HRV_MIN_BEATS = 30
RR_PLAUSIBLE_MS = (300.0, 2000.0)
"""RR intervals outside 30-200 bpm are artefacts (missed or extra beats)."""
GAP_FACTOR = 5.0
"""A pause longer than this many typical steps breaks the line."""

PRIORITY_COLOURS = {
    Priority.HIGH: "#d62728",
    Priority.MEDIUM: "#ff7f0e",
    Priority.LOW: "#1f77b4",
}
CATEGORY_MARKERS = {
    Category.PHYSIOLOGICAL: "v",
    Category.TECHNICAL: "s",
    Category.ENVIRONMENTAL: "o",
}
PANEL_TITLES = {
    Kind.HEART_RATE: "heart rate (bpm)",
    Kind.SPO2: "SpO2 (%)",
    Kind.BODY_TEMPERATURE: "temp. (Cel)",
}
NEWS2_ZERO_BAND = {
    Kind.HEART_RATE: (51.0, 90.0),
    Kind.SPO2: (96.0,),
    Kind.BODY_TEMPERATURE: (36.1, 38.0),
}
"""Edges of the NEWS2 single-parameter score 0 band, drawn as dotted guides."""
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass
class Series:
    """One kind's clean values, and its sensor-off spans (start, end)."""

    times: np.ndarray
    values: np.ndarray
    sensor_off: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class PatientReport:
    """What the patient figure shows, gathered from the store and the outbox."""

    patient_ref: str
    title: str
    start: float
    end: float
    series: dict[Kind, Series]
    hrv: Series
    scores: Series
    alerts: list[AlertRecord]
    timezone: str = "UTC"


# -- gathering ----------------------------------------------------------------------


def parse_since(text: str, now: float) -> float | None:
    """The start of the window: "24h" means 24 hours before `now`; "all": None.

    Raises:
        ValueError: Not a duration such as 30m, 24h, 7d, or "all".

    >>> parse_since("2h", 10_000.0)
    2800.0
    """
    if text == "all":
        return None
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"--since {text!r}: give a duration such as 30m, 24h, 7d")
    return now - float(match[1]) * _UNIT_S[match[2]]


def gather_patient(
    store: ReadingStore,
    alerts: Sequence[AlertRecord],
    patient_ref: str,
    since: float | None,
    *,
    label: str | None = None,
    timezone: str = "UTC",
) -> PatientReport:
    """Read one patient's readings and alerts since `since` (None: all)."""
    readings = store.readings(patient_ref=patient_ref, since=since)
    by_kind: dict[Kind, list[Reading]] = {}
    for r in readings:
        by_kind.setdefault(r.kind, []).append(r)
    mine = [
        a
        for a in alerts
        if a.alert.patient_ref == patient_ref
        and (since is None or a.alert.raised_at >= since)
    ]
    times = [r.measured_at for r in readings] + [a.alert.raised_at for a in mine]
    start = min(times, default=since or time.time())
    end = max(times, default=start)
    return PatientReport(
        patient_ref=patient_ref,
        title=f"{label} ({patient_ref})" if label else patient_ref,
        start=start,
        end=max(end, start + 60.0),
        series={k: to_series(by_kind.get(k, [])) for k in VITALS},
        hrv=rmssd_series(by_kind.get(Kind.RR_INTERVAL, [])),
        scores=to_series(by_kind.get(Kind.RHYTHM_SCORE, [])),
        alerts=sorted(mine, key=lambda a: a.alert.raised_at),
        timezone=timezone,
    )


def to_series(readings: Sequence[Reading]) -> Series:
    """Clean, finite values; and the spans where the sensor reported none.

    A span runs from the first flagged reading to the next clean one (or one
    typical step past the last flagged one), so it covers every flagged reading.
    """
    clean = [r for r in readings if r.is_clean and math.isfinite(r.value)]
    series = Series(
        np.array([r.measured_at for r in clean], dtype=float),
        np.array([r.value for r in clean], dtype=float),
    )
    step = _typical_step(np.array([r.measured_at for r in readings], dtype=float))
    series.sensor_off = _flagged_spans(readings, step)
    return series


def _flagged_spans(
    readings: Sequence[Reading], step: float
) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    opened: float | None = None
    last_flagged = 0.0
    for r in readings:
        if r.quality & TECHNICAL:
            opened = r.measured_at if opened is None else opened
            last_flagged = r.measured_at
        elif opened is not None:
            spans.append((opened, r.measured_at))
            opened = None
    if opened is not None:
        spans.append((opened, last_flagged + step))
    return spans


def rmssd_series(rr: Sequence[Reading]) -> Series:
    """RMSSD (ms) per `HRV_WINDOW_S` window, from plausible RR intervals."""
    low, high = RR_PLAUSIBLE_MS
    kept = [r for r in rr if r.is_clean and low <= r.value <= high]
    if not kept:
        return Series(np.empty(0), np.empty(0))
    t = np.array([r.measured_at for r in kept])
    v = np.array([r.value for r in kept])
    window = np.floor(t / HRV_WINDOW_S)
    times, values = [], []
    for w in np.unique(window):
        rr_w = v[window == w]
        if len(rr_w) >= HRV_MIN_BEATS:
            times.append((w + 0.5) * HRV_WINDOW_S)
            values.append(float(np.sqrt(np.mean(np.diff(rr_w) ** 2))))
    return Series(np.array(times), np.array(values))


def _typical_step(times: np.ndarray) -> float:
    if len(times) < 2:
        return 60.0
    return float(np.median(np.diff(np.sort(times)))) or 1.0


# -- drawing ------------------------------------------------------------------------


def x_of(epoch: float | np.ndarray) -> np.ndarray:
    """Epoch seconds as matplotlib date numbers (days since 1970, the default)."""
    return np.asarray(epoch, dtype=float) / 86400.0


def render_patient(report: PatientReport, out: Path | None = None) -> Figure:
    """Draw the patient figure; save it as PNG to `out` if given."""
    panels = [report.series[k] for k in VITALS]
    has = [len(p.times) > 0 for p in (panels[0], report.hrv, *panels[1:])]
    # Panels with nothing to show shrink to a line of text.
    ratios = [1.0] + [2.0 if h else 0.45 for h in has]
    ratios.append(1.2 if len(report.scores.times) else 0.45)
    fig = Figure(figsize=(11, 3 + 1.3 * sum(ratios)), dpi=80, layout="constrained")
    axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
    strip, hr, hrv, spo2, temp, score = axes
    _alert_strip(strip, report)
    _vital(hr, report.series[Kind.HEART_RATE], Kind.HEART_RATE)
    _hrv(hrv, report.hrv)
    _vital(spo2, report.series[Kind.SPO2], Kind.SPO2)
    _vital(temp, report.series[Kind.BODY_TEMPERATURE], Kind.BODY_TEMPERATURE)
    _score(score, report.scores)
    _alert_lines(axes[1:], report)
    _time_axis(score, report)
    fig.suptitle(f"{report.title}: {_span_text(report)}", fontsize=12)
    if out is not None:
        fig.savefig(out, format="png")
    return fig


def _alert_lines(axes: Sequence[Axes], report: PatientReport) -> None:
    # Faint lines carry each physiological alert down through the vitals.
    for record in report.alerts:
        a = record.alert
        if a.category is Category.PHYSIOLOGICAL:
            for ax in axes:
                ax.axvline(
                    x_of(a.raised_at),
                    color=PRIORITY_COLOURS[a.priority],
                    lw=0.8,
                    alpha=0.5,
                )


def _alert_strip(ax: Axes, report: PatientReport) -> None:
    groups: dict[tuple[Priority, Category], list[float]] = {}
    for record in report.alerts:
        a = record.alert
        groups.setdefault((a.priority, a.category), []).append(a.raised_at)
    for (priority, category), raised in sorted(groups.items()):
        ax.plot(
            x_of(np.array(raised)),
            np.full(len(raised), int(priority)),
            linestyle="none",
            marker=CATEGORY_MARKERS[category],
            markersize=8,
            color=PRIORITY_COLOURS[priority],
            label=f"{priority.label} {category}",
            gid=f"alerts-{priority.label}-{category}",
        )
    _technical_bars(ax, report)
    ax.set_ylim(-0.6, 3.6)
    ax.set_yticks([0, 1, 2, 3], ["tech. open", "low", "medium", "high"])
    ax.set_ylabel("alerts")
    if groups:
        ax.legend(loc="upper left", fontsize=7, ncol=4, framealpha=0.8)


def _technical_bars(ax: Axes, report: PatientReport) -> None:
    # A technical alarm is open from its raise until the condition cleared (or,
    # still open, to the end of the window).
    bars = [
        (r.alert.raised_at, (r.cleared_at or report.end) - r.alert.raised_at)
        for r in report.alerts
        if r.alert.category is Category.TECHNICAL
    ]
    if bars:
        ax.broken_barh(
            [(x_of(s), x_of(w)) for s, w in bars],
            (-0.35, 0.7),
            facecolors="#ffbb78",
            edgecolors="#ff7f0e",
            gid="technical-alarm",
        )


def _vital(ax: Axes, series: Series, kind: Kind) -> None:
    ax.set_ylabel(PANEL_TITLES[kind], fontsize=9)
    for start, end in series.sensor_off:
        ax.axvspan(
            x_of(start),
            x_of(end),
            color="0.6",
            alpha=0.45,
            lw=0,
            gid=f"sensor-off-{kind}",
        )
    if len(series.times) == 0:
        _empty(ax, f"no {kind} readings in this window")
        return
    t, v = _with_gaps(series.times, series.values)
    ax.plot(x_of(t), v, lw=0.8, color="black", gid=f"series-{kind}")
    for level in NEWS2_ZERO_BAND.get(kind, ()):
        ax.axhline(level, color="#2ca02c", lw=0.7, ls=":")
    if series.sensor_off:
        ax.text(
            0.995,
            0.95,
            "grey: sensor off",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="0.35",
        )


def _hrv(ax: Axes, series: Series) -> None:
    ax.set_ylabel("HRV RMSSD (ms)", fontsize=9)
    if len(series.times) == 0:
        _empty(ax, "no RR intervals in this window (no HRV)")
        return
    t, v = _with_gaps(series.times, series.values)
    ax.plot(x_of(t), v, lw=0.9, marker=".", ms=3, color="#2ca02c", gid="series-hrv")


def _score(ax: Axes, series: Series) -> None:
    ax.set_ylabel("model", fontsize=9)
    if len(series.times) == 0:
        # Never a made-up line: without stored scores the panel says so.
        _empty(ax, "no model scores stored")
        return
    t, v = _with_gaps(series.times, series.values)
    ax.plot(x_of(t), v, lw=0.8, color="#9467bd", gid="series-rhythm_score")
    ax.set_ylim(-0.05, 1.05)


def _empty(ax: Axes, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="0.4",
    )
    ax.set_yticks([])


def _with_gaps(times: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert NaN where the stream paused, so the line does not bridge the gap."""
    if len(times) < 2:
        return times, values
    limit = GAP_FACTOR * _typical_step(times)
    breaks = np.flatnonzero(np.diff(times) > limit) + 1
    return (
        np.insert(times, breaks, np.nan),
        np.insert(values, breaks, np.nan),
    )


def _time_axis(ax: Axes, report: PatientReport) -> None:
    tz = zoneinfo.ZoneInfo(report.timezone)
    locator = mdates.AutoDateLocator(tz=tz)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
    margin = (report.end - report.start) * 0.01
    ax.set_xlim(x_of(report.start - margin), x_of(report.end + margin))
    ax.set_xlabel(f"time ({report.timezone})")


def _span_text(report: PatientReport) -> str:
    hours = (report.end - report.start) / 3600
    return f"{len(report.alerts)} alerts over {hours:.1f} h"


def render_budget(
    rounds: Sequence[Round], epsilon_max: float, delta: float, out: Path | None = None
) -> Figure:
    """Epsilon after each training round against the cap; PNG to `out` if given."""
    fig = Figure(figsize=(8, 4), dpi=80, layout="constrained")
    ax = fig.subplots()
    ax.axhline(
        epsilon_max,
        color="#d62728",
        ls="--",
        gid="epsilon-cap",
        label=f"cap, epsilon {epsilon_max:g}",
    )
    if rounds:
        x = np.arange(1, len(rounds) + 1)
        eps = np.array([r.epsilon_after for r in rounds])
        ax.step(
            x,
            eps,
            where="post",
            color="#1f77b4",
            gid="epsilon-spent",
            label="spent after round",
        )
        ax.plot(x, eps, "o", color="#1f77b4", ms=4)
        ax.set_xlim(0.5, len(rounds) + 0.5)
    else:
        _empty(ax, "no training rounds recorded: nothing spent")
    ax.set_ylim(0, epsilon_max * 1.15)
    ax.set_xlabel("training round")
    ax.set_ylabel("epsilon")
    ax.set_title(f"privacy budget (delta {delta:g})")
    ax.legend(loc="lower right", fontsize=8)
    if out is not None:
        fig.savefig(out, format="png")
    return fig


# -- the command --------------------------------------------------------------------


class NothingToReport(GatewayError):
    """The patient has no readings and no alerts in the window asked for."""

    exit_code = ExitCode.USAGE


def report_command(
    cfg: Config,
    patient: str | None,
    since: str,
    out: Path | None,
    budget_out: Path | None,
) -> int:
    """`iomt-gateway report`: write the requested PNGs; returns the exit code."""
    if out is None and budget_out is None:
        print(
            "error: give --out FILE.png and/or --budget-out FILE.png", file=sys.stderr
        )
        return ExitCode.USAGE
    for picture in (out, budget_out):
        if picture is not None and not picture.resolve().parent.is_dir():
            print(f"error: no folder {picture.parent} to write {picture.name} in")
            return ExitCode.USAGE
    if out is not None:
        if patient is None:
            print("error: --out needs --patient REF", file=sys.stderr)
            return ExitCode.USAGE
        try:
            start = parse_since(since, time.time())
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        _patient_png(cfg, patient, start, out)
    if budget_out is not None:
        _budget_png(cfg, budget_out)
    return ExitCode.OK


def _patient_png(cfg: Config, patient: str, since: float | None, out: Path) -> None:
    outbox = Outbox(cfg.path(cfg.alerts.outbox_file))
    try:
        records = outbox.list_alerts(limit=1_000_000)
    finally:
        outbox.close()
    store = ReadingStore(cfg.path(cfg.store.file))
    report = gather_patient(
        store,
        records,
        patient,
        since,
        label=cfg.labels().get(patient),
        timezone=cfg.gateway.timezone,
    )
    if not report.alerts and not any(
        len(series.times) for series in report.series.values()
    ):
        raise NothingToReport(
            f"no readings or alerts of {patient!r} in this window: check the ref "
            "(`iomt-gateway status` lists each stream's ref) and --since"
        )
    render_patient(report, out)
    print(
        f"{out}: {len(report.alerts)} alerts, "
        f"{sum(len(s.sensor_off) for s in report.series.values())} sensor-off spans"
    )


def _budget_png(cfg: Config, out: Path) -> None:
    from gateway.learning.privacy import PrivacyAccount

    learning = cfg.learning
    path = cfg.path(learning.privacy_file)
    rounds: list[Round] = []
    if path.exists():
        account = PrivacyAccount(
            path, epsilon_max=learning.epsilon_max, delta=learning.delta
        )
        try:
            rounds = account.history()
        finally:
            account.close()
    render_budget(rounds, learning.epsilon_max, learning.delta, out)
    print(f"{out}: {len(rounds)} training rounds")
