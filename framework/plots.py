"""PNG plots drawn with matplotlib: pipeline timelines (one row per rank) and line plots.

    write_timeline(tl.spans, "step.png", title="dualpipe pp=4")   # spans from parallel.pipeline.timeline
    write_lines({"bf16": [(step, loss), ...], "fp8": [...]}, "loss.png", title="loss")

This lives outside parallel/ (which records spans and writes Chrome traces, pure JSON) so that
ranks, the trainer and `import parallel` never load matplotlib unless something is drawn:
matplotlib is imported inside the functions. Figures are built on the Agg canvas directly
(matplotlib.figure.Figure, not pyplot), so drawing neither selects nor changes the process's
global backend and keeps no figure alive after the file is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from parallel.pipeline.timeline import Span, bounds, kind, micro_batch

RGB = tuple[int, int, int]

# DualPipe's figure: forwards in one hue, backwards in another, the two phases (directions) as a
# dark and a light shade of each; weight-gradient work in a third hue; waiting in greys.
COLOURS: dict[str, RGB] = {
    "F0": (239, 143, 35), "F1": (250, 204, 140),
    "B0": (56, 142, 60), "B1": (165, 214, 167),
    "W": (92, 107, 192),
    "recv": (200, 200, 200),
    "other": (150, 150, 150),
}
IDLE: RGB = (238, 238, 238)
INK: RGB = (40, 40, 40)
LEGEND = ("F0", "F1", "B0", "B1", "W", "recv")
DPI = 100  # sizes below are pixels: inches = pixels / DPI

# Timeline layout in pixels: title and legend above the rows, rank labels left, time axis below.
LEFT, RIGHT, TOP, BOTTOM, GAP = 44, 16, 58, 40, 3


def _rgb(c: RGB) -> tuple[float, float, float]:
    return c[0] / 255, c[1] / 255, c[2] / 255


def _darker(c: RGB) -> RGB:
    return c[0] * 3 // 5, c[1] * 3 // 5, c[2] * 3 // 5


def _ink_on(c: RGB) -> RGB:
    """Dark text on light fills, white on dark ones."""
    return INK if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 else (255, 255, 255)


def _figure(width: int, height: int):
    """A Figure of width x height pixels on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays as asked
    return path


def timeline_height(ranks: int, row_height: int = 28) -> int:
    """Pixel height of a timeline figure with `ranks` rows of row_height pixels."""
    return TOP + max(1, ranks) * (row_height + GAP) + BOTTOM


def timeline_figure(per_rank: Sequence[Sequence[Span]], width: int = 1200, row_height: int = 28,
                    title: str = ""):
    """The Gantt chart of a pipeline step: rank r is the row at y = r (rank 0 on top), x is ms
    from the earliest start. Every span is a box in its kind's colour; the micro-batch number is
    written in the box when it fits."""
    from matplotlib.patches import Patch

    ranks = max(1, len(per_rank))
    height = timeline_height(ranks, row_height)
    fig = _figure(width, height)
    # axes placed in pixels so that each row is row_height pixels high with GAP between rows
    ax = fig.add_axes((LEFT / width, BOTTOM / height, (width - LEFT - RIGHT) / width,
                       (height - TOP - BOTTOM) / height))
    t0, t1 = bounds(per_rank)
    total_ms = max((t1 - t0) * 1e3, 1e-9)
    bar = row_height / (row_height + GAP)  # a row's height in data units (rows are 1 apart)
    ax.set_xlim(0, total_ms)
    ax.set_ylim(ranks - 0.5, -0.5)  # inverted: rank 0 on top
    ax.set_facecolor("white")
    ax.barh(range(ranks), total_ms, height=bar, left=0, color=_rgb(IDLE), linewidth=0)
    labels = []
    for rank, spans in enumerate(per_rank):
        if not spans:
            continue
        lefts = [(s - t0) * 1e3 for _, s, _ in spans]
        widths = [(e - s) * 1e3 for _, s, e in spans]
        fills = [COLOURS[kind(label)] for label, _, _ in spans]
        # a thin darker outline keeps adjacent spans (an F+B pair) apart
        ax.barh([rank] * len(spans), widths, height=bar, left=lefts, color=[_rgb(c) for c in fills],
                edgecolor=[_rgb(_darker(c)) for c in fills], linewidth=0.6)
        for (label, _, _), x, w, c in zip(spans, lefts, widths, fills):
            if mb := micro_batch(label):
                labels.append((ax.text(x + w / 2, rank, mb, ha="center", va="center", color=_rgb(_ink_on(c)),
                                       fontsize=min(9, row_height * 0.45), clip_on=True), w))
    ax.set_yticks(range(ranks), [f"R{r}" for r in range(ranks)])
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("ms", loc="right", labelpad=1)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.text(LEFT / width, 1 - 6 / height, title, ha="left", va="top", fontsize=12, weight="bold")
    handles = [Patch(facecolor=_rgb(COLOURS.get(n, IDLE)), edgecolor=_rgb(_darker(COLOURS.get(n, IDLE))),
                     label=n) for n in (*LEGEND, "idle")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(LEFT / width - 0.01, 1 - 26 / height),
               ncol=len(handles), frameon=False, fontsize=9, handlelength=1.2, columnspacing=1.2,
               borderaxespad=0, borderpad=0)
    # drop the numbers wider than their box, measured in pixels by the renderer
    renderer = fig.canvas.get_renderer()
    px_per_ms = ax.get_window_extent(renderer).width / total_ms
    for text, w in labels:
        if text.get_window_extent(renderer).width + 4 > w * px_per_ms:
            text.remove()
    return fig


def write_timeline(per_rank: Sequence[Sequence[Span]], path: str | Path, width: int = 1200,
                   row_height: int = 28, title: str = "") -> Path:
    """Draw spans[rank] = [(label, start_s, end_s), ...] to a PNG of `width` x timeline_height pixels."""
    return _save(timeline_figure(per_rank, width, row_height, title), path)


def lines_figure(series: dict[str, list[tuple[float, float]]], title: str = "", width: int = 900,
                 height: int = 420):
    """One line per series of (x, y) points, in matplotlib's default palette; a lone point is a dot."""
    fig = _figure(width, height)
    ax = fig.add_subplot()
    for name, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, label=name, linewidth=1.5, marker="o" if len(pts) == 1 else None)
    ax.set_title(title, loc="left", fontsize=11)
    ax.grid(True, color=_rgb(IDLE))
    if series:
        ax.legend(fontsize=8, ncol=max(1, min(len(series), 5)), frameon=False)
    fig.tight_layout()
    return fig


def write_lines(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "",
                width: int = 900, height: int = 420) -> Path:
    return _save(lines_figure(series, title, width, height), path)
