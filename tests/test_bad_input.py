"""The bad-input battery: wrong configs, data and checkpoints each give one exact line and exit
status 2 with nothing written, or (a damaged checkpoint) a clean fallback to the newest intact
one. More config and layout cases live in test_cli.py and test_launch.py; these add types,
sizes and keys those do not cover."""

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from framework import checkpoint, integrity
from framework.faults import corrupt_file, truncate_file
from framework.resume import starting_point
from launch.run import compose, main

E = "duet-train: error: "
TINY = ["data.tokenizer=byte", "model.vocab_size=256", "data.seq_len=32", "data.batch_size=8",
        "eval_interval=0", "eval_batches=1", "logging.progress_bar=false", "logging.wandb_mode=disabled",
        "logging.sample_tokens=0", "logging.log_interval=1", "precision=fp32", "model.n_layers=2",
        "model.dim=64", "checkpoint.keep_last=3"]
KEY_TYPE = " - give a value of the key's type; `duet-train --cfg` shows every key with its default"


def refused(capsys, args: list[str], run_dir: Path) -> str:
    """Run duet-train in this process; it must exit 2 with one stderr line and write nothing."""
    existed = run_dir.exists()
    before = sorted(run_dir.rglob("*")) if existed else []
    code = main([*args, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    if existed:
        assert sorted(run_dir.rglob("*")) == before, "a refused run must not change its run folder"
    else:
        assert not run_dir.exists(), "a refused run must not create its run folder"
    return err[0]


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("overrides, line", [
    (["model.dim=abc"], "model.dim: Value 'abc' of type 'str' could not be converted to Integer" + KEY_TYPE),
    (["steps=1.5"], "steps: Value '1.5' of type 'float' could not be converted to Integer" + KEY_TYPE),
    (["parallel.zero1=maybe"], "parallel.zero1: Value 'maybe' is not a valid bool (type str)" + KEY_TYPE),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]: give two numbers in [0, 1)"),
    (["+model.foo=1"], "unknown key model.foo; check the spelling (`duet-train --cfg` lists every key)"),
    (["foo=1"],
     "foo: Key 'foo' not in 'TrainConfig' - check the spelling; `duet-train --cfg` lists every key"),
    (["model.vocab_size=0"], "model.vocab_size=0: must be positive"),
    (["model.n_layers=-1"], "model.n_layers=-1: must be positive"),
    (["data.batch_size=0"], "data.seq_len=128, data.batch_size=0: both must be positive"),
    (["steps=-5"], "steps=-5: must be positive"),
    (["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim=15: must be even (RoPE rotates pairs)"),
    (["model.n_dense_layers=5"], "model.n_dense_layers=5: must lie in [0, model.n_layers=3]"),
    (["model.n_limited_groups=5"], "model.n_limited_groups=5: more than model.n_expert_groups=4"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0: must lie strictly between 0 and 1"),
    (["checkpoint.keep_last=0"], "checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1"),
    (["launch.collective_timeout_s=0"],
     "launch.collective_timeout_s=0.0: must be a positive number of seconds (default 300)"),
    (["optim.max_consecutive_skips=-1"],
     "optim.max_consecutive_skips=-1: must be >= 0 (0 stops at the first non-finite step)"),
    (["device=tpu"], "device='tpu': choose auto, cpu or cuda"),
    (["precision.compute=fp4"], "precision.compute='fp4': choose one of auto, fp32, bf16, fp8"),
    (["optim.schedule=linear"], "optim.schedule='linear': choose one of cosine, deepseek, constant"),
    (["data.tokenizer=sentencepiece"], "data.tokenizer='sentencepiece': choose one of bpe, byte"),
    (["model.score_func=relu"], "model.score_func='relu': choose one of sigmoid, softmax"),
    (["logging.wandb_mode=loud"], "logging.wandb_mode='loud': choose one of auto, online, offline, disabled"),
    (["checkpoint.load_from=/nonexistent/ckpt"],
     "checkpoint.load_from='/nonexistent/ckpt': no such checkpoint folder"),
    (["data.tokenizer=byte", "model.vocab_size=100"],
     "model.vocab_size=100: the byte tokenizer needs >= 256"),
    (["model.rope_factor=0.5"], "model.rope_factor=0.5: must be >= 1 (1 disables YaRN)"),
    (["optim.min_lr=1"], "optim.min_lr=1.0: must lie in [0, optim.lr=0.003]"),
    (["data.source="], "data.source is empty: give a .txt/.jsonl/.bin path or data.source=stdlib"),
])
def test_bad_config(capsys, tmp_path, overrides, line):
    assert refused(capsys, overrides, tmp_path / "run") == E + line


# --------------------------------------------------------------------------- data

def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


DATA_CASES = {
    "empty.txt": (b"", "the corpus is empty; give a file with text in it"),
    "blank.txt": (b" \n\n\t \n", "the corpus is empty; give a file with text in it"),
    "garbage.txt": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                    "looks binary, not UTF-8 text (44% undecodable, NUL bytes); give a text file, or a .bin "
                    "of token ids with data.bin_dtype"),
    "odd.bin": (b"\x01\x00\x02", None),
    "short.txt": (b"def f():\n    pass\n", None),
    "bad.jsonl": (b'{"text": "fine"}\n{"text": oops}\n', None),
    "notext.jsonl": (b'{"body": "no text key"}\n', None),
}


@pytest.mark.parametrize("name", DATA_CASES)
def test_bad_data_file(capsys, tmp_path, name):
    content, tail = DATA_CASES[name]
    path = _write(tmp_path / name, content)
    line = refused(capsys, [f"data.source={path}", *TINY], tmp_path / "run")
    expected = {
        "odd.bin": f"data.bin_dtype=uint16: {path} has 3 bytes, not a multiple of 2; set data.bin_dtype to "
                   "the dtype it was written with",
        "short.txt": "data.seq_len=32: the train split has 17 tokens, fewer than seq_len+1; use a larger "
                     "corpus (data.max_corpus_mb), adjust data.val_fraction or shorten data.seq_len",
        "bad.jsonl": f"data.source={str(path)!r}: line 2 is not valid JSON (Expecting value); fix or remove "
                     "that line",
        "notext.jsonl": f"data.source={str(path)!r}: line 1 has no string `text` field; every line must be "
                        'an object like {"text": "..."}',
    }.get(name, f"data.source={str(path)!r}: {tail}")
    assert line == E + expected


def test_token_ids_beyond_the_vocabulary(capsys, tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(0, 3000, dtype=np.uint16).tofile(path)
    line = refused(capsys, [f"data.source={path}", "data.tokenizer=bpe", *TINY[1:]], tmp_path / "run")
    assert line == E + (f"model.vocab_size=256: data.source={str(path)!r} has token id 2999; raise "
                        "model.vocab_size or check data.bin_dtype")


def test_a_folder_is_not_a_corpus(capsys, tmp_path):
    line = refused(capsys, [f"data.source={tmp_path}", *TINY], tmp_path / "run")
    assert line == E + (f"data.source={str(tmp_path)!r}: file not found; give an existing .txt/.jsonl/.bin "
                        "path or data.source=stdlib")


# --------------------------------------------------------------------------- run folders

WRITABLE = "; choose a run_dir in a folder you can write to"


@pytest.mark.parametrize("layout", [[], ["parallel.dp=2"]], ids=["one rank", "two ranks"])
def test_run_dir_below_a_regular_file_is_refused(capsys, tmp_path, layout):
    (tmp_path / "notes").write_text("a file, not a folder")
    run_dir = tmp_path / "notes" / "run"
    line = refused(capsys, [*TINY, *layout], run_dir)
    assert line == E + f"run_dir={str(run_dir)!r}: {tmp_path / 'notes'} is a file, not a folder" + WRITABLE
    assert (tmp_path / "notes").read_text() == "a file, not a folder"


def test_run_dir_that_is_a_regular_file_is_refused(capsys, tmp_path):
    (tmp_path / "run").write_text("a file")
    line = refused(capsys, TINY, tmp_path / "run")
    assert line == E + f"run_dir={str(tmp_path / 'run')!r}: it is a file, not a folder" + WRITABLE
    assert (tmp_path / "run").read_text() == "a file"


def test_run_dir_under_proc_is_refused(capsys):
    # /proc takes no new folders, not even from root (whom a permission check would let through)
    line = refused(capsys, TINY, Path("/proc/duet-test/run"))
    assert re.fullmatch(re.escape(E + "run_dir='/proc/duet-test/run': cannot create a folder in /proc (")
                        + r"[^()]+" + re.escape(")" + WRITABLE), line), line


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory) -> Path:
    """A finished run with checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    assert main([f"data.source={corpus}", *TINY, "steps=6", "checkpoint.interval=2",
                 f"run_dir={run_dir}"]) == 0
    return run_dir


def run_copy(saved: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    return run_dir


def cfg_for(run_dir: Path, corpus, *extra: str):
    return compose([f"data.source={corpus}", *TINY, "steps=8", f"run_dir={run_dir}", *extra])


def _shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


def _crafted_metadata(ckpt: Path) -> None:
    """Replace .metadata with a pickle that would create a file if unpickled, and re-sign the
    manifest so only the safe reader stands between it and execution."""
    class Payload:
        def __reduce__(self):
            return (Path.touch, (ckpt / "PWNED",))
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload()))
    manifest = integrity.read_manifest(ckpt)
    manifest["files"][".metadata"] = {"bytes": (ckpt / ".metadata").stat().st_size,
                                      "sha256": integrity.file_digest(ckpt / ".metadata")}
    (ckpt / integrity.MANIFEST).write_text(json.dumps(manifest))


DAMAGES = {
    "corrupted shard": (lambda c: corrupt_file(_shard(c), seed=1), "fails its checksum (corrupted)"),
    "truncated shard": (lambda c: truncate_file(_shard(c), 0.5), "(truncated?)"),
    "no manifest": (lambda c: (c / integrity.MANIFEST).unlink(),
                    "no manifest.json (written partially, or not by duet)"),
    "garbage manifest": (lambda c: (c / integrity.MANIFEST).write_text("{]"), "unreadable manifest.json"),
    "deleted shard": (lambda c: _shard(c).unlink(), "is missing"),
    "unreadable meta": (lambda c: (c / "meta.json").write_text("{not json"),
                        "unreadable checkpoint metadata (meta.json)"),
    "crafted pickle": (_crafted_metadata, "refused: its .metadata names pathlib.Path.touch"),
    "renamed folder": (lambda c: shutil.copytree(c, c.parent / "step_00000007"),
                       "its manifest is for another step"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(saved, corpus, tmp_path, damage):
    run_dir = run_copy(saved, tmp_path)
    latest = checkpoint.latest_checkpoint(run_dir)
    do, reason = DAMAGES[damage]
    do(latest)
    damaged = []
    resume_from, _ = starting_point(cfg_for(run_dir, corpus), damaged)
    if damage == "renamed folder":  # a copy named step 7 holding step 6: skipped, 6 itself is intact
        assert resume_from.name == "step_00000006" and damaged[0][0].name == "step_00000007"
    else:
        assert resume_from.name == "step_00000004" and damaged[0][0] == latest
    assert reason in damaged[0][1], damaged
    assert not (latest / "PWNED").exists()


def test_fallback_end_to_end_reports_sets_aside_and_resumes_exactly(capsys, saved, corpus, tmp_path):
    run_dir = run_copy(saved, tmp_path)
    corrupt_file(_shard(run_dir / "checkpoints" / "step_00000006"), seed=3)
    assert main([f"data.source={corpus}", *TINY, "steps=6", "checkpoint.interval=2",
                 f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert ("duet: checkpoint step_00000006 is damaged (__0_0.distcp fails its checksum (corrupted)); "
            "moved to .damaged-step_00000006, using the newest intact one") in out
    assert "resumed from" in out and "step_00000004 at step 4" in out
    assert (run_dir / "checkpoints" / ".damaged-step_00000006").is_dir()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = {r["step"]: r["loss"] for r in records[:6] if "loss" in r}
    again = {r["step"]: r["loss"] for r in records[6:] if "loss" in r}
    assert again == {5: first[5], 6: first[6]}  # the replayed steps are exactly the original ones
    assert integrity.verify(run_dir / "checkpoints" / "step_00000006") is None  # re-saved intact


def test_foreign_files_are_ignored(saved, corpus, tmp_path):
    run_dir = run_copy(saved, tmp_path)
    root = run_dir / "checkpoints"
    (root / "notes.txt").write_text("mine")
    (root / "step_final").mkdir()
    (root / "step_00000099").write_text("a file, not a folder")
    (root / "step_00000006" / "README").write_text("added after the save")
    damaged = []
    assert starting_point(cfg_for(run_dir, corpus), damaged)[0].name == "step_00000006" and damaged == []


def test_every_checkpoint_damaged_is_refused(capsys, saved, corpus, tmp_path):
    run_dir = run_copy(saved, tmp_path)
    for ckpt in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        truncate_file(_shard(ckpt), 0.9)
    line = refused(capsys, [f"data.source={corpus}", *TINY, "steps=8"], run_dir)
    shard = _shard(run_dir / "checkpoints" / "step_00000002")
    listed = integrity.read_manifest(shard.parent)["files"][shard.name]["bytes"]
    assert line == E + (f"{run_dir / 'checkpoints' / 'step_00000002'}: {shard.name} has "
                        f"{shard.stat().st_size} bytes, the manifest says {listed} (truncated?), "
                        "and no intact checkpoint is left to resume from; move the damaged folders out of "
                        "checkpoints/ or use a new run_dir")


def test_resuming_with_another_model_names_every_mismatched_key(capsys, saved, corpus, tmp_path):
    run_dir = run_copy(saved, tmp_path)
    line = refused(capsys, [f"data.source={corpus}", *TINY, "model.dim=32", "model.n_heads=2"], run_dir)
    assert line == E + (f"checkpoint {run_dir / 'checkpoints' / 'step_00000006'} was saved with a different "
                        "model: model.dim=64 (this run: 32), model.n_heads=4 (this run: 2); use a new "
                        "run_dir or the original model config")


def test_load_from_a_damaged_or_foreign_folder_is_refused(capsys, saved, corpus, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(saved / "checkpoints" / "step_00000002", weights)
    corrupt_file(_shard(weights), seed=5)
    args = [f"data.source={corpus}", *TINY]
    line = refused(capsys, [*args, f"checkpoint.load_from={weights}"], tmp_path / "new")
    assert line == E + (f"checkpoint.load_from={weights}: __0_0.distcp fails its checksum (corrupted); "
                        "point it at an intact checkpoint folder")
    (tmp_path / "empty").mkdir()
    line = refused(capsys, [*args, f"checkpoint.load_from={tmp_path / 'empty'}"], tmp_path / "new")
    assert line == E + (f"checkpoint.load_from={tmp_path / 'empty'}: unreadable checkpoint metadata "
                        "(meta.json); point it at an intact checkpoint folder")


def test_load_itself_refuses_a_damaged_checkpoint(saved, tmp_path):
    """Whoever calls checkpoint.load (duet-hf, a script) gets the check too, not only resume."""
    run_dir = run_copy(saved, tmp_path)
    latest = run_dir / "checkpoints" / "step_00000006"
    corrupt_file(_shard(latest), seed=9)
    with pytest.raises(checkpoint.CheckpointError, match="is damaged: __0_0.distcp fails its checksum"):
        checkpoint.load(latest, {"extra": {}})
