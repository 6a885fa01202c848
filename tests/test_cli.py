"""duet-train's edge: config composition, validation and bad input (exit 2, one line)."""

import subprocess
import sys

import pytest

from launch.run import compose, main


def run_main(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_config_composes_to_typed_dataclasses():
    from framework.config import ModelConfig, TrainConfig, validate

    cfg = compose([])
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig)
    assert cfg.model.name == "tiny" and cfg.run_dir == "runs/tiny"
    assert validate(cfg) == []


def test_overrides_and_presets_apply():
    cfg = compose(["model=small", "optim.lr=3e-4", "optim=deepseek_v3", "data.seq_len=64"])
    assert cfg.model.name == "small" and cfg.model.dim == 1024
    assert cfg.optim.schedule == "deepseek" and cfg.data.seq_len == 64
    # the group override is applied first, the key override after it
    assert compose(["optim=deepseek_v3", "optim.lr=3e-4"]).optim.lr == 3e-4


@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek_v2_lite", "deepseek_v3"])
def test_every_preset_validates(preset):
    from framework.config import validate

    assert validate(compose([f"model={preset}"])) == []


@pytest.mark.parametrize("override, named", [
    ("model=gpt5", "unknown model preset 'gpt5'"),
    ("optim.lr=-1", "optim.lr"),
    ("model.n_activated_experts=9", "model.n_activated_experts"),
    ("model.n_expert_groups=3", "model.n_expert_groups"),
    ("data.source=/nonexistent/corpus.txt", "data.source"),
    ("model.no_such_key=1", "no_such_key"),
    ("optim.lr=fast", "optim.lr"),
    ("data.seq_len=1024", "data.seq_len"),
])
def test_bad_config_is_one_line_and_exit_2(capsys, tmp_path, override, named):
    run_dir = tmp_path / "run"
    code, out, err = run_main(capsys, override, f"run_dir={run_dir}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert named in lines[0] and lines[0].startswith("duet-train: error:")
    assert not run_dir.exists(), "a rejected run must not create its run folder"


def test_several_problems_are_each_reported(capsys):
    code, _, err = run_main(capsys, "optim.lr=-1", "model.n_expert_groups=3", "steps=0")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3
    assert any("optim.lr" in s for s in lines) and any("steps" in s for s in lines)


def test_console_script_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.run", "model=nope", f"run_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model preset" in proc.stderr


def test_cfg_and_help_print_and_exit_0(capsys):
    code, out, _ = run_main(capsys, "--cfg", "model=deepseek_v3")
    assert code == 0 and "n_routed_experts: 256" in out
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "deepseek_v2_lite" in out


def test_dry_run_reports_v3_size_without_allocating(capsys):
    code, out, _ = run_main(capsys, "--dry-run", "model=deepseek_v3")
    assert code == 0
    total = int(out.split("parameters")[0].split(":")[1].replace(",", "").strip())
    assert total == 671_026_404_352  # DeepseekV3ForCausalLM's count (MTP reported separately)
