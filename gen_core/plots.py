"""Small PNG line charts drawn with Pillow (no matplotlib), and TensorBoard scalar reading.

Enough for training curves in reports: several series, axes with a few labelled ticks, a legend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gen_core.io import atomic_path

COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


MARGINS = (70, 20, 34, 50)  # left, right, top, bottom of a chart's plotting area, in pixels


def _canvas(size: tuple[int, int]):
    """A white picture, its drawing context and the default font."""
    img = Image.new("RGB", size, "white")
    return img, ImageDraw.Draw(img), ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _label_and_save(
    img: Image.Image,
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    left: int,
    ylabel_y: int,
) -> Path:
    """Draw the title and axis labels, then write the PNG atomically."""
    d, font, (W, H) = ImageDraw.Draw(img), ImageFont.load_default(), img.size
    d.text((left, 10), title, fill="black", font=font)
    d.text(((W - len(xlabel) * 6) // 2, H - 20), xlabel, fill="black", font=font)
    d.text((4, ylabel_y), ylabel, fill="black", font=font)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path


def line_chart(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Write a PNG with one line per named (xs, ys) series; returns the path."""
    img, d, font = _canvas(size)
    (W, H), (left, right, top, bottom) = size, MARGINS
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        d.text((left, H // 2), "no data", fill="black", font=font)
    else:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y0, y1 = y0 - 1, y1 + 1
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def px(x: float, y: float) -> tuple[float, float]:
            return (
                left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom),
            )

        for t in _nice_ticks(y0, y1):
            _, yy = px(x0, t)
            d.line([(left, yy), (W - right, yy)], fill=(230, 230, 230))
            d.text((4, yy - 6), _fmt(t), fill="black", font=font)
        for t in _nice_ticks(x0, x1):
            xx, _ = px(t, y0)
            d.line([(xx, H - bottom), (xx, H - bottom + 4)], fill="black")
            d.text((xx - 10, H - bottom + 6), _fmt(t), fill="black", font=font)
        d.rectangle([left, top, W - right, H - bottom], outline="black")
        for i, (name, (xs, ys)) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            pts = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for p in pts if len(pts) <= 40 else []:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
            d.rectangle([left + 10, top + 8 + 14 * i, left + 22, top + 16 + 14 * i], fill=colour)
            d.text((left + 26, top + 6 + 14 * i), name, fill="black", font=font)
    return _label_and_save(img, path, title, xlabel, ylabel, left, ylabel_y=18)


def read_scalars(tb_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series in a TensorBoard log folder: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def scatter_chart(
    path: str | Path,
    points: dict[str, tuple[float, float]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    diagonal: bool = True,
    size: tuple[int, int] = (640, 480),
) -> Path:
    """Write a PNG of labelled (x, y) points on equal axes, with the y = x line if `diagonal`."""
    W, H = size
    left, right, top, bottom = 70, 30, 40, 50
    values = [v for xy in points.values() for v in xy if math.isfinite(v)] or [0.0]
    lo, hi = min(values), max(values)
    pad = 0.08 * ((hi - lo) or 1.0)
    lo, hi = lo - pad, hi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - lo) / (hi - lo) * (W - left - right),
            H - bottom - (y - lo) / (hi - lo) * (H - top - bottom),
        )

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for t in _nice_ticks(lo, hi):
        xx, yy = px(t, t)
        d.line([(left, yy), (W - right, yy)], fill=(232, 232, 232))
        d.line([(xx, top), (xx, H - bottom)], fill=(232, 232, 232))
        d.text((4, yy - 6), _fmt(t), fill="black", font=font)
        d.text((xx - 10, H - bottom + 6), _fmt(t), fill="black", font=font)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    if diagonal:
        d.line([px(lo, lo), px(hi, hi)], fill=(160, 160, 160), width=1)
    for i, (name, (x, y)) in enumerate(points.items()):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        cx, cy = px(x, y)
        colour = COLOURS[i % len(COLOURS)]
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        d.text((cx + 6, cy - 6), name, fill=colour, font=font)
    return _label_and_save(img, path, title, xlabel, ylabel, left, ylabel_y=24)


def histogram_chart(
    path: str | Path,
    values: Sequence[float],
    bins: int = 20,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "count",
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Write a PNG histogram of `values` in `bins` equal bins; returns the path."""
    img, d, font = _canvas(size)
    (W, H), (left, right, top, bottom) = size, MARGINS
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        d.text((left, H // 2), "no data", fill="black", font=font)
        return _label_and_save(img, path, title, xlabel, ylabel, left, ylabel_y=18)
    lo, hi = min(vals), max(vals)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    top_count = max(counts)

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - lo) / (hi - lo) * (W - left - right),
            H - bottom - y / top_count * (H - top - bottom),
        )

    for t in _nice_ticks(0, top_count):
        _, yy = px(lo, t)
        d.line([(left, yy), (W - right, yy)], fill=(230, 230, 230))
        d.text((4, yy - 6), _fmt(t), fill="black", font=font)
    for t in _nice_ticks(lo, hi):
        xx, _ = px(t, 0)
        d.line([(xx, H - bottom), (xx, H - bottom + 4)], fill="black")
        d.text((xx - 10, H - bottom + 6), _fmt(t), fill="black", font=font)
    for i, c in enumerate(counts):
        if c:
            x_a, y_a = px(lo + i * width, c)
            x_b, y_b = px(lo + (i + 1) * width, 0)
            d.rectangle([x_a + 1, y_a, x_b - 1, y_b], fill=COLOURS[0])
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    return _label_and_save(img, path, title, xlabel, ylabel, left, ylabel_y=18)
