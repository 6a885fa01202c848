"""Data pipeline: sources, tokenizers, caches, errors and the batch sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import DataConfig
from framework.data import Data, DataError, TokenBatches, build_data, build_tokenizer, unigram_entropy

# Some text with multi-byte characters, long enough for a few windows.
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, café {i * i}\n"
               for i in range(200))


def cfg_for(source: str | Path, **kw) -> DataConfig:
    base = {"source": str(source), "tokenizer": "byte", "seq_len": 16, "batch_size": 8,
            "val_fraction": 0.1}
    base.update(kw)
    return DataConfig(**base)


def window_start(tokens: np.ndarray, row: np.ndarray) -> int:
    """Where `row` occurs in `tokens` (-1 if nowhere), by brute force."""
    n = len(row)
    for s in range(len(tokens) - n + 1):
        if np.array_equal(tokens[s:s + n], row):
            return s
    return -1


@pytest.fixture
def ramp() -> np.ndarray:
    # Distinct values make every window identify its start position.
    return np.arange(5000, dtype=np.uint32)


# --------------------------------------------------------------------------- sampler


def test_same_seed_same_batches_different_seed_different(ramp):
    a, b = TokenBatches(ramp, 32, 8, seed=7), TokenBatches(ramp, 32, 8, seed=7)
    c = TokenBatches(ramp, 32, 8, seed=8)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a.next(), b.next(), c.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
    # Consecutive batches differ too: the index feeds the randomness.
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])


def test_windows_are_contiguous_and_targets_shifted(ramp):
    x, y = TokenBatches(ramp, 32, 8, seed=1).batch(5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        # With a ramp, a window is start, start+1, ...; targets are one further on.
        start = int(row_x[0])
        assert row_x.tolist() == list(range(start, start + 32))
        assert row_y.tolist() == list(range(start + 1, start + 33))
        assert start + 32 < len(ramp)


def test_windows_cover_the_whole_range():
    # 40 tokens, windows of 8 (+1): every start 0..31 must be reachable, no other.
    tokens = np.arange(40, dtype=np.uint16)
    b = TokenBatches(tokens, 8, 16, seed=0)
    starts = {int(b.batch(i)[0][r, 0]) for i in range(50) for r in range(16)}
    assert starts == set(range(32))


def test_resume_continues_identically(ramp):
    first = TokenBatches(ramp, 16, 4, seed=3)
    for _ in range(5):
        first.next()
    state = first.state_dict()
    assert state == {"position": 5, "seed": 3}
    assert all(type(v) is int for v in state.values())
    # A sampler built with another seed takes the seed from the state.
    resumed = TokenBatches(ramp, 16, 4, seed=99)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(4):
        (x1, y1), (x2, y2) = first.next(), resumed.next()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_rows_concatenate_to_the_global_batch(ramp, world):
    whole = TokenBatches(ramp, 16, 8, seed=11)
    shards = [TokenBatches(ramp, 16, 8, seed=11, rank=r, world=world) for r in range(world)]
    for i in (0, 3, 17):
        parts = [s.batch(i) for s in shards]
        assert all(p[0].shape == (8 // world, 16) for p in parts)
        x, y = whole.batch(i)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_batch_not_divisible_by_world_names_the_key(ramp):
    with pytest.raises(DataError, match=r"data\.batch_size=6.*multiple of 4"):
        TokenBatches(ramp, 16, 6, seed=0, rank=0, world=4)


def test_unigram_entropy():
    assert unigram_entropy(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10)) == pytest.approx(math.log(4))
    # p = (3/4, 1/4)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert unigram_entropy(np.array([9, 9, 9, 2], dtype=np.uint16)) == pytest.approx(expected)


# --------------------------------------------------------------------------- sources


def test_text_file_byte_tokens_and_contiguous_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    data = build_data(cfg_for(path), 256, tmp_path / "cache")
    assert isinstance(data, Data)
    raw = np.frombuffer(TEXT.encode("utf-8"), dtype=np.uint8)
    n_val = int(len(raw) * 0.1)
    assert len(data.val_tokens) == n_val
    assert np.array_equal(np.concatenate([data.train_tokens, data.val_tokens]), raw)
    assert not np.shares_memory(data.train_tokens, data.val_tokens)
    # Validation windows come from the validation split only (and likewise for train).
    x, y = data.val.batch(0)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row_x, row_y[-1:]])
        assert window_start(data.val_tokens, window) >= 0
    x, _ = data.train.batch(0)
    assert window_start(data.train_tokens, x[0].numpy()) >= 0


def test_byte_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(cfg_for("stdlib"), 256, tmp_path)
    text = "héllo, wörld — 你好 🙂\n\tdef f(): pass"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.vocab_size == 256
    assert tok.decode(ids) == text
    # Ids a larger model vocabulary can sample, and a cut character, do not crash decode.
    assert tok.decode([104, 105, 300, 0xC3]) == "hi\ufffd\ufffd"


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["first document", "second — one", "third"]
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs))
                    + "\n\n", encoding="utf-8")
    data = build_data(cfg_for(path, seq_len=4, batch_size=2, val_fraction=0.25), 256,
                      tmp_path / "cache")
    expected = "".join(d + "\n" for d in docs).encode("utf-8")
    got = np.concatenate([data.train_tokens, data.val_tokens]).astype(np.uint8).tobytes()
    assert got == expected


@pytest.mark.parametrize("dtype,vocab", [("uint16", 50_000), ("uint32", 100_000)])
def test_bin_source(tmp_path, dtype, vocab):
    tokens = (np.arange(3000, dtype=np.int64) * 7919 % vocab).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    data = build_data(cfg_for(path, tokenizer="bpe", bin_dtype=dtype), vocab,
                      tmp_path / "cache")
    assert np.array_equal(np.concatenate([data.train_tokens, data.val_tokens]), tokens)
    x, _ = data.train.batch(0)
    assert x.dtype == torch.int64 and int(x.max()) < vocab
    assert window_start(tokens, x[0].numpy()) >= 0
    # Nothing to train for a pre-tokenized corpus.
    assert not (tmp_path / "cache" / "tokenizer.json").exists()
    assert data.tokenizer.decode(data.tokenizer.encode("3 14 15")) == "3 14 15"


# --------------------------------------------------------------------------- BPE and caches


def test_stdlib_bpe_round_trip_and_compression(tmp_path):
    cfg = DataConfig(source="stdlib", tokenizer="bpe", max_corpus_mb=0.3, seq_len=32,
                     batch_size=4)
    data = build_data(cfg, 512, tmp_path)
    tok = data.tokenizer
    assert 256 < tok.vocab_size <= 512
    text = "import os\n\ndef main(argv):\n    return os.path.join(argv[0], 'x')  # done\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # merges learned from Python source compress Python source
    # The corpus is about 0.3 MB of text; BPE needs fewer tokens than bytes for it.
    n_tokens = len(data.train_tokens) + len(data.val_tokens)
    assert 0.05 * 2**20 < n_tokens < 0.3 * 2**20
    assert int(max(data.train_tokens.max(), data.val_tokens.max())) < tok.vocab_size
    # Unicode and unseen bytes still round-trip: the byte-level alphabet covers them.
    assert tok.decode(tok.encode("naïve ☃ \x00\x7f")) == "naïve ☃ \x00\x7f"


def test_bpe_training_is_deterministic(tmp_path):
    # Every rank may train its own copy; they must agree to the byte.
    path = tmp_path / "c.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    cfg = cfg_for(path, tokenizer="bpe")
    build_tokenizer(cfg, 300, tmp_path / "a")
    build_tokenizer(cfg, 300, tmp_path / "b")
    a = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert a == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_cache_is_reused_and_invalidated(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    cache = tmp_path / "cache"
    cfg = cfg_for(path, tokenizer="bpe")
    first = build_data(cfg, 300, cache)
    tok_file = cache / "tokenizer.json"
    token_files = sorted(cache.glob("tokens-*.npy"))
    assert tok_file.is_file() and len(token_files) == 1
    stamps = (tok_file.stat().st_mtime_ns, token_files[0].stat().st_mtime_ns)

    second = build_data(cfg, 300, cache)
    assert (tok_file.stat().st_mtime_ns, token_files[0].stat().st_mtime_ns) == stamps
    assert np.array_equal(second.train_tokens, first.train_tokens)
    assert second.tokenizer.encode(TEXT[:200]) == first.tokenizer.encode(TEXT[:200])

    # Another vocabulary size must retrain, and tokens must be recomputed for it.
    third = build_data(cfg, 280, cache)
    assert third.tokenizer.vocab_size <= 280 < first.tokenizer.vocab_size
    assert len(sorted(cache.glob("tokens-*.npy"))) == 2
    # Changed text must not reuse the old tokenizer either.
    path.write_text(TEXT[::-1] * 3, encoding="utf-8")
    fourth = build_data(cfg, 280, cache)
    assert fourth.tokenizer.decode(fourth.tokenizer.encode("ab")) == "ab"
    assert len(sorted(cache.glob("tokens-*.npy"))) == 3


# --------------------------------------------------------------------------- errors


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        build_data(cfg_for(tmp_path / "nope.txt"), 256, tmp_path)
    assert "data.source=" in one_line_error(e) and "not found" in str(e.value)


def test_empty_corpus(tmp_path):
    for name, content in (("e.txt", " \n\n"), ("e.jsonl", ""), ("e.bin", "")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError) as e:
            build_data(cfg_for(tmp_path / name), 256, tmp_path / "cache")
        assert "data.source=" in one_line_error(e) and "empty" in str(e.value)


def test_corpus_shorter_than_a_window(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    # 100 bytes: val gets 10 tokens, fewer than seq_len+1 = 17.
    with pytest.raises(DataError) as e:
        build_data(cfg_for(path), 256, tmp_path)
    assert "data.seq_len=16" in one_line_error(e) and "validation" in str(e.value)
    with pytest.raises(DataError) as e:
        build_data(cfg_for(path, seq_len=200, val_fraction=0.5), 256, tmp_path)
    assert "data.seq_len=200" in one_line_error(e) and "train" in str(e.value)


def test_bin_size_not_a_multiple_of_the_dtype(tmp_path):
    path = tmp_path / "odd.bin"
    np.arange(1001, dtype=np.uint16).tofile(path)  # 2002 bytes: not whole uint32s
    with pytest.raises(DataError) as e:
        build_data(cfg_for(path, bin_dtype="uint32"), 4096, tmp_path)
    assert "data.bin_dtype=uint32" in one_line_error(e) and "2002" in str(e.value)


def test_vocab_overflow(tmp_path):
    path = tmp_path / "big.bin"
    np.full(500, 3000, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError) as e:
        build_data(cfg_for(path, tokenizer="bpe"), 2048, tmp_path)
    assert "model.vocab_size=2048" in one_line_error(e) and "3000" in str(e.value)


def test_byte_tokenizer_needs_256(tmp_path):
    with pytest.raises(DataError) as e:
        build_tokenizer(cfg_for("stdlib"), 100, tmp_path)
    assert "model.vocab_size=100" in one_line_error(e)


@pytest.mark.parametrize("bad_line,fragment", [
    ("{not json", "not valid JSON"),
    ('{"body": "x"}', "`text`"),
    ('{"text": 5}', "`text`"),
    ('["text"]', "`text`"),
])
def test_jsonl_bad_line_names_the_line(tmp_path, bad_line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n' + bad_line + "\n")
    with pytest.raises(DataError) as e:
        build_data(cfg_for(path), 256, tmp_path)
    message = one_line_error(e)
    assert "data.source=" in message and "line 3" in message and fragment in message
