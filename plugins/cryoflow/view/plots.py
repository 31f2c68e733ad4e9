"""Server-rendered SVG plots for the session view: nothing to load from anywhere, readable at a
glance, each with the session's thresholds drawn and the region beyond them shaded.

Input is what :mod:`cryoflow.view.queries` returns (downsampled series, histograms, hourly
rates); output is an ``<svg>`` string. Every text is escaped.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape
from typing import Any

WIDTH, HEIGHT = 460, 200
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 52, 12, 36, 30

MEAN = "#1f5fa8"
BAND = "#9dbde3"
THRESHOLD = "#c0392b"
BEYOND = "#f6d5d1"
AXIS = "#555"
GRID = "#e3e3e3"
RATE_COLOURS = {
    "acquired": "#222222",
    "copied": "#7f7f7f",
    "motioncor": "#1f77b4",
    "ctf": "#2ca02c",
    "picking": "#d62728",
}


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10000:
        return f"{value / 1000:g}k"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.3g}"


def _time_ticks(t0: float, t1: float, n: int = 5) -> list[tuple[float, str]]:
    """Ticks at whole minutes/hours/days over [t0, t1] (ms since the epoch), labelled in UTC."""
    span = max(t1 - t0, 60_000.0)
    steps_min = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080)
    step = next((s for s in steps_min if s * 60_000 * n >= span), steps_min[-1]) * 60_000
    first = math.ceil(t0 / step) * step
    ticks = []
    value = float(first)
    while value <= t1:
        when = datetime.fromtimestamp(value / 1000, UTC)
        label = when.strftime("%H:%M") if step < 86_400_000 else when.strftime("%d %b")
        if step < 86_400_000 and when.hour == 0 and when.minute == 0:
            label = when.strftime("%d %b")
        ticks.append((value, label))
        value += step
    return ticks


class _Frame:
    """The plot area and the linear maps of its two axes."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, width: int, height: int):
        self.width, self.height = width, height
        self.left, self.right = MARGIN_L, width - MARGIN_R
        self.top, self.bottom = MARGIN_T, height - MARGIN_B
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def y(self, v: float) -> float:
        return self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)


def _svg(
    width: int, height: int, title: str, body: list[str], label: str, subtitle: str = ""
) -> str:
    sub = (
        f'<text x="{MARGIN_L}" y="27" font-size="10" fill="{AXIS}" class="plot-subtitle">'
        f"{escape(subtitle)}</text>"
        if subtitle
        else ""
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(label)}" '
        f'class="plot">'
        f'<title>{escape(label)}</title>'
        f'<text x="{MARGIN_L}" y="13" class="plot-title" font-size="12" font-weight="600">'
        f"{escape(title)}</text>{sub}" + "".join(body) + "</svg>"
    )


def _y_axis(f: _Frame, ticks: list[float], unit: str) -> list[str]:
    out = []
    for t in ticks:
        y = f.y(t)
        if f.top - 0.5 <= y <= f.bottom + 0.5:
            out.append(
                f'<line x1="{f.left}" x2="{f.right}" y1="{y:.1f}" y2="{y:.1f}" '
                f'stroke="{GRID}" stroke-width="1"/>'
                f'<text x="{f.left - 4}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end" '
                f'fill="{AXIS}">{escape(_fmt(t))}</text>'
            )
    if unit:
        out.append(
            f'<text x="{f.left - 4}" y="{f.top - 6}" font-size="10" text-anchor="end" '
            f'fill="{AXIS}">{escape(unit)}</text>'
        )
    out.append(
        f'<rect x="{f.left}" y="{f.top}" width="{f.right - f.left}" '
        f'height="{f.bottom - f.top}" fill="none" stroke="{AXIS}" stroke-width="1"/>'
    )
    return out


def _x_labels(f: _Frame, ticks: list[tuple[float, str]]) -> list[str]:
    out = []
    for value, label in ticks:
        x = f.x(value)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.bottom}" y2="{f.bottom + 4}" '
            f'stroke="{AXIS}"/><text x="{x:.1f}" y="{f.bottom + 15}" font-size="10" '
            f'text-anchor="middle" fill="{AXIS}">{escape(label)}</text>'
        )
    return out


def _thresholds_h(f: _Frame, low: float | None, high: float | None, unit: str) -> list[str]:
    """Horizontal threshold lines, the region beyond each shaded (drawn under the data)."""
    out = []
    for value, beyond_top in ((high, True), (low, False)):
        if value is None or not (f.y0 <= value <= f.y1):
            continue
        y = f.y(value)
        top, bottom = (f.top, y) if beyond_top else (y, f.bottom)
        out.append(
            f'<rect x="{f.left}" y="{top:.1f}" width="{f.right - f.left}" '
            f'height="{max(0.0, bottom - top):.1f}" fill="{BEYOND}" class="beyond"/>'
        )
    for value, name in ((high, "max"), (low, "min")):
        if value is None or not (f.y0 <= value <= f.y1):
            continue
        y = f.y(value)
        out.append(
            f'<line x1="{f.left}" x2="{f.right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{THRESHOLD}" stroke-width="1.5" stroke-dasharray="5,3" '
            f'class="threshold" data-threshold="{name}" data-value="{value:g}"/>'
            f'<text x="{f.right - 3}" y="{y - 3:.1f}" font-size="10" text-anchor="end" '
            f'fill="{THRESHOLD}">{name} {escape(_fmt(value))} {escape(unit)}</text>'
        )
    return out


def _empty(title: str, label: str, width: int, height: int, why: str) -> str:
    return _svg(width, height, title, [
        f'<text x="{width / 2}" y="{height / 2}" font-size="12" text-anchor="middle" '
        f'fill="{AXIS}">{escape(why)}</text>'
    ], label)  # fmt: skip


def series_svg(metric: dict[str, Any], *, width: int = WIDTH, height: int = HEIGHT) -> str:
    """The metric over acquisition time: the bucket means as a line, each bucket's min..max as a
    band, the thresholds as dashed lines with the region beyond them shaded."""
    title = f"{metric['title']} over time"
    label = f"{metric['title']} per micrograph over acquisition time"
    s = metric["series"]
    if not s["t"]:
        return _empty(title, label, width, height, "no results yet")
    lo_v = min(s["min"])
    hi_v = max(s["max"])
    hist = metric.get("histogram") or {}
    edges = hist.get("edges") or []
    if edges:  # the histogram's robust range: a wild outlier must not flatten the rest
        lo_v, hi_v = max(lo_v, edges[0]), min(hi_v, edges[-1])
    for thr in (metric.get("low"), metric.get("high")):
        if thr is not None:
            lo_v, hi_v = min(lo_v, thr), max(hi_v, thr)
    pad = (hi_v - lo_v) * 0.05 or 1.0
    lo_v = max(0.0, lo_v - pad) if lo_v >= 0 else lo_v - pad
    hi_v += pad
    t0, t1 = float(s["t"][0]), float(s["t"][-1])
    if t1 <= t0:
        t0, t1 = t0 - 60_000, t1 + 60_000
    f = _Frame(t0, t1, lo_v, hi_v, width, height)
    clamp = lambda v: min(max(v, lo_v), hi_v)  # noqa: E731
    body = _thresholds_h(f, metric.get("low"), metric.get("high"), metric["unit"])
    body += _y_axis(f, nice_ticks(lo_v, hi_v), metric["unit"])
    body += _x_labels(f, _time_ticks(t0, t1))
    if len(s["t"]) > 1 and any(n > 1 for n in s["n"]):
        upper = " ".join(
            f"{f.x(t):.1f},{f.y(clamp(v)):.1f}" for t, v in zip(s["t"], s["max"], strict=True)
        )
        lower = " ".join(
            f"{f.x(t):.1f},{f.y(clamp(v)):.1f}"
            for t, v in zip(reversed(s["t"]), reversed(s["min"]), strict=True)
        )
        body.append(
            f'<polygon points="{upper} {lower}" fill="{BAND}" fill-opacity="0.55" '
            f'stroke="none" class="band"/>'
        )
    points = " ".join(
        f"{f.x(t):.1f},{f.y(clamp(v)):.1f}" for t, v in zip(s["t"], s["mean"], strict=True)
    )
    if len(s["t"]) > 1:
        body.append(
            f'<polyline points="{points}" fill="none" stroke="{MEAN}" stroke-width="1.2" '
            f'class="mean" data-points="{len(s["t"])}"/>'
        )
    if len(s["t"]) <= 200:
        body += [
            f'<circle cx="{f.x(t):.1f}" cy="{f.y(clamp(v)):.1f}" r="1.8" fill="{MEAN}"/>'
            for t, v in zip(s["t"], s["mean"], strict=True)
        ]
    n = sum(s["n"])
    per = "one point per micrograph" if len(s["t"]) == n else f"{len(s['t'])} points"
    subtitle = f"{n} micrographs, {per}; mean line, min-max band; UTC"
    return _svg(width, height, title, body, label, subtitle)


def histogram_svg(metric: dict[str, Any], *, width: int = 300, height: int = HEIGHT) -> str:
    """The metric's histogram with the thresholds as vertical dashed lines, the bars beyond them
    in the threshold colour, and how many micrographs lie beyond."""
    h = metric["histogram"]
    title = f"{metric['title']}"
    label = f"Histogram of {metric['title']}"
    if not h["n"] or not h["edges"]:
        return _empty(title, label, width, height, "no results yet")
    edges, counts = h["edges"], h["counts"]
    top = max(counts) or 1
    f = _Frame(edges[0], edges[-1], 0, top * 1.08, width, height)
    low, high = metric.get("low"), metric.get("high")
    body = _y_axis(f, nice_ticks(0, top * 1.08, 4), "")
    xt = [(t, _fmt(t)) for t in nice_ticks(edges[0], edges[-1], 5) if edges[0] <= t <= edges[-1]]
    body += _x_labels(f, xt)
    for i, c in enumerate(counts):
        if not c:
            continue
        a, b = edges[i], edges[i + 1]
        mid = (a + b) / 2
        out = (low is not None and mid < low) or (high is not None and mid > high)
        x0, x1 = f.x(a), f.x(b)
        y = f.y(c)
        body.append(
            f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(0.8, x1 - x0 - 0.6):.1f}" '
            f'height="{f.bottom - y:.1f}" fill="{THRESHOLD if out else MEAN}" '
            f'fill-opacity="{0.75 if out else 0.85}" class="bar"><title>'
            f"{_fmt(a)}–{_fmt(b)} {escape(metric['unit'])}: {c}</title></rect>"
        )
    for value, name in ((low, "min"), (high, "max")):
        if value is None or not (edges[0] <= value <= edges[-1]):
            continue
        x = f.x(value)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{f.bottom}" '
            f'stroke="{THRESHOLD}" stroke-width="1.5" stroke-dasharray="5,3" '
            f'class="threshold" data-threshold="{name}" data-value="{value:g}"/>'
        )
    beyond = h["under_low"] + h["over_high"]
    share = 100.0 * beyond / h["n"]
    unit = f" {metric['unit']}" if metric["unit"] else ""
    median = _fmt(h["median"]) if h["median"] is not None else "-"
    outside = ""
    if h["below"] or h["above"]:
        outside = f" · {h['below'] + h['above']} off the axis"
    subtitle = f"median {median}{unit} · {beyond} beyond ({share:.1f} %){outside}"
    return _svg(width, height, title, body, label, subtitle)


def rates_svg(
    hourly: dict[str, list[int]], *, width: int = 760, height: int = 210, title: str = ""
) -> str:
    """Movies per hour, hour by hour: acquisition as bars, copy and each step as lines."""
    title = title or "Movies per hour: acquired (bars) against copied and processed (lines)"
    label = "Movies per hour over the session"
    hours = hourly.get("t") or []
    if not hours:
        return _empty(title, label, width, height, "no movies yet")
    keys = [k for k in RATE_COLOURS if k in hourly]
    top = max([max(hourly[k] or [0]) for k in keys] + [1])
    t0, t1 = hours[0], hours[-1] + 3_600_000
    f = _Frame(t0, t1, 0, top * 1.1, width, height)
    body = _y_axis(f, nice_ticks(0, top * 1.1, 4), "/h")
    body += _x_labels(f, _time_ticks(t0, t1, 8))
    bar_w = max(1.0, f.x(t0 + 3_600_000) - f.x(t0) - 1)
    for t, n in zip(hours, hourly.get("acquired", []), strict=False):
        if n:
            body.append(
                f'<rect x="{f.x(t):.1f}" y="{f.y(n):.1f}" width="{bar_w:.1f}" '
                f'height="{f.bottom - f.y(n):.1f}" fill="#d9d9d9" class="bar">'
                f"<title>{n} acquired</title></rect>"
            )
    legend_x = f.left + 4
    for k in keys:
        if k == "acquired":
            continue
        pts = " ".join(
            f"{f.x(t + 1_800_000):.1f},{f.y(n):.1f}"
            for t, n in zip(hours, hourly[k], strict=False)
        )
        body.append(
            f'<polyline points="{pts}" fill="none" stroke="{RATE_COLOURS[k]}" '
            f'stroke-width="1.6" class="rate" data-series="{k}"/>'
        )
        # a mark per hour: a session of one hour is one point, which a line alone never shows
        body += [
            f'<circle cx="{f.x(t + 1_800_000):.1f}" cy="{f.y(n):.1f}" r="2.5" '
            f'fill="{RATE_COLOURS[k]}" class="rate-point"><title>{n} {escape(k)}</title></circle>'
            for t, n in zip(hours, hourly[k], strict=False)
        ]
    for k in keys:
        body.append(
            f'<rect x="{legend_x}" y="{f.top + 4}" width="10" height="10" '
            f'fill="{"#d9d9d9" if k == "acquired" else RATE_COLOURS[k]}"/>'
            f'<text x="{legend_x + 13}" y="{f.top + 13}" font-size="10">{escape(k)}</text>'
        )
        legend_x += 18 + 7 * len(k)
    return _svg(width, height, title, body, label)


__all__ = ["histogram_svg", "nice_ticks", "rates_svg", "series_svg"]
