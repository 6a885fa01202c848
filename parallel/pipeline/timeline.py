"""Pipeline timelines: collect what each rank did when, and draw it.

    tl = Timeline()                                   # in a rank: the runner's record hook
    PipelineRunner(..., record=tl)                    # tl.spans[0] = [(label, start_s, end_s), ...]
    tl = Timeline.from_ranks([spans_r0, spans_r1])    # gathered from spawned ranks
    tl = Timeline.from_simulation(simulate(...), costs)   # the same picture, on paper
    write_chrome_trace(tl.spans, "step.trace.json")   # chrome://tracing, ui.perfetto.dev
    write_png(tl.spans, "step.png")                   # one row per rank, DualPipe-style colours

Labels are the runtime's: "F<phase>.<mb>", "B<phase>.<mb>" (suffix "z": weight gradients
deferred to a later W), "W", "recv" (blocked receiving). An overlapped pair (FB) is two spans:
side by side in time when the runner overlaps them (its default in the trainer), else F then B.

The PNG is drawn here without matplotlib (not a dependency): a bytearray canvas, a 3x5 bitmap
font, and a minimal encoder (RGB, 8 bits, filter 0 on every row, one zlib IDAT). Timestamps are
perf_counter seconds, which on Linux is CLOCK_MONOTONIC and so comparable across the processes
of one host (not across hosts).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from parallel.pipeline.simulator import Costs, SimResult

Span = tuple[str, float, float]  # (label, start, end), seconds
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
BACKGROUND: RGB = (255, 255, 255)
INK: RGB = (40, 40, 40)
LEGEND = ("F0", "F1", "B0", "B1", "W", "recv")


def kind(label: str) -> str:
    """The colour class of a label: "F0", "F1", "B0", "B1", "W", "recv" or "other"."""
    if label in ("W", "recv"):
        return label
    if label[:1] in ("F", "B") and label[1:2] in ("0", "1"):
        return label[:2]
    return "other"


def micro_batch(label: str) -> str:
    """"F1.12" -> "12", "B0.3z" -> "3"; "" for labels without one."""
    _, dot, rest = label.partition(".")
    return rest.rstrip("z") if dot else ""


class Timeline:
    """Spans per pipeline rank: spans[rank] = [(label, start_s, end_s), ...] in recording order.
    Calling the object records on rank 0, so one Timeline per process is the runner's hook."""

    def __init__(self, ranks: int = 1) -> None:
        self.spans: list[list[Span]] = [[] for _ in range(ranks)]

    def __call__(self, label: str, start: float, end: float) -> None:
        self.spans[0].append((label, start, end))

    def hook(self, rank: int) -> Callable[[str, float, float], None]:
        """A record hook for `rank` (several runners in one process, e.g. threads)."""
        while len(self.spans) <= rank:
            self.spans.append([])
        spans = self.spans[rank]
        return lambda label, start, end: spans.append((label, start, end))

    @classmethod
    def from_ranks(cls, per_rank: Sequence[Sequence[Span]]) -> Timeline:
        tl = cls(0)
        tl.spans = [list(s) for s in per_rank]
        return tl

    @classmethod
    def from_simulation(cls, result: SimResult, costs: Costs | None = None, unit_s: float = 1e-3) -> Timeline:
        """The simulator's spans with the runtime's labels; one cost unit lasts unit_s seconds.
        An FB span becomes F then B, split in proportion to the F and B costs (the simulator's
        defaults when none are given)."""
        costs = costs or Costs()
        tl = cls(len(result.spans))
        for rank, spans in enumerate(result.spans):
            out = tl.spans[rank]
            for start, end, action in spans:
                start, end = start * unit_s, end * unit_s
                if action.kind == "W":
                    out.append(("W", start, end))
                elif action.kind in ("F", "B"):
                    out.append((str(action), start, end))
                else:  # FB: the runtime runs the forward, then the backward
                    b_cost = costs.B - costs.W if action.split else costs.B
                    mid = start + (end - start) * costs.F / (costs.F + b_cost)
                    out.append((f"F{action.phase}.{action.mb}", start, mid))
                    out.append((f"B{action.b_phase}.{action.b_mb}" + ("z" if action.split else ""), mid, end))
        return tl

    def busy(self, rank: int) -> float:
        """Seconds a rank was working (everything but waiting to receive); time covered by two
        spans at once (an overlapped pair's forward and backward) counts once."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted((s, e) for label, s, e in self.spans[rank] if label != "recv"):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


def _bounds(per_rank: Sequence[Sequence[Span]]) -> tuple[float, float]:
    starts = [s for spans in per_rank for _, s, _ in spans]
    ends = [e for spans in per_rank for _, _, e in spans]
    if not starts:
        return 0.0, 1.0
    return min(starts), max(ends)


# --------------------------------------------------------------------------- Chrome trace

def chrome_trace(per_rank: Sequence[Sequence[Span]]) -> dict:
    """Trace Event Format: one complete ("X") event per span, microseconds from the earliest
    start; pid 0, tid = rank, cat = the colour class. Metadata events name the rows."""
    t0, _ = _bounds(per_rank)
    events: list[dict] = [{"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "pipeline"}}]
    for rank, spans in enumerate(per_rank):
        events.append({"ph": "M", "pid": 0, "tid": rank, "name": "thread_name",
                       "args": {"name": f"rank {rank}"}})
        for label, start, end in spans:
            events.append({"ph": "X", "pid": 0, "tid": rank, "name": label, "cat": kind(label),
                           "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(per_rank: Sequence[Sequence[Span]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(per_rank)))
    return path


# --------------------------------------------------------------------------- raster canvas

# 3x5 glyphs, rows top to bottom, "1" = ink. Lower case is drawn as upper case.
_FONT: dict[str, str] = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "=": "000111000111000", "-": "000000111000000", "/": "001001010100100",
    ",": "000000000010100", ":": "000010000010000", "(": "010100100100010", ")": "010001001001010",
    "%": "101001010100101", "+": "000010111010000", " ": "000000000000000",
}


def text_width(text: str, scale: int) -> int:
    return max(0, 4 * scale * len(text) - scale)


class Canvas:
    """An RGB image as PNG scanlines: each row is a filter byte (0) then width * 3 bytes."""

    def __init__(self, width: int, height: int, fill: RGB = BACKGROUND) -> None:
        self.width, self.height = width, height
        self.stride = 1 + 3 * width
        self.data = bytearray((b"\x00" + bytes(fill) * width) * height)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, x0), min(self.width, x1)
        y0, y1 = max(0, y0), min(self.height, y1)
        if x0 >= x1 or y0 >= y1:
            return
        run = bytes(colour) * (x1 - x0)
        for y in range(y0, y1):
            at = y * self.stride + 1 + 3 * x0
            self.data[at:at + len(run)] = run

    def text(self, x: int, y: int, text: str, colour: RGB = INK, scale: int = 1) -> None:
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + (i % 3) * scale, y + (i // 3) * scale
                    self.rect(gx, gy, gx + scale, gy + scale, colour)
            x += 4 * scale

    def pixel(self, x: int, y: int) -> RGB:
        at = y * self.stride + 1 + 3 * x
        r, g, b = self.data[at:at + 3]
        return r, g, b

    def png(self) -> bytes:
        def chunk(tag: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(bytes(self.data), 9)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- the picture

@dataclass(frozen=True)
class Geometry:
    """Where things go: rows of ranks below a title and legend, a time axis underneath."""

    width: int
    row_height: int
    ranks: int
    t0: float
    t1: float
    left: int = 34  # rank labels
    right: int = 12
    top: int = 40  # title and legend
    gap: int = 3  # between rows
    bottom: int = 30  # time axis

    @property
    def height(self) -> int:
        return self.top + self.ranks * (self.row_height + self.gap) + self.bottom

    def x(self, t: float) -> int:
        span = self.width - self.left - self.right
        return self.left + round((t - self.t0) / max(self.t1 - self.t0, 1e-12) * span)

    def row(self, rank: int) -> tuple[int, int]:
        y0 = self.top + rank * (self.row_height + self.gap)
        return y0, y0 + self.row_height


def geometry(per_rank: Sequence[Sequence[Span]], width: int = 1200, row_height: int = 28) -> Geometry:
    t0, t1 = _bounds(per_rank)
    return Geometry(width, row_height, max(1, len(per_rank)), t0, t1)


def _darker(c: RGB) -> RGB:
    r, g, b = c
    return r * 3 // 5, g * 3 // 5, b * 3 // 5


def _ink_on(c: RGB) -> RGB:
    """Dark text on light fills, white on dark ones."""
    r, g, b = c
    return INK if 0.299 * r + 0.587 * g + 0.114 * b > 140 else BACKGROUND


def _tick_step(total_ms: float) -> float:
    """1, 2 or 5 times a power of ten, giving about eight ticks."""
    raw = max(total_ms, 1e-9) / 8
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def _fmt_ms(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:g}"


def render(per_rank: Sequence[Sequence[Span]], width: int = 1200, row_height: int = 28,
           title: str = "") -> Canvas:
    g = geometry(per_rank, width, row_height)
    c = Canvas(width, g.height)
    c.text(g.left, 6, title, scale=2)
    x = g.left  # legend: swatch then name, scale-2 font
    for name in (*LEGEND, "idle"):
        c.rect(x, 24, x + 12, 36, COLOURS.get(name, IDLE))
        c.text(x + 16, 25, name, scale=2)
        x += 16 + text_width(name, 2) + 14
    for rank, spans in enumerate(per_rank):
        y0, y1 = g.row(rank)
        c.rect(g.left, y0, width - g.right, y1, IDLE)
        c.text(4, (y0 + y1) // 2 - 5, f"R{rank}", scale=2)
        for label, start, end in spans:
            x0, x1 = g.x(start), max(g.x(start) + 1, g.x(end))
            colour = COLOURS[kind(label)]
            c.rect(x0, y0, x1, y1, colour)
            if x1 - x0 >= 4:  # a dark left edge keeps adjacent spans (an F+B pair) apart
                c.rect(x0, y0, x0 + 1, y1, _darker(colour))
            mb = micro_batch(label)
            for scale in (2, 1):  # the micro-batch number, if it fits
                if mb and text_width(mb, scale) + 4 <= x1 - x0 and 5 * scale + 4 <= row_height:
                    c.text((x0 + x1 - text_width(mb, scale)) // 2 + 1, (y0 + y1 - 5 * scale) // 2, mb,
                           _ink_on(colour), scale)
                    break
    # time axis in milliseconds from the earliest start
    axis_y = g.row(g.ranks - 1)[1] + 4
    c.rect(g.left, axis_y, width - g.right, axis_y + 1, INK)
    total_ms = (g.t1 - g.t0) * 1e3
    step = _tick_step(total_ms)
    for i in range(int(total_ms / step + 1e-9) + 1):
        v = i * step
        tx = g.x(g.t0 + v / 1e3)
        c.rect(tx, axis_y, tx + 1, axis_y + 5, INK)
        c.text(tx - text_width(_fmt_ms(v), 1) // 2, axis_y + 8, _fmt_ms(v))
    c.text(width - g.right - text_width("MS", 2), axis_y + 16, "ms", scale=2)
    return c


def write_png(per_rank: Sequence[Sequence[Span]], path: str | Path, width: int = 1200, row_height: int = 28,
              title: str = "") -> Path:
    path = Path(path)
    path.write_bytes(render(per_rank, width, row_height, title).png())
    return path
