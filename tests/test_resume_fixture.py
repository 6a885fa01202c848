"""Compatibility with what older duet wrote: a run folder saved by commit 28e2524 resumes at its
step, and the state-dict names and shapes of the presets stay those of a committed golden list
(tests/fixtures/README.txt). Both expectations are committed files, never computed by today's
code."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from framework import checkpoint, integrity
from framework.model import Transformer
from framework.trainer import Trainer
from launch.run import compose, main

FIXTURES = Path(__file__).parent / "fixtures"
RUN_V0 = FIXTURES / "run_v0"
OVERRIDES = (RUN_V0 / "overrides.txt").read_text().split()
pytestmark = pytest.mark.usefixtures("one_thread")  # a 42k-parameter model: one thread is fastest


def fixture_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(RUN_V0 / "run", run_dir)
    return run_dir


def args(run_dir: Path, steps: int) -> list[str]:
    return [*OVERRIDES, f"data.source={RUN_V0 / 'corpus.txt'}", f"steps={steps}", f"run_dir={run_dir}"]


def saved_by_torch(tmp_path: Path) -> dict:
    """The fixture checkpoint's tensors as torch's own DCP converter reads them (not duet's loader)."""
    out = tmp_path / "fixture.pt"
    dcp_to_torch_save(RUN_V0 / "run" / "checkpoints" / "step_00000002", out)
    return torch.load(out, weights_only=True)


def test_run_folder_of_28e2524_loads_its_step_2_state(tmp_path):
    saved = saved_by_torch(tmp_path)
    trainer = Trainer(compose(args(fixture_run(tmp_path), 3)))
    assert trainer.resume_from is not None and trainer.resume_from.name == "step_00000002"
    assert trainer.step == 2 and trainer.data.train.state_dict()["position"] == 2
    model = trainer.model.state_dict()
    assert sorted(model) == sorted(saved["model"])
    for name, tensor in model.items():
        assert torch.equal(tensor, saved["model"][name]), name  # weights and expert biases
    optim = trainer.optimizer.state_dict()
    assert sorted(optim) == sorted(saved["optim"])
    for name, tensor in optim.items():
        assert torch.equal(tensor, saved["optim"][name]), name  # AdamW moments and step counts


def test_run_folder_of_28e2524_resumes_at_step_2_and_finishes_step_3(tmp_path, capsys):
    run_dir = fixture_run(tmp_path)
    old_records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert main(args(run_dir, 3)) == 0
    out = capsys.readouterr().out
    assert f"duet: resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in out
    assert "final validation loss" in out and "at step 3" in out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[:len(old_records)] == old_records  # appended to, not started afresh
    new = [json.loads(line) for line in lines[len(old_records):]]
    assert [r["step"] for r in new] == [3, 3]  # step 3's record, then the final validation
    assert math.isfinite(new[0]["loss"]) and math.isfinite(new[1]["val_loss"])
    latest = checkpoint.latest_checkpoint(run_dir)
    assert latest.name == "step_00000003" and integrity.verify(latest) is None
    assert checkpoint.read_meta(latest)["step"] == 3


# --------------------------------------------------------------------------- golden key list

def expand(golden: dict[str, list[int]]) -> dict[str, list[int]]:
    """"blocks.{0-2,5}.x": shape -> one entry per block index (tests/fixtures/make_state_dict_keys.py)."""
    out = {}
    for pattern, shape in golden.items():
        match = re.search(r"\{([\d,-]+)\}", pattern)
        if match is None:
            out[pattern] = shape
            continue
        for span in match.group(1).split(","):
            first, _, last = span.partition("-")
            for i in range(int(first), int(last or first) + 1):
                out[pattern[:match.start()] + str(i) + pattern[match.end():]] = shape
    return out


def test_state_dict_names_and_shapes_equal_the_golden_list():
    golden = json.loads((FIXTURES / "state_dict_keys.json").read_text())
    assert len(expand(golden["deepseek_v3"])) == 1046 and len(expand(golden["tiny"])) == 70
    for preset in ("tiny", "deepseek_v3"):
        with torch.device("meta"):
            model = Transformer(compose([f"model={preset}"]).model)
        got = {name: list(t.shape) for name, t in model.state_dict().items()}
        want = expand(golden[preset])
        assert sorted(got.keys() - want.keys()) == [] and sorted(want.keys() - got.keys()) == [], preset
        assert {k: v for k, v in got.items() if v != want[k]} == {}, preset
