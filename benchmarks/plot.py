"""Line plots as PNG without matplotlib (not a dependency), on the pipeline timeline's canvas,
font and encoder (parallel/pipeline/timeline.py).

    write_lines({"bf16": [(step, loss), ...], "fp8": [...]}, "loss.png", title="loss")
"""

from __future__ import annotations

from pathlib import Path

from parallel.pipeline.timeline import INK, Canvas, text_width

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _segment(c: Canvas, x0: int, y0: int, x1: int, y1: int, colour) -> None:
    """A 2-pixel line: one dot per step along the longer axis."""
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(n + 1):
        x, y = x0 + (x1 - x0) * i // n, y0 + (y1 - y0) * i // n
        c.rect(x, y, x + 2, y + 2, colour)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def render_lines(series: dict[str, list[tuple[float, float]]], title: str = "", width: int = 900,
                 height: int = 420) -> Canvas:
    c = Canvas(width, height)
    left, right, top, bottom = 60, 16, 44, 34
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x: float) -> int:
        return left + round((x - x0) / (x1 - x0) * (width - left - right))

    def py(y: float) -> int:
        return height - bottom - round((y - y0) / (y1 - y0) * (height - top - bottom))

    c.text(left, 6, title, scale=2)
    c.rect(left, height - bottom, width - right, height - bottom + 1, INK)  # axes
    c.rect(left - 1, top, left, height - bottom, INK)
    for i in range(5):  # ticks with values at both axes' quarters
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        c.rect(px(xv), height - bottom, px(xv) + 1, height - bottom + 5, INK)
        c.text(px(xv) - text_width(_fmt(xv), 1) // 2, height - bottom + 9, _fmt(xv))
        c.rect(left - 5, py(yv), left, py(yv) + 1, INK)
        c.text(left - 8 - text_width(_fmt(yv), 1), py(yv) - 2, _fmt(yv))
    x = left
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        c.rect(x, 26, x + 12, 36, colour)  # legend
        c.text(x + 16, 27, name, scale=2)
        x += 16 + text_width(name, 2) + 14
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            _segment(c, px(ax), py(ay), px(bx), py(by), colour)
        if len(pts) == 1:
            c.rect(px(pts[0][0]) - 2, py(pts[0][1]) - 2, px(pts[0][0]) + 3, py(pts[0][1]) + 3, colour)
    return c


def write_lines(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "") -> Path:
    path = Path(path)
    path.write_bytes(render_lines(series, title).png())
    return path
