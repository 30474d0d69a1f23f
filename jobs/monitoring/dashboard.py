"""The job-metrics dashboard: one self-contained HTML page rendered from ``DashboardData``.

The page needs nothing but itself: inline CSS, inline SVG charts drawn here in Python, and one
tiny inline script that only reports whether the page rendered (``data-rendered`` on ``<body>``)
and any script error (into ``<pre id="errors">``). A Content-Security-Policy forbids every
external load, so a page that tried one would be blocked and report it.

- ``render(data)`` → the HTML text; every text from the data is escaped.
- ``write(path, data)`` → the page as a file.
- ``serve(port, build)`` → a local HTTP server answering ``/`` with a fresh render per request.
"""

from __future__ import annotations

import html
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import structlog

from jobs.monitoring.metricdata import (
    DashboardData,
    GrowthRanking,
    HourValue,
    JobStatus,
    MonthBilling,
    MonthEstimates,
    NoisyFlags,
    RunCompleteness,
    RunFact,
    TenantGrowth,
)

__all__ = [
    "CHART_COUNT", "COLORS", "SECTION_TITLES", "DashboardServer", "render", "serve", "write",
]

log = structlog.get_logger("hostmeter.dashboard")

SECTION_TITLES = (
    "Job durations",
    "Runs by status",
    "Tenants expected vs processed",
    "Completeness per job",
    "Capacity over time",
    "Top tenants by growth",
    "Flagged noisy neighbours",
    "Snapshot coverage by month",
    "Billed units by month",
    "Billed amounts by month",
    "Top tenants by billed units",
    "Projected bill this month",
    "Recent failed runs",
    "Malformed log lines",
)
"""Every section of the page, in order; each is shown even when it has nothing to show."""

CAPACITY_SERIES = (("hosts", "Hosts"), ("metrics", "Metrics"), ("posts", "Posts"))
"""The fleet totals charted under "Capacity over time" (series, label), in order."""

CHART_COUNT = 10
"""The SVG charts on a page with data in every section (durations, statuses, tenants, fleet
hosts, metrics and posts, coverage, units, the projected bill of the fleet and of its largest
tenants)."""

STATUS_COLORS: Mapping[str, str] = {
    "succeeded": "#1b9e77",
    "partial": "#e6a700",
    "failed": "#d62728",
    "running": "#1f77b4",
    "skipped": "#9e9e9e",
}
_OTHER_STATUS = "#7f7f7f"
_JOB_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
                "#9c755f")
COLORS: Mapping[str, str] = {
    "standard": "#4e79a7",
    "micro": "#76b7b2",
    "expected": "#bab0ac",
    "processed": "#59a14f",
    "tenants_failed": "#e15759",
    "covered": "#1b9e77",
    "uncovered": "#eeeeee",
    "fleet.hosts": "#3b75af",
    "fleet.metrics": "#8e6bbf",
    "fleet.posts": "#d9822b",
    "short": "#fde2e1",
    "estimate.fleet": "#e15759",
    **{f"status.{k}": v for k, v in STATUS_COLORS.items()},
}
"""Fill colors of the charts (tests look for them in a screenshot)."""

_FAILED = ("failed", "partial")
_MAX_FAILED_ROWS = 25

# Chart margins (SVG user units; an SVG scales to its card's width).
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 16, 56


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _utc(t: datetime) -> datetime:
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


def _when(t: datetime | None) -> str:
    return "—" if t is None else _utc(t).strftime("%Y-%m-%d %H:%M")


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:,.1f} s" if s < 600 else f"{s / 60:,.1f} min"


def _money(amount: Decimal) -> str:
    """Decimal text with thousands separators and the amount's own precision (no float)."""
    return format(amount, ",")


def _num(v: float) -> str:
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.2f}".rstrip("0").rstrip(".")


def _compact(v: float) -> str:
    """An axis tick in at most ~6 characters: 950, 12.5k, 3M."""
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= unit:
            return _num(round(v / unit, 2)) + suffix
    return _num(v)


def _signed(v: int) -> str:
    return f"+{v:,}" if v > 0 else f"{v:,}".replace("-", "\u2212")


# --- axes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Scale:
    """A linear value axis from 0 to ``top`` with a tick every ``step``."""

    top: float
    step: float

    @classmethod
    def for_max(cls, value: float, *, integer: bool = False) -> _Scale:
        if value <= 0:
            return cls(top=1.0, step=1.0 if integer else 0.25)
        raw = value / 5
        exp = 10 ** math.floor(math.log10(raw))
        step = next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= raw)
        if integer:
            step = max(1.0, math.ceil(step))
        return cls(top=math.ceil(value / step - 1e-9) * step, step=step)

    def ticks(self) -> list[float]:
        n = round(self.top / self.step)
        return [i * self.step for i in range(n + 1)]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Frame:
    """A chart's SVG canvas: ``w`` × ``h`` user units, the plot inside fixed margins."""

    w: int = 600
    h: int = 280

    @property
    def plot_w(self) -> float:
        return self.w - _LEFT - _RIGHT

    @property
    def base(self) -> float:
        """The y of the x axis."""
        return self.h - _BOTTOM

    def y(self, value: float, scale: _Scale) -> float:
        return self.base - (self.base - _TOP) * (value / scale.top)

    def y_axis(self, scale: _Scale, label: str, fmt: Callable[[float], str] = _num) -> str:
        parts = []
        for tick in scale.ticks():
            y = self.y(tick, scale)
            parts.append(f'<line class="grid" x1="{_LEFT}" x2="{self.w - _RIGHT}" '
                         f'y1="{y:.1f}" y2="{y:.1f}"/>')
            parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" '
                         f'text-anchor="end">{_e(fmt(tick))}</text>')
        mid = (_TOP + self.base) / 2
        parts.append(f'<text class="axis-label" transform="translate(14 {mid:.0f}) '
                     f'rotate(-90)" text-anchor="middle">{_e(label)}</text>')
        parts.append(f'<line class="axis" x1="{_LEFT}" x2="{self.w - _RIGHT}" '
                     f'y1="{self.base}" y2="{self.base}"/>')
        return "".join(parts)

    def x_label(self, label: str) -> str:
        return (f'<text class="axis-label" x="{_LEFT + self.plot_w / 2:.0f}" y="{self.h - 8}" '
                f'text-anchor="middle">{_e(label)}</text>')

    def x_tick(self, x: float, label: str, *, anchor: str = "middle", line: int = 0) -> str:
        css = "tick" if line == 0 else "tick sub"
        return (f'<text class="{css}" x="{x:.1f}" y="{self.base + 16 + 13 * line}" '
                f'text-anchor="{anchor}">{_e(label)}</text>')

    def bars(self, n_groups: int, n_bars: int) -> tuple[float, float, float]:
        """(group width, bar width, first bar offset) for ``n_groups`` groups of ``n_bars``."""
        group = self.plot_w / max(n_groups, 1)
        bar = min(56.0, group * 0.7 / n_bars)
        return group, bar, (group - bar * n_bars) / 2

    def svg(self, name: str, title: str, body: str) -> str:
        return (f'<svg class="chart" data-chart="{_e(name)}" viewBox="0 0 {self.w} {self.h}" '
                f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{body}</svg>')


_CARD = _Frame()
_WIDE = _Frame(w=1200, h=300)
_THIRD = _Frame(w=400, h=250)


def _legend(items: Iterable[tuple[str, str]]) -> str:
    lis = "".join(f'<li><span class="swatch" style="background:{color}"></span>{_e(name)}</li>'
                  for name, color in items)
    return f'<ul class="legend">{lis}</ul>'


def _empty(message: str) -> str:
    return f'<p class="empty">{_e(message)}</p>'


def _time_ticks(t0: datetime, t1: datetime, most: int = 8) -> list[datetime]:
    """Round UTC times (on the hour, at midnight) between t0 and t1, at most ``most``."""
    steps = [timedelta(hours=h) for h in (1, 2, 3, 6, 12, 24, 48, 168, 336, 720)]
    step = next((s for s in steps if (t1 - t0) / s <= most), steps[-1])
    midnight = t0.replace(hour=0, minute=0, second=0, microsecond=0)
    t = midnight + step * math.ceil((t0 - midnight) / step)
    ticks = []
    while t <= t1:
        ticks.append(t)
        t += step
    return ticks


# --- charts -----------------------------------------------------------------------------------


def _job_colors(names: Iterable[str]) -> dict[str, str]:
    return {name: _JOB_PALETTE[i % len(_JOB_PALETTE)] for i, name in enumerate(sorted(names))}


def _durations_chart(runs: Sequence[RunFact]) -> str:
    if not runs:
        return _empty("No runs yet.")
    f = _WIDE
    colors = _job_colors({r.job for r in runs})
    times = [_utc(r.finished_at) for r in runs]
    t0, t1 = min(times), max(times)
    if t1 - t0 < timedelta(hours=2):
        t0, t1 = t0 - timedelta(hours=1), t1 + timedelta(hours=1)
    span = (t1 - t0).total_seconds()
    scale = _Scale.for_max(max(r.duration_s for r in runs))

    def x(t: datetime) -> float:
        return _LEFT + f.plot_w * (_utc(t) - t0).total_seconds() / span

    parts = [f.y_axis(scale, "Duration (seconds)"), f.x_label("Finished at (UTC)")]
    ticks = _time_ticks(t0, t1)
    whole_days = all(t.hour == 0 for t in ticks)
    for t in ticks:
        label = t.strftime("%m-%d" if whole_days else "%m-%d %H:%M")
        parts.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_TOP}" '
                     f'y2="{f.base}"/>')
        parts.append(f.x_tick(x(t), label))
    for job, color in colors.items():
        mine = sorted((r for r in runs if r.job == job), key=lambda r: _utc(r.finished_at))
        points = " ".join(f"{x(r.finished_at):.1f},{f.y(r.duration_s, scale):.1f}" for r in mine)
        parts.append(f'<polyline class="series" data-job="{_e(job)}" points="{points}" '
                     f'fill="none" stroke="{color}" stroke-width="1.5"/>')
        for r in mine:
            bad = r.status in _FAILED
            tip = f"{job} · {_when(r.finished_at)} UTC · {_seconds(r.duration_s)} · {r.status}"
            parts.append(
                f'<circle cx="{x(r.finished_at):.1f}" cy="{f.y(r.duration_s, scale):.1f}" '
                f'r="{4.5 if bad else 2.5}" fill="{"#ffffff" if bad else color}" '
                f'stroke="{STATUS_COLORS["failed"] if bad else color}" stroke-width="2">'
                f"<title>{_e(tip)}</title></circle>")
    chart = f.svg("durations", "Job durations over time, seconds", "".join(parts))
    legend = [*colors.items(), ("failed or partial run (ring)", STATUS_COLORS["failed"])]
    return chart + _legend(legend)


def _status_order(statuses: Iterable[str]) -> list[str]:
    known = [s for s in STATUS_COLORS if s in statuses]
    return known + sorted(set(statuses) - set(STATUS_COLORS))


def _status_chart(jobs: Sequence[JobStatus]) -> str:
    jobs = [j for j in jobs if sum(j.runs_by_status.values()) > 0]
    if not jobs:
        return _empty("No runs yet.")
    f = _CARD
    statuses = _status_order({s for j in jobs for s, n in j.runs_by_status.items() if n})
    scale = _Scale.for_max(max(sum(j.runs_by_status.values()) for j in jobs), integer=True)
    group, bar, offset = f.bars(len(jobs), 1)
    parts = [f.y_axis(scale, "Runs (count)"), f.x_label("Job")]
    for i, job in enumerate(jobs):
        x = _LEFT + group * i + offset
        below = 0
        for status in statuses:
            n = job.runs_by_status.get(status, 0)
            if not n:
                continue
            y_top, y_bottom = f.y(below + n, scale), f.y(below, scale)
            color = STATUS_COLORS.get(status, _OTHER_STATUS)
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{y_top:.1f}" width="{bar:.1f}" '
                         f'height="{y_bottom - y_top:.1f}" fill="{color}">'
                         f"<title>{_e(f'{job.job}: {n:,} {status}')}</title></rect>")
            below += n
        parts.append(f'<text class="value" x="{x + bar / 2:.1f}" y="{f.y(below, scale) - 4:.1f}" '
                     f'text-anchor="middle">{below:,}</text>')
        middle = _LEFT + group * i + group / 2
        parts.append(f.x_tick(middle, job.job))
        bad = sum(job.runs_by_status.get(s, 0) for s in _FAILED)
        if bad:  # small bars next to an hourly job's tall one: say it in words too
            parts.append(f'<text class="tick bad" x="{middle:.1f}" y="{f.base + 29}" '
                         f'text-anchor="middle">{bad:,} failed/partial</text>')
    chart = f.svg("statuses", "Runs by status per job, count", "".join(parts))
    return chart + _legend((s, STATUS_COLORS.get(s, _OTHER_STATUS)) for s in statuses)


def _grouped_bars(f: _Frame, groups: Sequence[tuple[str, Sequence[int | None]]],
                  series: Sequence[tuple[str, str]], unit: str) -> list[str]:
    """Bars of ``series`` (name, color) side by side for each (label, values) group."""
    scale = _Scale.for_max(max((v or 0) for _, row in groups for v in row), integer=True)
    group, bar, offset = f.bars(len(groups), len(series))
    parts = [f.y_axis(scale, unit)]
    for i, (label, row) in enumerate(groups):
        for k, ((name, color), v) in enumerate(zip(series, row, strict=True)):
            if v is None:
                continue
            x = _LEFT + group * i + offset + bar * k
            y = f.y(v, scale)
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" '
                         f'height="{f.base - y:.1f}" fill="{color}">'
                         f"<title>{_e(f'{label}: {v:,} {name}')}</title></rect>")
            parts.append(f'<text class="value" x="{x + (bar - 2) / 2:.1f}" y="{y - 4:.1f}" '
                         f'text-anchor="middle">{v:,}</text>')
        parts.append(f.x_tick(_LEFT + group * i + group / 2, label))
    return parts


def _tenants_chart(jobs: Sequence[JobStatus]) -> str:
    jobs = [j for j in jobs if j.tenants_expected is not None or j.tenants_processed is not None]
    if not jobs:
        return _empty("No run has reported tenant counts yet.")
    series = (("expected", COLORS["expected"]), ("processed", COLORS["processed"]),
              ("failed", COLORS["tenants_failed"]))
    groups = [(j.job, (j.tenants_expected, j.tenants_processed, j.tenants_failed))
              for j in jobs]
    parts = [*_grouped_bars(_CARD, groups, series, "Tenants (count)"),
             _CARD.x_label("Job (latest run)")]
    chart = _CARD.svg("tenants", "Tenants expected vs processed per job, count", "".join(parts))
    return chart + _legend(series)


def _units_chart(months: Sequence[MonthBilling]) -> str:
    if not months:
        return _empty("No billing months yet.")
    series = (("standard", COLORS["standard"]), ("micro", COLORS["micro"]))
    groups = [(m.period, (m.standard_units, m.micro_units)) for m in months]
    parts = [*_grouped_bars(_CARD, groups, series, "Billed units (count)"),
             _CARD.x_label("Billing month")]
    chart = _CARD.svg("units", "Billed units per month, standard and micro", "".join(parts))
    return chart + _legend(series)


def _coverage_chart(months: Sequence[MonthBilling]) -> str:
    if not months:
        return _empty("No billing months yet.")
    row_h = 34.0
    f = _Frame(w=_CARD.w, h=int(_TOP + row_h * len(months) + _BOTTOM))
    left = 120
    plot_w = f.w - left - _RIGHT
    parts = [f.x_label("Snapshot coverage (% of the month's hours)")]
    for pct in (0, 25, 50, 75, 100):
        x = left + plot_w * pct / 100
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" '
                     f'y2="{f.base}"/>')
        parts.append(f.x_tick(x, f"{pct}%"))
    for i, m in enumerate(months):
        y, h = _TOP + row_h * i + 4, row_h - 8
        share = m.covered_hours / m.hours_in_month if m.hours_in_month else 0.0
        share = min(max(share, 0.0), 1.0)
        label = f"{m.covered_hours:,}/{m.hours_in_month:,} h ({share:.1%})"
        parts.append(f'<text class="tick" x="{left - 8}" y="{y + h / 2 + 4:.1f}" '
                     f'text-anchor="end">{_e(m.period)}</text>')
        parts.append(f'<rect x="{left}" y="{y:.1f}" width="{plot_w:.1f}" height="{h:.1f}" '
                     f'fill="{COLORS["uncovered"]}"/>')
        parts.append(f'<rect class="bar" x="{left}" y="{y:.1f}" width="{plot_w * share:.1f}" '
                     f'height="{h:.1f}" fill="{COLORS["covered"]}">'
                     f"<title>{_e(f'{m.period}: {label}')}</title></rect>")
        parts.append(f'<text class="inbar" x="{left + 6}" y="{y + h / 2 + 4:.1f}">'
                     f"{_e(label)}</text>")
    return f.svg("coverage", "Snapshot coverage of each month, covered hours / hours",
                 "".join(parts))


def _segments(points: Sequence[HourValue]) -> list[list[HourValue]]:
    """``points`` (oldest first) cut where an hour is missing: a gap is drawn as a gap."""
    runs: list[list[HourValue]] = []
    for p in points:
        if runs and _utc(p.hour) - _utc(runs[-1][-1].hour) <= timedelta(hours=1):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _hourly_chart(series: str, label: str, points: Sequence[HourValue], t0: datetime,
                  t1: datetime) -> str:
    """One fleet total per hour from ``t0`` to ``t1``: a line (an area under it) with the
    latest value marked."""
    if not points:
        return _empty(f"No {label.lower()} per hour yet.")
    f, color = _THIRD, COLORS[f"fleet.{series}"]
    span = (t1 - t0).total_seconds()
    scale = _Scale.for_max(max(p.value for p in points), integer=True)

    def x(t: datetime) -> float:
        return _LEFT + f.plot_w * (_utc(t) - t0).total_seconds() / span

    parts = [f.y_axis(scale, f"{label} (count)", _compact), f.x_label("Hour (UTC)")]
    ticks = _time_ticks(t0, t1, most=7)
    whole_days = all(t.hour == 0 for t in ticks)
    day = None
    for t in ticks:
        parts.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_TOP}" '
                     f'y2="{f.base}"/>')
        if whole_days:
            parts.append(f.x_tick(x(t), t.strftime("%m-%d")))
            continue
        parts.append(f.x_tick(x(t), t.strftime("%H:%M")))
        if t.date() != day:  # the date under the first tick of each day
            parts.append(f.x_tick(x(t), t.strftime("%m-%d"), line=1))
            day = t.date()
    for run in _segments(points):
        xy = [(x(p.hour), f.y(p.value, scale)) for p in run]
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
        if len(run) == 1:
            parts.append(f'<circle cx="{xy[0][0]:.1f}" cy="{xy[0][1]:.1f}" r="2" '
                         f'fill="{color}"/>')
            continue
        parts.append(f'<polygon points="{xy[0][0]:.1f},{f.base} {line} {xy[-1][0]:.1f},'
                     f'{f.base}" fill="{color}" fill-opacity="0.12" stroke="none"/>')
        parts.append(f'<polyline class="series" points="{line}" fill="none" stroke="{color}" '
                     f'stroke-width="1.5"/>')
    last = points[-1]
    tip = f"{label}: {last.value:,} at {_when(last.hour)} UTC (latest)"
    parts.append(f'<circle cx="{x(last.hour):.1f}" cy="{f.y(last.value, scale):.1f}" r="4" '
                 f'fill="{color}"><title>{_e(tip)}</title></circle>')
    return f.svg(f"fleet_{series}", f"Fleet {label.lower()} per hour", "".join(parts))


def _capacity(capacity: Mapping[str, Sequence[HourValue]]) -> str:
    hours = [_utc(p.hour) for series, _ in CAPACITY_SERIES for p in capacity.get(series, ())]
    if not hours:
        return _empty("No fleet totals yet: no tenant_hour or tenant_ingested line read.")
    t0, t1 = min(hours), max(hours)  # one time axis for the three charts
    if t1 - t0 < timedelta(hours=2):
        t0, t1 = t0 - timedelta(hours=1), t1 + timedelta(hours=1)
    cells = []
    for series, label in CAPACITY_SERIES:
        points = capacity.get(series, ())
        note = (f"latest {points[-1].value:,} at {_when(points[-1].hour)} UTC"
                if points else "no data")
        cells.append(f'<div class="cell" data-series="{_e(series)}"><h3>{_e(label)}</h3>'
                     f'<p class="note">{_e(note)}</p>{_hourly_chart(series, label, points, t0, t1)}'
                     "</div>")
    return f'<div class="cells">{"".join(cells)}</div>'


Points = Sequence[tuple[datetime, Decimal]]


def _money_lines(name: str, title: str, lines: Sequence[tuple[str, str, Points]],
                 t0: datetime, t1: datetime, currency: str) -> str:
    """Money over ``[t0, t1)`` (a month): one line per ``(label, color, points)``, the
    latest value of each marked. Amounts are plotted as floats (positions only); every
    amount shown as text keeps its Decimal digits."""
    f = _CARD
    span = (t1 - t0).total_seconds()
    top = max((v for _, _, points in lines for _, v in points), default=Decimal(0))
    scale = _Scale.for_max(float(top))

    def x(t: datetime) -> float:
        return _LEFT + f.plot_w * (_utc(t) - t0).total_seconds() / span

    parts = [f.y_axis(scale, f"Projected amount ({currency})", _compact),
             f.x_label("Estimate as of (UTC)")]
    for t in _time_ticks(t0, t1, most=7):
        parts.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_TOP}" '
                     f'y2="{f.base}"/>')
        parts.append(f.x_tick(x(t), t.strftime("%m-%d")))
    for label, color, points in lines:
        if not points:
            continue
        xy = [(x(at), f.y(float(v), scale)) for at, v in points]
        if len(xy) > 1:
            line = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
            parts.append(f'<polyline class="series" points="{line}" fill="none" '
                         f'stroke="{color}" stroke-width="1.5"/>')
        at, v = points[-1]
        tip = f"{label}: {_money(v)} {currency} projected as of {_when(at)} UTC"
        parts.append(f'<circle cx="{xy[-1][0]:.1f}" cy="{xy[-1][1]:.1f}" r="3.5" '
                     f'fill="{color}"><title>{_e(tip)}</title></circle>')
    return f.svg(name, title, "".join(parts)) + _legend((label, color) for label, color, _ in lines)


def _estimates(est: MonthEstimates | None) -> str:
    if est is None or not est.fleet:
        return _empty("No usage estimates stored for this month yet (estimate-usage runs "
                      "hourly).")
    t0, t1 = _utc(est.start), _utc(est.end)
    last_at, last_total = est.fleet[-1]
    note = (f"{est.period}: the fleet's projected bill is {_money(last_total)} {est.currency} "
            f"as of {_when(last_at)} UTC ({len(est.fleet):,} hourly estimates stored).")
    fleet = _money_lines("estimates_fleet", f"Projected bill of the fleet, {est.period}",
                         [("Fleet (sum over tenants)", COLORS["estimate.fleet"], est.fleet)],
                         t0, t1, est.currency)
    colors = [_JOB_PALETTE[i % len(_JOB_PALETTE)] for i in range(len(est.tenants))]
    which = "chosen" if est.chosen else "largest"
    tenants = (_money_lines("estimates_tenants",
                            f"Projected bill of the {which} tenants, {est.period}",
                            [(k, c, pts) for (k, pts), c in zip(est.tenants, colors,
                                                                strict=True)],
                            t0, t1, est.currency)
               if est.tenants else _empty("No tenant estimates."))
    return (f'<p class="note">{_e(note)}</p><div class="cells">'
            f'<div class="cell" data-series="fleet"><h3>Fleet</h3>{fleet}</div>'
            f'<div class="cell" data-series="tenants"><h3>{which.capitalize()} tenants</h3>'
            f"{tenants}</div>"
            "</div>")


# --- tables and tiles -------------------------------------------------------------------------


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], *,
           numeric: Sequence[str] = (), css: str = "", row_css: Sequence[str] = ()) -> str:
    """A table of escaped text; ``row_css`` (when given) is each row's class."""
    head = "".join(f'<th{" class=num" if c in numeric else ""}>{_e(c)}</th>' for c in columns)
    classes = list(row_css) or [""] * len(rows)
    body = "".join(
        (f'<tr class="{_e(tr)}">' if tr else "<tr>") + "".join(
            f'<td{" class=num" if c in numeric else ""}>{_e(v)}</td>'
            for c, v in zip(columns, row, strict=True)) + "</tr>"
        for row, tr in zip(rows, classes, strict=True))
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _amounts_table(months: Sequence[MonthBilling]) -> str:
    if not months:
        return _empty("No billing months yet.")
    rows = [(m.period, m.currency, f"{m.invoices:,}", f"{m.standard_units:,}",
             f"{m.micro_units:,}", _money(m.amount)) for m in months]
    return _table(("Month", "Currency", "Invoices", "Standard units", "Micro units", "Amount"),
                  rows, numeric=("Invoices", "Standard units", "Micro units", "Amount"))


def _top_tenants_table(data: DashboardData) -> str:
    if not data.top_tenants:
        return _empty("No invoices yet.")
    latest = max(data.months, key=lambda m: m.period) if data.months else None
    amount = f"Amount ({latest.currency})" if latest else "Amount"
    rows = [(str(i), tenant, f"{units:,}", _money(value))
            for i, (tenant, units, value) in enumerate(data.top_tenants, start=1)]
    caption = f"<p class=note>Month {_e(latest.period)}.</p>" if latest else ""
    return caption + _table(("#", "Tenant", "Billed units", amount), rows,
                            numeric=("#", "Billed units", amount))


def _failed_table(runs: Sequence[RunFact]) -> str:
    failed = sorted((r for r in runs if r.status in _FAILED),
                    key=lambda r: _utc(r.finished_at), reverse=True)
    if not runs:
        return _empty("No runs yet.")
    if not failed:
        return _empty("No failed or partial runs.")
    shown = failed[:_MAX_FAILED_ROWS]
    rows = [(_when(r.finished_at) + " UTC", r.job, r.status, r.error or "—") for r in shown]
    note = (f"<p class=note>Newest {len(shown)} of {len(failed):,}.</p>"
            if len(failed) > len(shown) else "")
    return _table(("Time", "Job", "Status", "Error"), rows, css="failed") + note


def _count(v: int | None) -> str:
    return "—" if v is None else f"{v:,}"


def _missing(run: RunCompleteness) -> str:
    if run.missing:
        return _signed(-run.missing)
    return "—" if run.expected is None or run.processed is None else "0"


def _completeness_table(runs: Sequence[RunCompleteness]) -> str:
    if not runs:
        return _empty("No run has reported tenant counts yet.")
    short = [r for r in runs if r.missing]
    rows = [(r.job, _when(r.finished_at) + " UTC", r.status, _count(r.expected),
             _count(r.processed), _count(r.failed), _missing(r)) for r in runs]
    note = (f"{len(short):,} of {len(runs):,} runs processed fewer tenants than they expected "
            "(highlighted)." if short else
            f"Each of these {len(runs):,} runs processed every tenant it expected.")
    state = "bad" if short else "ok"
    numeric = ("Expected", "Processed", "Failed", "Missing")
    return (f'<p class="note {state}">{_e(note)}</p>'
            + _table(("Job", "Finished", "Status", *numeric), rows, numeric=numeric,
                     css="completeness", row_css=["short" if r.missing else "" for r in runs]))


def _change(t: TenantGrowth) -> str:
    """Growth relative to the day before; "new" when the tenant had no value then."""
    ratio = t.ratio
    return "new" if ratio is None else f"{float(ratio):+.1%}"


def _growth_table(ranking: GrowthRanking, label: str) -> str:
    when = f"{_when(ranking.hour)} UTC vs {_when(ranking.baseline)} UTC (a day before)"
    head = f'<h3>{_e(label)}</h3><p class="note">{_e(when)}</p>'
    if not ranking.tenants:
        return head + _empty("No tenant grew over the day.")
    rows = [(str(i), t.tenant, f"{t.current:,}", _count(t.previous), _signed(t.growth),
             _change(t)) for i, t in enumerate(ranking.tenants, start=1)]
    numeric = ("#", "Now", "Day before", "Growth", "Change")
    return head + _table(("#", "Tenant", "Now", "Day before", "Growth", "Change"), rows,
                         numeric=numeric, css="growth")


def _growth(rankings: Sequence[GrowthRanking]) -> str:
    if not rankings:
        return _empty("No tenant series yet: no tenant_hour line read.")
    labels = dict(CAPACITY_SERIES)
    cells = "".join(f'<div class="cell" data-series="{_e(r.series)}">'
                    f"{_growth_table(r, labels.get(r.series, r.series))}</div>"
                    for r in rankings)
    return f'<div class="cells">{cells}</div>'


def _ratio(v: Decimal | None) -> str:
    return "—" if v is None else f"{v:,.1f}×"


def _flags_table(noisy: NoisyFlags | None) -> str:
    if noisy is None:
        return _empty("No tenant series yet.")
    since = f"since {_when(noisy.since)} UTC"
    if not noisy.flags:
        return _empty(f"No tenant-hour flagged {since}.")
    rows = [(_when(f.hour) + " UTC", f.tenant, f.series, f"{f.value:,}", _num(float(f.median)),
             _ratio(f.ratio)) for f in noisy.flags]
    numeric = ("Value", "Trailing median", "× median")
    shown = (f"Newest {len(noisy.flags):,} of {noisy.total:,} flagged {since}."
             if noisy.total > len(noisy.flags) else f"{noisy.total:,} flagged {since}.")
    return (f'<p class="note">{_e(shown)}</p>'
            + _table(("Hour", "Tenant", "Series", *numeric), rows, numeric=numeric,
                     css="flags"))


def _job_tiles(jobs: Sequence[JobStatus]) -> str:
    if not jobs:
        return ""
    tiles = []
    for j in jobs:
        status = j.last_status or "never run"
        color = STATUS_COLORS.get(j.last_status or "", _OTHER_STATUS)
        tiles.append(
            f'<div class="tile"><div class="tile-name">{_e(j.job)}</div>'
            f'<div class="badge" style="background:{color}">{_e(status)}</div>'
            f'<div class="tile-meta">last success {_e(_when(j.last_success))} UTC · '
            f'last duration {_e(_seconds(j.last_duration_s))}</div></div>')
    return f'<div class="tiles">{"".join(tiles)}</div>'


def _malformed(n: int) -> str:
    state = "bad" if n else "ok"
    note = "log lines could not be parsed" if n else "every log line parsed"
    return (f'<p class="stat {state}"><span class="stat-value">{n:,}</span> '
            f'<span class="stat-unit">lines</span> — {note}</p>')


# --- page -------------------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;padding:24px;background:#f5f6f8;color:#1f2328;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{display:flex;align-items:baseline;gap:16px;margin-bottom:16px}
h1{font-size:22px;margin:0}
h2{font-size:15px;margin:0 0 4px}
h3{font-size:13px;margin:4px 0 0}
.sub{color:#57606a;font-size:12px;margin:0 0 8px}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 16px}
section.wide{grid-column:1/-1}
svg.chart{width:100%;height:auto;display:block}
svg .grid{stroke:#e6e8eb;stroke-width:1}
svg .axis{stroke:#57606a;stroke-width:1}
svg text{font-size:11px;fill:#57606a}
svg .axis-label{font-size:12px;fill:#1f2328;font-weight:600}
svg .value{font-size:10px;fill:#1f2328}
svg .inbar{font-size:11px;fill:#1f2328;font-weight:600;stroke:#fff;stroke-width:3px;
 paint-order:stroke}
svg .bad{fill:#d62728;font-weight:600}
.legend{list-style:none;margin:6px 0 0;padding:0;display:flex;flex-wrap:wrap;gap:12px;
 font-size:12px;color:#57606a}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{color:#57606a;font-weight:600;white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums}
table.failed td:last-child{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
 word-break:break-word}
.cells{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:8px 24px}
.cell{min-width:0}
tr.short td{background:SHORT}
tr.short td:last-child{color:#b42318;font-weight:700}
.note.bad{color:#b42318;font-weight:600}
.empty{color:#57606a;font-style:italic;margin:24px 0;text-align:center}
.note{color:#57606a;font-size:12px;margin:4px 0}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:16px}
.tile{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;
 min-width:230px}
.tile-name{font-weight:600}
.tile-meta{color:#57606a;font-size:12px}
.badge{display:inline-block;color:#fff;border-radius:10px;padding:0 8px;font-size:12px;
 margin:4px 0;font-weight:600}
.stat{margin:8px 0;font-size:14px;color:#57606a}
.stat-value{font-size:28px;font-weight:700;color:#1f2328}
.stat.bad .stat-value{color:#d62728}
#errors{color:#d62728;white-space:pre-wrap}
#errors:empty{display:none}
""".replace("SHORT", COLORS["short"])

# Records script errors and blocked loads before anything else runs.
_HEAD_SCRIPT = """
window.__errors=[];
function __report(m){var e=document.getElementById("errors");
 if(e){e.textContent+=m+"\\n";}else{window.__errors.push(m);}}
window.onerror=function(m,s,l,c){__report("error: "+m+" at "+l+":"+c);};
document.addEventListener("securitypolicyviolation",function(ev){
 __report("blocked: "+ev.violatedDirective+" "+ev.blockedURI);});
"""

# Marks the page rendered: data-rendered = the number of charts laid out with shapes in them.
_TAIL_SCRIPT = """
try{
 window.__errors.forEach(__report);
 var n=0;document.querySelectorAll("svg.chart").forEach(function(s){
  var r=s.getBoundingClientRect();
  if(r.width>0&&r.height>0&&s.querySelectorAll("rect,circle,polyline").length>0){n++;}});
 document.body.setAttribute("data-rendered",String(n));
}catch(err){__report("error: "+err);}
"""

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:; base-uri 'none'; form-action 'none'")


def _section(title: str, sub: str, body: str, *, wide: bool = False) -> str:
    css = ' class="wide"' if wide else ""
    return (f'<section{css} data-section="{_e(title)}"><h2>{_e(title)}</h2>'
            f'<p class="sub">{_e(sub)}</p>{body}</section>')


def render(data: DashboardData) -> str:
    """The whole dashboard as one self-contained HTML page."""
    bodies = (  # (subtitle, body, full width), in the order of SECTION_TITLES
        ("Seconds per finished run, by job, over time.", _durations_chart(data.runs), True),
        ("Finished runs per job, stacked by status.", _status_chart(data.jobs), False),
        ("Tenants each job expected, processed and failed in its latest run.",
         _tenants_chart(data.jobs), False),
        ("The latest runs of each job that reports tenant counts, newest first; runs that "
         "processed fewer tenants than expected are highlighted.",
         _completeness_table(data.completeness), True),
        ("Fleet totals per hour (sums over tenants) over the last two weeks stored: hosts and "
         "metrics of the snapshotted hours, posts ingested.", _capacity(data.capacity), True),
        ("Tenants whose latest hour grew most over the same hour a day before (a tenant with "
         "no value then counts from 0), largest growth first.", _growth(data.growth), True),
        ("Tenant-hours whose hosts or metrics jumped to k times the tenant's trailing median "
         "(HOSTMETER_NOISY_FACTOR), newest first.", _flags_table(data.noisy), True),
        ("Hours with usage snapshots / hours in the month.", _coverage_chart(data.months),
         False),
        ("Standard and micro units on the latest invoice revisions.",
         _units_chart(data.months), False),
        ("Totals of the latest revisions, not void.", _amounts_table(data.months), False),
        ("Standard + micro units of the latest month, largest first.",
         _top_tenants_table(data), False),
        ("Month-to-date estimates carried to the month's end (estimate-usage, hourly): the "
         "fleet's projected total per hour and the largest tenants' by their latest "
         "projection.", _estimates(data.estimates), True),
        ("Runs that finished failed or partial, newest first.", _failed_table(data.runs), True),
        ("Job log lines the metrics store could not read.", _malformed(data.malformed_lines),
         False),
    )
    sections = [_section(title, sub, body, wide=wide)
                for title, (sub, body, wide) in zip(SECTION_TITLES, bodies, strict=True)]
    generated = _when(data.generated_at)
    runs = f"{len(data.runs):,} runs" if data.runs else "no runs yet"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>hostmeter — jobs and billing</title>"
        f"<style>{_CSS}</style><script>{_HEAD_SCRIPT}</script></head>"
        "<body><header><h1>hostmeter — jobs and billing</h1>"
        f'<span class="sub">generated {_e(generated)} UTC · {_e(runs)}</span></header>'
        '<pre id="errors"></pre>'
        f"{_job_tiles(data.jobs)}"
        f'<main class="grid2">{"".join(sections)}</main>'
        f"<script>{_TAIL_SCRIPT}</script></body></html>\n"
    )


def write(path: str | Path, data: DashboardData) -> Path:
    """Render the page into ``path`` (UTF-8) and return the path."""
    target = Path(path)
    target.write_text(render(data), encoding="utf-8")
    return target


class DashboardServer(ThreadingHTTPServer):
    """The dashboard's HTTP server, serving on its own daemon thread."""

    daemon_threads = True
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def serve(port: int, build: Callable[[], DashboardData], host: str = "127.0.0.1",
          ) -> tuple[DashboardServer, int]:
    """Serve the page at ``/`` on a background thread; every request calls ``build`` afresh.

    Returns the running server and its bound port (pass ``port=0`` for any free one). Stop it
    with ``server.stop()``; to block until it stops, ``server.thread.join()``.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/", "/index.html"):
                self.send_error(404)
                return
            try:
                body = render(build()).encode("utf-8")
            except Exception as exc:
                log.exception("dashboard_render_failed", error=str(exc))
                self.send_error(500, "dashboard could not be rendered")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy", _CSP)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("dashboard_request", line=format % args)

    server = DashboardServer((host, port), Handler)
    server.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                     name="dashboard", daemon=True)
    server.thread.start()
    log.info("dashboard_serving", host=host, port=server.port)
    return server, server.port
