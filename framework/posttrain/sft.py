"""Supervised fine-tuning on prompt/response pairs: the chat template, the byte codec with an
end token, jsonl rows, padded batches whose loss targets are the response tokens only.

    rows = load_rows("sft.jsonl")                  # {"messages": [...]} or {"prompt", "completion"}
    batch = collate(rows[:16])                     # tokens/targets/mask, [B, T] each
    loss = response_ce(model(batch.tokens_BT), batch, n_targets)   # response-token CE sum / n_targets

Template. A row is prompt + completion + END: the completion is R1's `<think>...</think>` then
the answer (tasks.py and rewards.reference_completion build it; jsonl rows bring their own).
Text is UTF-8 bytes (ids 0-255) and END is id 256, so the model needs vocab_size >= 257.

Targets. Position t predicts token t+1; `mask[t]` is true where token t+1 belongs to the
response (its first token through END). Prompt targets are replaced by the ignore index before
the cross-entropy, so they contribute exactly zero: changing them leaves the gradients
bit-identical (tests/test_posttrain.py).

No packing: every row is its own sequence, right-padded to the batch's longest with id 0 and
mask false. Attention is causal, so padding after a row never reaches its tokens, and no
attention crosses documents because no sequence holds two.

Normalisation: the loss is the sum of the response tokens' CE divided by the global number of
response targets (every micro-batch, every data-parallel rank), so micro-batching and dp give
the token-level mean of one big batch, not a mean of per-micro-batch means.

The loss is a function of the logits only (a head, Learner.update_heads), so it runs on every
layout, a pipeline's last stage included. It holds no sequence-wise balance term (the MoE
layers' aux loss, alpha 1e-4): post-training balances experts with the aux-loss-free bias alone
(posttrain.bias_update), as GRPO does.

Legend: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from framework.errors import DataError

END = 256  # end of response (one past the bytes)
MIN_VOCAB = END + 1
IGNORE = -100


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Bytes up to the first END (ids past the byte range show as U+FFFD)."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if i == END:
            break
        out += bytes([i]) if 0 <= i < 256 else "\ufffd".encode()
    return out.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str

    def ids(self) -> tuple[list[int], list[int]]:
        return encode(self.prompt), encode(self.completion) + [END]


@dataclass
class Batch:
    tokens_BT: torch.Tensor  # int64 inputs
    targets_BT: torch.Tensor  # int64 next tokens (any value where mask is false)
    mask_BT: torch.Tensor  # bool: the target is a response token

    def to(self, device) -> Batch:
        return Batch(self.tokens_BT.to(device), self.targets_BT.to(device), self.mask_BT.to(device))

    def rows(self, lo: int, hi: int) -> Batch:
        return Batch(self.tokens_BT[lo:hi], self.targets_BT[lo:hi], self.mask_BT[lo:hi])


def _row_of(obj, where: str) -> Row:
    """One jsonl object -> Row, or DataError naming the line and the fix."""
    shape = ('give {"prompt": "...", "completion": "..."} or {"messages": [{"role": "user", '
             '"content": "..."}, {"role": "assistant", "content": "..."}]}')
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a row must be a JSON object; {shape}")
    if "messages" in obj:
        msgs = obj["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                           and isinstance(m.get("role"), str) for m in msgs)):
            raise DataError(f"{where}: messages must be a list of >= 2 {{role, content}} objects; {shape}")
        if msgs[-1]["role"] != "assistant" or any(m["role"] == "assistant" for m in msgs[:-1]):
            raise DataError(f"{where}: messages must end with the one assistant turn (the response)")
        prompt, completion = "".join(m["content"] for m in msgs[:-1]), msgs[-1]["content"]
    elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        prompt, completion = obj["prompt"], obj["completion"]
    else:
        raise DataError(f"{where}: no string prompt/completion and no messages; {shape}")
    if not prompt or not completion:
        raise DataError(f"{where}: empty prompt or response; every row needs both")
    return Row(prompt, completion)


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a jsonl file (blank lines skipped); the first malformed row is a DataError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"SFT data {str(path)!r}: file not found; give a .jsonl file of prompt/completion "
                        "or messages rows")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not valid JSON ({err.msg}); one JSON object per line") from None
        rows.append(_row_of(obj, f"{path}:{n}"))
    if not rows:
        raise DataError(f"{path}: no rows; give at least one prompt/completion or messages row")
    return rows


def length_problems(rows: list[Row], max_seq_len: int, what: str = "SFT row") -> list[str]:
    """The first row longer than the context, as one line (sequence = prompt + response + END - 1)."""
    for i, row in enumerate(rows):
        prompt, response = row.ids()
        if len(prompt) + len(response) - 1 > max_seq_len:
            return [f"{what} {i}: {len(prompt) + len(response) - 1} tokens, longer than model.max_seq_len="
                    f"{max_seq_len}; shorten it or raise posttrain.policy.max_seq_len"]
    return []


def collate(rows: list[Row], whole: bool = False) -> Batch:
    """Right-padded batch; targets on the response (and END) only, or on every real token when
    `whole` (pre-training on the task's text format)."""
    seqs = [row.ids() for row in rows]
    T = max(len(p) + len(r) - 1 for p, r in seqs)
    tokens = torch.zeros(len(rows), T, dtype=torch.int64)
    targets = torch.zeros(len(rows), T, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (prompt, response) in enumerate(seqs):
        ids = torch.tensor(prompt + response)
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = ids[:-1], ids[1:]
        mask[b, (0 if whole else len(prompt) - 1):n] = True
    return Batch(tokens, targets, mask)


def masked_ce(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor,
              n_targets: float) -> torch.Tensor:
    """Sum of the cross-entropy over the targets where mask_BT holds, divided by n_targets (the
    global count)."""
    targets = torch.where(mask_BT, targets_BT, IGNORE)
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum") / n_targets


def response_ce(logits_BTV: torch.Tensor, batch: Batch, n_targets: float) -> torch.Tensor:
    """Sum over response targets of the next-token cross-entropy, divided by n_targets (the
    global count)."""
    return masked_ce(logits_BTV, batch.targets_BT, batch.mask_BT, n_targets)
