"""Plots as inline SVG text: line curves, bars with intervals and labelled scatters.

Written out by hand rather than through matplotlib so that a report is one self-contained file that
renders in any browser and prints sharp, and so that building it loads no plotting library. Every
label passes through :func:`html.escape`: run and method names come from files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

# Okabe-Ito: distinguishable by colour-blind readers and in greyscale print.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
WIDTH, HEIGHT = 340, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 28, 40


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _finite(*values: float) -> bool:
    return all(isinstance(value, int | float) and math.isfinite(value) for value in values)


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(factor * power for factor in (1, 2, 5, 10) if factor * power >= raw)
    first = math.floor(low / step) * step
    return [first + index * step for index in range(math.ceil((high - first) / step - 1e-9) + 1)]


def tick_label(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e4 or magnitude < 1e-3:
        return f"{value:.0e}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Frame:
    """A plot area mapping data ranges onto pixels, y upwards."""

    x_low: float
    x_high: float
    y_low: float
    y_high: float
    width: int = WIDTH
    height: int = HEIGHT

    def x(self, value: float) -> float:
        span = (self.x_high - self.x_low) or 1.0
        return LEFT + (value - self.x_low) / span * (self.width - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = (self.y_high - self.y_low) or 1.0
        return self.height - BOTTOM - (value - self.y_low) / span * (self.height - TOP - BOTTOM)


def _range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        return low - (abs(low) * 0.1 or 1.0), high + (abs(high) * 0.1 or 1.0)
    margin = (high - low) * pad
    return low - margin, high + margin


def _text(x: float, y: float, text: str, *, anchor: str = "middle", size: int = 10, extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{escape(text)}</text>"
    )


def _canvas(title: str, body: list[str], width: int = WIDTH, height: int = HEIGHT) -> str:
    return (
        f'<svg class="plot" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" '
        f'font-family="sans-serif"><title>{escape(title)}</title>'
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>'
        + _text(width / 2, 16, title, size=11, extra=' font-weight="bold"')
        + "".join(body)
        + "</svg>"
    )


def _axes(frame: Frame, x_ticks: Sequence[float] | None, x_label: str, y_label: str) -> list[str]:
    """Frame, y grid with labels, x ticks (None: the caller labels x) and both axis titles."""
    bottom, right = frame.height - BOTTOM, frame.width - RIGHT
    parts = [
        f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" '
        'fill="none" stroke="#888888" stroke-width="0.8"/>'
    ]
    for value in ticks(frame.y_low, frame.y_high):
        if frame.y_low <= value <= frame.y_high:
            y = frame.y(value)
            parts.append(f'<line x1="{LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
            parts.append(_text(LEFT - 4, y + 3, tick_label(value), anchor="end", size=9))
    for value in x_ticks or ():
        if frame.x_low <= value <= frame.x_high:
            x = frame.x(value)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 3}" stroke="#888888"/>'
            )
            parts.append(_text(x, bottom + 13, tick_label(value), size=9))
    parts.append(_text((LEFT + right) / 2, frame.height - 6, x_label, size=10))
    middle = (TOP + bottom) / 2
    parts.append(_text(12, middle, y_label, size=10, extra=f' transform="rotate(-90 12 {middle:.1f})"'))
    return parts


def _no_data(title: str, detail: str = "no data recorded") -> str:
    return _canvas(title, [_text(WIDTH / 2, HEIGHT / 2, detail, size=10, extra=' fill="#888888"')])


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    """Swatches and names on a white panel, so that a curve under it does not hide them."""
    width = 22 + 6 * max(len(name) for name in names)
    parts = [
        f'<rect x="{x - 3:.1f}" y="{y - 11:.1f}" width="{width}" height="{12 * len(names) + 4}" '
        'fill="#ffffff" fill-opacity="0.85" stroke="#dddddd"/>'
    ]
    for index, name in enumerate(names):
        row = y + 12 * index
        parts.append(f'<rect x="{x:.1f}" y="{row - 5:.1f}" width="10" height="3" fill="{colour(index)}"/>')
        parts.append(_text(x + 14, row, name, anchor="start", size=9))
    return parts


def line_chart(
    title: str, series: Mapping[str, Sequence[tuple[float, float]]], x_label: str, y_label: str = ""
) -> str:
    """One polyline per named series of (x, y) points; non-finite points are left out."""
    clean = {name: [(x, y) for x, y in points if _finite(x, y)] for name, points in series.items()}
    clean = {name: points for name, points in clean.items() if points}
    if not clean:
        return _no_data(title)
    xs = [x for points in clean.values() for x, _ in points]
    ys = [y for points in clean.values() for _, y in points]
    frame = Frame(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, *_range(ys))
    parts = _axes(frame, ticks(frame.x_low, frame.x_high), x_label, y_label)
    for index, points in enumerate(clean.values()):
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour(index)}" stroke-width="1.6"/>')
        if len(points) == 1:
            x, y = points[0]
            parts.append(
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.5" fill="{colour(index)}"/>'
            )
    if len(clean) > 1:
        parts += _legend(list(clean), LEFT + 6, TOP + 12)
    return _canvas(title, parts)


@dataclass(frozen=True)
class Bar:
    """One bar: a value with its interval (NaN ends: no whisker)."""

    label: str
    value: float
    low: float = math.nan
    high: float = math.nan


def bar_chart(
    title: str, bars: Sequence[Bar], y_label: str = "", y_range: tuple[float, float] | None = None
) -> str:
    """One bar per label, in palette order, each with its interval as a whisker; a bar without a
    finite value is marked n/a."""
    values = [value for bar in bars for value in (bar.value, bar.low, bar.high) if _finite(value)]
    if not values:
        return _no_data(title)
    low, high = y_range or (min(0.0, *values), max(values) * 1.08 or 1.0)
    frame = Frame(0, len(bars), low, high)
    parts = _axes(frame, None, "", y_label)
    slot = (frame.width - LEFT - RIGHT) / len(bars)
    for index, bar in enumerate(bars):
        centre = LEFT + slot * (index + 0.5)
        parts.append(_text(centre, frame.height - BOTTOM + 13, bar.label, size=9))
        if not _finite(bar.value):
            parts.append(_text(centre, frame.y(low) - 4, "n/a", size=9, extra=' fill="#888888"'))
            continue
        top, base = frame.y(bar.value), frame.y(max(low, 0.0))
        parts.append(
            f'<rect x="{centre - slot * 0.3:.1f}" y="{min(top, base):.1f}" width="{slot * 0.6:.1f}" '
            f'height="{abs(base - top):.1f}" fill="{colour(index)}"/>'
        )
        if _finite(bar.low, bar.high):
            y1, y2 = frame.y(bar.low), frame.y(bar.high)
            parts.append(
                f'<path d="M{centre:.1f},{y1:.1f}V{y2:.1f}M{centre - 4:.1f},{y1:.1f}h8'
                f'M{centre - 4:.1f},{y2:.1f}h8" stroke="#333333" stroke-width="1" fill="none"/>'
            )
    return _canvas(title, parts)


@dataclass(frozen=True)
class Point:
    """A labelled scatter point; ``ringed`` marks it (the Pareto front), ``shade`` in [0, 1] colours
    it from light to dark (None: the palette colour of its index)."""

    label: str
    x: float
    y: float
    ringed: bool = False
    shade: float | None = None


def _shade(value: float) -> str:
    """Light yellow (0) to dark blue (1)."""
    start, end = (0xF0, 0xE4, 0x42), (0x1F, 0x2A, 0x6B)
    fraction = min(1.0, max(0.0, value))
    return "#" + "".join(f"{round(a + (b - a) * fraction):02x}" for a, b in zip(start, end, strict=True))


def scatter_chart(
    title: str,
    points: Sequence[Point],
    x_label: str,
    y_label: str,
    shade_label: str = "",
    y_range: tuple[float, float] | None = None,
) -> str:
    """Labelled points; points without finite coordinates are listed under the plot instead."""
    shown = [point for point in points if _finite(point.x, point.y)]
    missing = [point.label for point in points if point not in shown]
    if not shown:
        return _no_data(title, "not shown (a value is missing): " + ", ".join(missing))
    width, height = 480, 320
    frame = Frame(
        *_range([p.x for p in shown], 0.12),
        *(y_range or _range([p.y for p in shown], 0.12)),
        width=width,
        height=height,
    )
    parts = _axes(frame, ticks(frame.x_low, frame.x_high), x_label, y_label)
    for index, point in enumerate(shown):
        x, y = frame.x(point.x), frame.y(point.y)
        fill = colour(index) if point.shade is None else _shade(point.shade)
        if point.ringed:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#C0143C" stroke-width="1.5"/>'
            )
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="#333333" stroke-width="0.6"/>'
        )
        left = x > (LEFT + width - RIGHT) / 2
        parts.append(
            _text(
                x + (-11 if left else 11),
                y - 6 - 10 * (index % 2),
                point.label,
                anchor="end" if left else "start",
                size=9,
            )
        )
    notes = []
    if shade_label:
        notes.append(f"colour: {shade_label} (light = low, dark = high)")
    if any(point.ringed for point in shown):
        notes.append("ringed: Pareto front")
    if missing:
        notes.append("not shown (a value is missing): " + ", ".join(missing))
    parts += [
        _text(LEFT, height + 12 * (index + 1) - 2, note, anchor="start", size=9)
        for index, note in enumerate(notes)
    ]
    return _canvas(title, parts, width, height + 12 * len(notes) + 4)
