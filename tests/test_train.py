"""The single-process trainer: it learns, resumes exactly, and keeps checkpoints safe."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from framework import checkpoint
from framework.trainer import Trainer, TrainingError
from launch.run import compose

QUIET = ["logging.progress_bar=false", "logging.wandb_mode=disabled", "logging.sample_tokens=0"]


def tiny_cfg(run_dir: Path, *overrides: str):
    return compose([f"run_dir={run_dir}", "precision=fp32", *QUIET, *overrides])


def unigram_entropy_nats(tokens: np.ndarray, vocab: int) -> float:
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_preset_learns_below_unigram_entropy(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "steps=200", "eval_interval=0", "data.max_corpus_mb=1",
                   "checkpoint.interval=0", "logging.sample_tokens=16")
    trainer = Trainer(cfg)
    entropy = unigram_entropy_nats(trainer.data.train_tokens, cfg.model.vocab_size)
    first_val = trainer.evaluate()
    result = trainer.run()
    print(f"unigram entropy {entropy:.3f} nats, val loss {first_val:.3f} -> {result.val_loss:.3f}")
    assert result.val_loss < entropy - 0.5, (result.val_loss, entropy)
    assert result.val_loss < first_val - 2.0
    assert isinstance(result.sample, str) and result.sample.startswith("def ")
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any('"val_loss"' in r for r in records) and any('"tokens_per_s"' in r for r in records)
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000200"


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_resume_equals_straight_run(tmp_path, corpus, async_save):
    args = ["steps=8", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256", "checkpoint.interval=3", "optim.warmup_steps=3",
            "model.bias_update_rate=0.01", f"checkpoint.async_save={async_save}"]
    straight = Trainer(tiny_cfg(tmp_path / "straight", *args))
    full = straight.run()

    first = Trainer(tiny_cfg(tmp_path / "split", *args)).run(until_step=4)
    resumed = Trainer(tiny_cfg(tmp_path / "split", *args))
    assert resumed.step == 4 and resumed.data.train.state_dict()["position"] == 4
    second = resumed.run()

    assert len(full.losses) == 8 and first.losses + second.losses == full.losses
    biases = [m.router.expert_bias for m in straight.model.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases), "the bias update must have moved something"
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.val_loss == second.val_loss


def test_checkpoints_are_pruned_and_temporaries_ignored(tmp_path, corpus):
    args = ["steps=6", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256", "checkpoint.interval=2", "checkpoint.keep_last=2"]
    Trainer(tiny_cfg(tmp_path / "run", *args)).run()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    # A crash mid-save leaves only a hidden temporary folder, which resume must ignore.
    (root / ".tmp-step_00000008").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000006"


def test_failed_save_leaves_no_checkpoint(tmp_path, corpus, monkeypatch):
    args = ["steps=2", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256", "checkpoint.interval=0"]
    trainer = Trainer(tiny_cfg(tmp_path / "run", *args))

    def broken_save(state, checkpoint_id, **kwargs):
        Path(checkpoint_id).mkdir(parents=True)
        (Path(checkpoint_id) / "half.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.dcp, "save", broken_save)
    with pytest.raises(OSError):
        trainer.run()
    assert checkpoint.latest_checkpoint(tmp_path / "run") is None


def test_resume_refuses_a_different_model_and_overwrites_nothing(tmp_path, corpus):
    args = ["steps=2", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256"]
    Trainer(tiny_cfg(tmp_path / "run", *args)).run()
    with pytest.raises(TrainingError, match="model.dim"):
        Trainer(tiny_cfg(tmp_path / "run", *args, "model.dim=64"))
    with pytest.raises(TrainingError, match="checkpoint.resume"):
        Trainer(tiny_cfg(tmp_path / "run", *args, "checkpoint.resume=false"))
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000002"


def test_nan_loss_every_step_stops_with_a_clear_error(tmp_path, corpus):
    args = ["steps=3", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256", "optim.max_consecutive_skips=1"]
    trainer = Trainer(tiny_cfg(tmp_path / "run", *args))
    with torch.no_grad():
        trainer.model.head.weight.fill_(math.nan)
    with pytest.raises(TrainingError, match=r"non-finite loss and grad_norm at 2 steps in a row \(steps 1-2, "
                                            r"more than optim.max_consecutive_skips=1\)"):
        trainer.run()
    assert checkpoint.latest_checkpoint(tmp_path / "run") is None  # nothing saved from a broken model


def test_bf16_autocast_step_trains(tmp_path, corpus):
    args = ["steps=2", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256", "model.dim=32", "data.seq_len=16", "data.batch_size=4"]
    trainer = Trainer(compose([f"run_dir={tmp_path / 'run'}", "precision=bf16", *QUIET, *args]))
    assert trainer.compute == "bf16"
    result = trainer.run()
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # FP32 masters


def test_load_from_initialises_weights_of_a_new_run(tmp_path, corpus):
    from framework.hf import _write_duet_checkpoint

    args = ["steps=2", "eval_interval=0", f"data.source={corpus}", "data.tokenizer=byte",
            "model.vocab_size=256"]
    donor = Trainer(tiny_cfg(tmp_path / "donor", *args, "seed=7"))
    _write_duet_checkpoint(donor.model, donor.cfg.model, tmp_path / "weights")
    fresh = Trainer(tiny_cfg(tmp_path / "new", *args, f"checkpoint.load_from={tmp_path / 'weights'}"))
    assert fresh.step == 0
    for (name, a), b in zip(donor.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TrainingError, match="model.dim"):
        Trainer(tiny_cfg(tmp_path / "other", *args, "model.dim=64",
                         f"checkpoint.load_from={tmp_path / 'weights'}"))
