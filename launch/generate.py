"""`duet-generate`: sample from a duet checkpoint (any training layout) or `duet-hf import` output.

    duet-generate RUN_DIR_OR_CHECKPOINT "prompt" [--max-new-tokens N] [--temperature T]
                  [--top-p P] [--top-k K] [--seed S] [--speculative] [--prompts-file F]

--temperature 0 is greedy. --prompts-file holds one prompt per line (decoded as one batch).
Text goes through the checkpoint's tokenizer (checkpoint_tokenizer in framework/hf.py); a run
without one (pre-tokenized data) takes and prints space-separated token ids. The imported
tokenizer's eos token, when it names one, stops a sequence. Bad input is one line and exit 2.
The model runs in one process: a checkpoint saved under any layout is loaded whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duet-generate", description="Generate text with a duet model.")
    p.add_argument("checkpoint", type=Path, help="a run folder (newest checkpoint), a checkpoints/step_* "
                   "folder, or a duet-hf import folder")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    p.add_argument("--prompts-file", type=Path, default=None, help="one prompt per line")
    return p


def _eos(ckpt: Path, tokenizer) -> tuple[int, ...]:
    conf = ckpt / "tokenizer_config.json"
    if not conf.is_file() or not hasattr(tokenizer, "_tok"):
        return ()
    eos = json.loads(conf.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tid = tokenizer._tok.token_to_id(eos) if isinstance(eos, str) else None
    return () if tid is None else (tid,)


def _prompts(args) -> list[str]:
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise ValueError(f"--prompts-file {args.prompts_file}: no such file")
        lines = [ln for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {args.prompts_file}: no prompts in it (one per line)")
        return lines + ([args.prompt] if args.prompt is not None else [])
    if args.prompt is None:
        raise ValueError("give a prompt (or --prompts-file F)")
    return [args.prompt]


def run(args) -> list[str]:
    import torch

    from framework.data import IdTokenizer
    from framework.generate import SamplingParams, generate
    from framework.hf import checkpoint_tokenizer, load_duet_checkpoint, resolve_checkpoint

    if not args.checkpoint.exists():
        raise ValueError(f"{args.checkpoint}: no such checkpoint or run folder")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    problems = params.problems()
    if problems:  # "top_p=1.5: must be ..." -> "--top-p=1.5: must be ..."
        key, rest = problems[0].split("=", 1)
        raise ValueError(f"--{key.replace('_', '-')}={rest}")
    texts = _prompts(args)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg = load_duet_checkpoint(ckpt)
    tok = checkpoint_tokenizer(ckpt) or IdTokenizer(cfg.vocab_size)
    ids = [tok.encode(t) for t in texts]
    for t, x in zip(texts, ids):
        if len(x) + params.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt {t[:30]!r}... has {len(x)} tokens; with --max-new-tokens "
                             f"{params.max_new_tokens} it exceeds the context of {cfg.max_seq_len}: "
                             "shorten it or ask for fewer tokens")
    params.stop_tokens = _eos(ckpt, tok)
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    start = time.perf_counter()
    gen = generate(model, ids, params, speculative=args.speculative)
    seconds = time.perf_counter() - start
    outs = [tok.decode(x + t.tolist()) for x, t in zip(ids, gen.tokens)]
    n = sum(t.numel() for t in gen.tokens)
    note = f", {gen.accepted}/{gen.drafted} drafts accepted" if args.speculative else ""
    print(f"duet-generate: {n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s){note}", file=sys.stderr)
    return outs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        outs = run(args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"duet-generate: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    for i, text in enumerate(outs):
        if len(outs) > 1:
            print(f"--- {i}")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
