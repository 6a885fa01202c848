"""Corpus -> tokens -> deterministic, resumable, rank-sharded batches.

The pipeline is deliberately small: read a corpus (the running Python's standard library by
default, or a .txt/.jsonl/.bin file), train or load a tokenizer, tokenize once and cache the
token array in the run folder, split it contiguously into train and validation, and sample
random windows. A batch is a pure function of (seed, index), so resuming needs only the
position and every data-parallel rank can cut its own rows out of the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framework.config import DataConfig
from framework.errors import DataError  # noqa: F401 (raised here, imported from here by callers)

MB = 1 << 20
# Folders of the standard library that are not representative library source.
# encodings/ is mostly generated code-page tables: repetitive text that teaches little.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
# Tokenizer training and encoding run on pieces of about this many characters so that the
# Rust side can use every core; a piece ends at a newline when there is one.
_CHUNK_CHARS = 1 << 16


# --------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """What the trainer needs from a tokenizer: a vocabulary size and text <-> ids."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8: no training, no cache, every text round-trips."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A model with vocab_size > 256 can sample ids that are no byte, and a sample may
        # cut a multi-byte character: show both as U+FFFD rather than fail.
        out = bytearray()
        for i in ids:
            out += bytes([int(i)]) if 0 <= int(i) < 256 else "\ufffd".encode()
        return out.decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE from the `tokenizers` library (trained by `build_tokenizer`)."""

    def __init__(self, tok: Any) -> None:  # a tokenizers.Tokenizer (imported lazily)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Encode pieces in parallel (Rust threads); the order of the result is kept."""
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class IdTokenizer(Tokenizer):
    """Stands in for the unknown tokenizer of a pre-tokenized .bin: ids <-> "12 7 300"."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise DataError("data.source is a pre-tokenized .bin: its tokenizer is unknown, so "
                            "only space-separated token ids can be encoded") from None
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Split `text` into pieces of at most ~size characters, cutting after a newline."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline > start:
                end = newline + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _train_bpe(text: str, vocab_size: int) -> Any:
    # Imported here so that byte-level and .bin runs do not need the package.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    # Byte-level pre-tokenization gives every byte a token, so any text round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(text), trainer)
    return tok


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")  # keeps ("ab", "c") apart from ("a", "bc")
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    # Several ranks may build the same cache at once; each writes a private file and renames,
    # so a reader never sees a half-written file (the contents are identical anyway).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _bpe_cached(text: str, vocab_size: int, cache_dir: Path) -> tuple[BPETokenizer, str]:
    """Load cache_dir/tokenizer.json if it was trained on this text and size, else train it.

    Returns the tokenizer and the hash of its JSON (the token cache is keyed by it).
    """
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 256:
        raise DataError(f"model.vocab_size={vocab_size}: byte-level BPE needs >= 256 "
                        "(one token per byte); raise it or use data.tokenizer=byte")
    path, meta_path = cache_dir / "tokenizer.json", cache_dir / "tokenizer.meta.json"
    want = {"vocab_size": vocab_size, "corpus_sha256": _sha(text)}
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if {k: meta.get(k) for k in want} == want:
            blob = path.read_text()
            return BPETokenizer(HFTokenizer.from_str(blob)), _sha(blob)
    blob = _train_bpe(text, vocab_size).to_str()
    _write_atomic(path, blob.encode())
    _write_atomic(meta_path, json.dumps(want).encode())
    return BPETokenizer(HFTokenizer.from_str(blob)), _sha(blob)


def build_tokenizer(cfg: DataConfig, vocab_size: int, cache_dir: Path) -> Tokenizer:
    """The tokenizer `cfg` asks for; BPE is trained on the corpus (or loaded from cache_dir)."""
    if cfg.tokenizer == "byte":
        if vocab_size < 256:
            raise DataError(f"model.vocab_size={vocab_size}: the byte tokenizer needs >= 256")
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: choose bpe or byte")
    if _is_bin(cfg):
        return IdTokenizer(vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _bpe_cached(read_corpus(cfg), vocab_size, cache_dir)[0]


# --------------------------------------------------------------------------- corpus


def _is_bin(cfg: DataConfig) -> bool:
    return cfg.source != "stdlib" and Path(cfg.source).suffix == ".bin"


def _source_path(cfg: DataConfig) -> Path:
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise DataError(f"data.source={cfg.source!r}: file not found; give an existing "
                        ".txt/.jsonl/.bin path or data.source=stdlib")
    return path


def _cut_utf8(raw: bytes, limit: int) -> bytes:
    """The first <= limit bytes of raw, not splitting a UTF-8 character."""
    if len(raw) <= limit:
        return raw
    while limit > 0 and (raw[limit] & 0xC0) == 0x80:  # 0b10xxxxxx: a continuation byte
        limit -= 1
    return raw[:limit]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    # Order by a hash of the relative path: the same corpus wherever Python is installed, and
    # a size cap or the validation tail samples all of the library, not just its last
    # folders alphabetically (encodings/ is mostly repetitive code-page tables).
    return sorted(found, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


def _read_stdlib(cap: int) -> bytes:
    parts, size = [], 0
    for path in _stdlib_files():
        raw = _cut_utf8(path.read_bytes(), cap - size)
        if raw and not raw.endswith(b"\n"):
            raw += b"\n"  # keep the last line of one file off the first line of the next
        parts.append(raw)
        size += len(raw)
        if size >= cap:
            break
    return b"".join(parts)


def _read_jsonl(path: Path, cap: int) -> bytes:
    parts, size = [], 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) carry no document
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                why = getattr(e, "msg", "not UTF-8")  # e.msg leaves out JSON's own line count
                raise DataError(f"data.source={str(path)!r}: line {number} is not valid JSON "
                                f"({why}); fix or remove that line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"data.source={str(path)!r}: line {number} has no string "
                                "`text` field; every line must be an object like "
                                '{"text": "..."}')
            raw = _cut_utf8((record["text"] + "\n").encode("utf-8"), cap - size)
            parts.append(raw)
            size += len(raw)
            if size >= cap:
                break
    return b"".join(parts)


def read_corpus(cfg: DataConfig) -> str:
    """The text of a text source, at most data.max_corpus_mb megabytes of UTF-8."""
    cap = int(cfg.max_corpus_mb * MB)
    if cfg.source == "stdlib":
        raw = _read_stdlib(cap)
    else:
        path = _source_path(cfg)
        if path.suffix == ".bin":
            raise DataError(f"data.source={cfg.source!r}: a .bin holds tokens, not text")
        if path.suffix == ".jsonl":
            raw = _read_jsonl(path, cap)
        else:
            with path.open("rb") as f:
                raw = _cut_utf8(f.read(cap + 4), cap)
    if not raw.strip():
        raise DataError(f"data.source={cfg.source!r}: the corpus is empty; give a file with "
                        "text in it")
    # Stray bytes that are not UTF-8 become U+FFFD rather than stopping the run, but a file that
    # is mostly not text (NUL bytes, or over a tenth undecodable) is a wrong path, not a corpus.
    text = raw.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") / len(text)
    if "\x00" in text or undecodable > 0.1:
        raise DataError(f"data.source={cfg.source!r}: looks binary, not UTF-8 text "
                        f"({undecodable:.0%} undecodable{', NUL bytes' if chr(0) in text else ''}); give a "
                        "text file, or a .bin of token ids with data.bin_dtype")
    return text


def _read_bin(cfg: DataConfig) -> np.ndarray:
    path = _source_path(cfg)
    if cfg.bin_dtype not in ("uint16", "uint32"):
        raise DataError(f"data.bin_dtype={cfg.bin_dtype!r}: choose uint16 or uint32")
    dtype = np.dtype(cfg.bin_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"data.bin_dtype={cfg.bin_dtype}: {path} has {size} bytes, not a "
                        f"multiple of {dtype.itemsize}; set data.bin_dtype to the dtype it "
                        "was written with")
    if size == 0:
        raise DataError(f"data.source={cfg.source!r}: the corpus is empty; give a file with "
                        "tokens in it")
    # A memmap: a large pre-tokenized corpus is paged in by the windows actually sampled.
    return np.memmap(path, dtype=dtype, mode="r")


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tokenize(tok: Tokenizer, text: str, vocab_size: int) -> np.ndarray:
    if isinstance(tok, BPETokenizer):
        pieces = tok.encode_many(_chunks(text))
        flat = np.fromiter((i for ids in pieces for i in ids), dtype=np.int64)
    else:
        flat = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return flat.astype(_token_dtype(vocab_size))


def _load_tokens(cfg: DataConfig, vocab_size: int, cache_dir: Path) -> tuple[Tokenizer, np.ndarray]:
    """Tokenizer and all tokens of the corpus; the tokens are cached under cache_dir."""
    if _is_bin(cfg):
        return build_tokenizer(cfg, vocab_size, cache_dir), _read_bin(cfg)
    text = read_corpus(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer == "bpe":
        tok, tok_key = _bpe_cached(text, vocab_size, cache_dir)
    else:
        tok, tok_key = build_tokenizer(cfg, vocab_size, cache_dir), cfg.tokenizer
    # Keyed by the text itself and the exact tokenizer, so a stale cache is never used.
    key = _sha(_sha(text), tok_key, str(vocab_size))[:16]
    path = cache_dir / f"tokens-{key}.npy"
    if path.is_file():
        return tok, np.load(path, allow_pickle=False)
    tokens = _tokenize(tok, text, vocab_size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens, allow_pickle=False)
    os.replace(tmp, path)
    return tok, tokens


# --------------------------------------------------------------------------- batches


class TokenBatches:
    """Random windows of a token array, as a pure function of (seed, batch index).

    Batch `i` is the same global batch of `batch_size` windows for every world size; rank r
    of `world` gets rows [r*B/world, (r+1)*B/world). Resuming only needs `position`.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise DataError(f"data.seq_len={seq_len}, data.batch_size={batch_size}: both "
                            "must be positive")
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"rank {rank} of world {world}: need 0 <= rank < world")
        if batch_size % world:
            raise DataError(f"data.batch_size={batch_size}: not divisible by the {world} "
                            f"data-parallel ranks; make it a multiple of {world}")
        if len(tokens) < seq_len + 1:
            raise DataError(f"data.seq_len={seq_len}: a split has only {len(tokens)} tokens, "
                            "fewer than seq_len+1; use a larger corpus (data.max_corpus_mb), "
                            "a larger data.val_fraction or a shorter data.seq_len")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world = int(seed), rank, world
        self.position = 0
        self._offsets = np.arange(seq_len + 1)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of global batch `index`, each [B/world, seq_len]."""
        if index < 0:
            raise ValueError(f"batch index {index}: must be >= 0")
        # A fresh generator per batch: no hidden state, so any batch is reproducible alone.
        rng = np.random.default_rng([self.seed, int(index)])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        rows = self.batch_size // self.world
        mine = starts[self.rank * rows:(self.rank + 1) * rows]
        windows = torch.from_numpy(self.tokens[mine[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        # Plain ints only: the checkpoint loads with weights_only / without pickle.
        return {"position": int(self.position), "seed": int(self.seed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenBatches
    val: TokenBatches
    train_tokens: np.ndarray
    val_tokens: np.ndarray


def build_data(cfg: DataConfig, vocab_size: int, cache_dir: Path, rank: int = 0,
               world: int = 1) -> Data:
    """Everything the trainer needs from `cfg.data`; slow parts are cached in cache_dir."""
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"data.val_fraction={cfg.val_fraction}: must lie strictly between "
                        "0 and 1")
    tok, tokens = _load_tokens(cfg, vocab_size, Path(cache_dir))
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"model.vocab_size={vocab_size}: data.source={cfg.source!r} has token "
                        f"id {top}; raise model.vocab_size or check data.bin_dtype")
    if top >= tok.vocab_size:  # only a .bin read with data.tokenizer=byte gets here
        raise DataError(f"data.tokenizer={cfg.tokenizer}: data.source={cfg.source!r} has "
                        f"token id {top} >= {tok.vocab_size}; use data.tokenizer=bpe for .bin "
                        "files of wider ids")
    # Contiguous split: validation text is never seen in training, not even in part.
    n_val = max(1, math.floor(len(tokens) * cfg.val_fraction))
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    for name, part in (("train", train_tokens), ("validation", val_tokens)):
        if len(part) < cfg.seq_len + 1:
            raise DataError(f"data.seq_len={cfg.seq_len}: the {name} split has {len(part)} "
                            "tokens, fewer than seq_len+1; use a larger corpus "
                            "(data.max_corpus_mb), adjust data.val_fraction or shorten "
                            "data.seq_len")
    # Different seeds so validation windows are not placed like training windows.
    train = TokenBatches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)
    val = TokenBatches(val_tokens, cfg.seq_len, cfg.batch_size, cfg.seed + 1, rank, world)
    return Data(tok, train, val, train_tokens, val_tokens)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequency distribution, in nats per token.

    A model that learned nothing beyond token frequencies reaches this loss; the learning
    test asks the trained model to beat it.
    """
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
