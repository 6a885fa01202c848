"""duet-bench --quick writes a report with at least one valid PNG (timings are never asserted)."""

import struct
import zlib

from benchmarks.bench import main


def test_quick_bench_writes_report_and_png(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Pipeline schedules on paper" in report and "failed:" not in report
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(f"]({p.name})" in report for p in pngs if p.name.startswith("sim_"))
    data = pngs[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    at, raw = 8, b""
    while at < len(data):  # walk the chunks, checking every CRC, and inflate the image data
        (length,), tag = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(tag + body)
        raw += body if tag == b"IDAT" else b""
        at += 12 + length
    assert len(zlib.decompress(raw)) == height * (1 + 3 * width)
    assert "duet-bench [1/" in capsys.readouterr().out  # progress shown
