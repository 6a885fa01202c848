"""Pipeline timelines: the PNG is a valid image whose spans have their colours (decoded here with
zlib, independently of the encoder), the Chrome trace holds one event per span with the right
relative timing, and a simulated DualPipe schedule converts and renders."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.simulator import Costs, simulate
from parallel.pipeline.timeline import (
    COLOURS,
    IDLE,
    Timeline,
    geometry,
    kind,
    write_chrome_trace,
    write_png,
)

SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Two ranks, times in seconds with an offset (perf_counter never starts at 0).
SPANS = [
    [("F0.0", 10.0, 11.0), ("B0.0z", 11.0, 13.0), ("W", 13.0, 14.0)],
    [("recv", 10.0, 11.0), ("F1.3", 11.0, 11.5), ("B1.2", 11.5, 12.5)],
]


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB, non-interlaced, filter-0 PNG;
    every chunk's CRC is checked."""
    assert data[:8] == SIGNATURE
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        tag, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        at += 12 + length
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour_type, compression, filter_method, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1])
    assert (depth, colour_type, compression, filter_method, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type 0 (None) on every scanline
    return width, height, [row[1:] for row in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    r, g, b = rows[y][3 * x:3 * x + 3]
    return r, g, b


def test_kind_classifies_runtime_labels():
    assert [kind(x) for x in ("F0.3", "F1.12", "B0.2z", "B1.0", "W", "recv", "idle")] == [
        "F0", "F1", "B0", "B1", "W", "recv", "other"]


def test_png_decodes_and_spans_have_their_colours(tmp_path):
    path = write_png(SPANS, tmp_path / "t.png", width=600, row_height=20, title="test pp=2")
    width, height, rows = decode_png(path.read_bytes())
    g = geometry(SPANS, width=600, row_height=20)
    assert (width, height) == (600, g.height)
    for rank, spans in enumerate(SPANS):
        y0, _ = g.row(rank)
        for label, start, end in spans:
            # the middle of the span, near its top edge (clear of the micro-batch number)
            assert pixel(rows, (g.x(start) + g.x(end)) // 2, y0 + 2) == COLOURS[kind(label)], label
    y0, _ = g.row(1)
    assert pixel(rows, (g.x(12.5) + g.x(14.0)) // 2, y0 + 2) == IDLE  # rank 1 has nothing left


def test_chrome_trace_has_one_event_per_span_relative_to_the_earliest_start(tmp_path):
    path = write_chrome_trace(SPANS, tmp_path / "t.trace.json")
    trace = json.loads(path.read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(len(s) for s in SPANS)
    got = {(e["tid"], e["name"]): e for e in events}
    for rank, spans in enumerate(SPANS):
        for label, start, end in spans:
            e = got[(rank, label)]
            assert e["pid"] == 0 and e["cat"] == kind(label)
            assert e["ts"] == pytest.approx((start - 10.0) * 1e6)
            assert e["dur"] == pytest.approx((end - start) * 1e6)
    assert min(e["ts"] for e in events) == 0


def test_timeline_is_a_record_hook():
    tl = Timeline()
    tl("F0.0", 1.0, 2.0)
    tl.hook(2)("recv", 2.0, 2.5)
    tl.hook(2)("W", 2.5, 3.0)
    assert tl.spans == [[("F0.0", 1.0, 2.0)], [], [("recv", 2.0, 2.5), ("W", 2.5, 3.0)]]
    assert tl.busy(2) == pytest.approx(0.5)  # waiting to receive is not work
    assert Timeline.from_ranks(tl.spans).spans == tl.spans


def test_simulated_dualpipe_pp4_converts_and_renders(tmp_path):
    pp, chunks = 4, 16
    costs = Costs(F=2, B=4, W=2, FB=6)
    schedule = build("dualpipe", pp, chunks)
    result = simulate(schedule, Placement("dualpipe", pp, chunks), costs)
    tl = Timeline.from_simulation(result, costs, unit_s=1e-3)
    for rank in range(pp):
        pairs = sum(a.kind == "FB" for a in schedule[rank])
        assert pairs > 0 and len(tl.spans[rank]) == len(schedule[rank]) + pairs
        assert tl.busy(rank) == pytest.approx(result.busy[rank] * 1e-3)
        spans = tl.spans[rank]
        for (a, _, a_end), (b, b_start, _) in zip(spans, spans[1:]):
            if a[0] == "F" and b[0] == "B" and a_end == b_start:
                break
        else:
            raise AssertionError(f"rank {rank}: no adjacent F, B pair")
        labels = {label for label, _, _ in spans}
        assert {kind(x) for x in labels} == {"F0", "F1", "B0", "B1", "W"}
        # every micro-batch runs forward and backward once in each phase it visits here
        fwd = sorted(label for label in labels if label[0] == "F")
        assert len(fwd) == chunks  # 8 per phase, two phases
    # an FB pair splits in proportion F : B
    f, b = next((s, t) for s, t in zip(tl.spans[0], tl.spans[0][1:]) if s[0][0] == "F" and t[0][0] == "B"
                and s[2] == t[1] and (t[2] - t[1]) == pytest.approx(4e-3))
    assert f[2] - f[1] == pytest.approx(2e-3)

    png = write_png(tl.spans, tmp_path / "dualpipe.png", title="dualpipe pp=4")
    width, height, rows = decode_png(png.read_bytes())
    g = geometry(tl.spans)
    assert (width, height) == (1200, g.height) and g.ranks == pp
    label, start, end = tl.spans[pp - 1][0]
    assert pixel(rows, (g.x(start) + g.x(end)) // 2, g.row(pp - 1)[0] + 2) == COLOURS[kind(label)]
    trace = json.loads(write_chrome_trace(tl.spans, tmp_path / "dualpipe.trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == sum(len(s) for s in tl.spans)
