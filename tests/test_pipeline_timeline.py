"""Pipeline timelines: the PNG (framework.plots, matplotlib) is an image of the asked size whose
spans have their colours where the figure's own axes put them, the Chrome trace holds one event
per span with the right relative timing and reads back, and a simulated DualPipe schedule
converts and renders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from framework.plots import (
    COLOURS,
    GAP,
    IDLE,
    LEFT,
    LEGEND,
    RIGHT,
    TOP,
    timeline_figure,
    timeline_height,
    write_lines,
    write_timeline,
)
from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.simulator import Costs, simulate
from parallel.pipeline.timeline import Timeline, kind, read_chrome_trace, write_chrome_trace

SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Two ranks, times in seconds with an offset (perf_counter never starts at 0).
SPANS = [
    [("F0.0", 10.0, 11.0), ("B0.0z", 11.0, 13.0), ("W", 13.0, 14.0)],
    [("recv", 10.0, 11.0), ("F1.3", 11.0, 11.5), ("B1.2", 11.5, 12.5)],
]


def read_png(path) -> np.ndarray:
    """(height, width, 3) uint8 RGB of a PNG file, decoded by matplotlib (Pillow), not by our code."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == SIGNATURE
    img = imread(path)
    assert img.dtype == np.float32 and img.shape[2] in (3, 4)
    return (img[..., :3] * 255).round().astype(np.uint8)


def colour_at(fig, img: np.ndarray, ms: float, row: float) -> tuple[int, int, int]:
    """The image's pixel at (ms from the earliest start, row in rank units) of the figure's axes;
    display coordinates start at the bottom left, image rows at the top."""
    x, y = fig.axes[0].transData.transform((ms, row))
    return tuple(int(v) for v in img[int(img.shape[0] - y), int(x)])


def test_kind_classifies_runtime_labels():
    assert [kind(x) for x in ("F0.3", "F1.12", "B0.2z", "B1.0", "W", "recv", "idle")] == [
        "F0", "F1", "B0", "B1", "W", "recv", "other"]


def test_png_has_its_size_and_spans_have_their_colours(tmp_path):
    path = write_timeline(SPANS, tmp_path / "t.png", width=600, row_height=20, title="test pp=2")
    img = read_png(path)
    assert img.shape == (timeline_height(2, 20), 600, 3)
    fig = timeline_figure(SPANS, width=600, row_height=20, title="test pp=2")  # the same layout
    for rank, spans in enumerate(SPANS):
        for label, start, end in spans:
            # the middle of the span, near its top edge (clear of the micro-batch number)
            mid = ((start + end) / 2 - 10.0) * 1e3
            assert colour_at(fig, img, mid, rank - 0.3) == COLOURS[kind(label)], label
    assert colour_at(fig, img, 3250.0, 1 - 0.3) == IDLE  # rank 1 has nothing left after 12.5 s
    # the layout in pixels, without the figure's transform: rank r's row of 20 pixels starts
    # (GAP / 2 rounded) below TOP + r * (20 + GAP); x runs over the width between LEFT and RIGHT
    x = LEFT + round(500 / 4000 * (600 - LEFT - RIGHT))  # 500 ms: rank 0's F0.0, rank 1's recv
    for rank, colour in ((0, COLOURS["F0"]), (1, COLOURS["recv"])):
        y0 = TOP + rank * (20 + GAP) + GAP // 2
        assert tuple(img[y0 + 3, x]) == colour and tuple(img[y0 + 16, x]) == colour, rank
    assert colour_at(fig, img, 3250.0, 0.5) == (255, 255, 255)  # the gap between the rows
    # numbers in every box with a micro-batch, none for W and recv; the legend and title as drawn
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0", "0", "2", "3"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*LEGEND, "idle"]
    assert [t.get_text() for t in fig.texts] == ["test pp=2"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["R0", "R1"]


def test_micro_batch_number_only_where_it_fits():
    spans = [[("F0.1", 0.0, 1.0), ("B0.23", 1.0, 1.002), ("F1.45", 1.002, 2.0)]]
    fig = timeline_figure(spans, width=600, row_height=20)
    # a 2 ms box of a 2 s row is about a pixel wide: "23" is dropped, the wide boxes keep theirs
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["1", "45"]


def test_matplotlib_is_only_loaded_to_draw():
    code = ("import sys, framework.trainer, framework.plots, benchmarks.bench, benchmarks.pipeline_bubble; "
            "assert not [m for m in sys.modules if m.startswith('matplotlib')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_line_plot_has_its_size_and_draws_every_series(tmp_path):
    series = {"bf16": [(1, 3.0), (2, 2.5), (3, 2.0)], "fp8": [(1, 3.1), (2, 2.6), (3, 2.1)],
              "one": [(2, 2.8)]}
    img = read_png(write_lines(series, tmp_path / "loss.png", title="loss", width=500, height=300))
    assert img.shape == (300, 500, 3)
    # matplotlib's first two palette colours (the series' lines) are in the picture
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(img.astype(int) - colour).sum(axis=2) < 30).sum() > 50, colour


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


def test_chrome_trace_reads_back_relative_to_the_earliest_start(tmp_path):
    path = write_chrome_trace([*SPANS, []], tmp_path / "t.trace.json")  # rank 2 recorded nothing
    back = read_chrome_trace(path)
    assert len(back) == 3 and back[2] == []
    for spans, got in zip(SPANS, back):
        assert [label for label, _, _ in got] == [label for label, _, _ in spans]
        for (_, start, end), (_, s, e) in zip(spans, got):
            assert (s, e) == pytest.approx((start - 10.0, end - 10.0), abs=1e-9)


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

    img = read_png(write_timeline(tl.spans, tmp_path / "dualpipe.png", title="dualpipe pp=4"))
    assert img.shape == (timeline_height(pp), 1200, 3)
    fig = timeline_figure(tl.spans, title="dualpipe pp=4")
    t0 = min(s for spans in tl.spans for _, s, _ in spans)
    for rank in (0, pp - 1):
        for label, start, end in tl.spans[rank][:6]:
            assert colour_at(fig, img, ((start + end) / 2 - t0) * 1e3, rank - 0.3) == COLOURS[kind(label)]
    trace = json.loads(write_chrome_trace(tl.spans, tmp_path / "dualpipe.trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == sum(len(s) for s in tl.spans)
