"""`duet-generate`: sample from a duet checkpoint (any training layout) or `duet-hf import` output.

    duet-generate RUN_DIR_OR_CHECKPOINT "prompt" [--max-new-tokens N] [--temperature T]
                  [--top-p P] [--top-k K] [--seed S] [--speculative] [--prompts-file F]

--temperature 0 is greedy. --prompts-file holds one prompt per line (decoded as one batch).
Text goes through the checkpoint's tokenizer (checkpoint_tokenizer in framework/hf.py); a run
without one (pre-tokenized data) takes and prints space-separated token ids. The imported
tokenizer's eos token, when it names one, stops a sequence. Bad input is one line and exit 2,
found before any model is loaded or rank started.

Expert parallelism: `--ep N` (default: the run's parallel.ep, 1 for `duet-hf import` output)
runs N ranks on this host (gloo on CPU, launch/ranks.py), each loading only its 1/N of the
routed experts from the checkpoint (any layout's) through parallelize(). The prompts are split
over the ranks in contiguous blocks; the ranks decode in lock-step (framework.generate's
all_done) and this process prints every output in prompt order. Sequence i draws from seed
`--seed + i` whichever rank decodes it, so the output is that of one process (`--ep 1`: the
whole model in this process, on the GPU in bf16 when there is one).
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
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks on this host (default: the "
                   "run's parallel.ep; 1 = the whole model in this process)")
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


def _ep(args, meta: dict, cfg) -> int:
    """Ranks to decode on: --ep, else the run's parallel.ep; checked before anything spawns."""
    ep = args.ep if args.ep is not None else int((meta["config"].get("parallel") or {}).get("ep", 1))
    flag = "--ep" if args.ep is not None else "the run's parallel.ep (override with --ep)"
    if ep < 1:
        raise ValueError(f"{flag}={ep}: must be >= 1")
    if ep > 1:
        has_moe = cfg.n_routed_experts > 0 and (cfg.n_layers > cfg.n_dense_layers or cfg.mtp_depth > 0)
        if not has_moe:
            raise ValueError(f"{flag}={ep}: the model has no routed experts to spread; use --ep 1")
        if cfg.n_routed_experts % ep:
            fits = [d for d in range(1, cfg.n_routed_experts + 1) if cfg.n_routed_experts % d == 0]
            raise ValueError(f"{flag}={ep} does not divide model.n_routed_experts={cfg.n_routed_experts}; "
                             f"choose one of {fits}")
    return ep


def run(args) -> list[str]:
    from framework import checkpoint
    from framework.config import ModelConfig
    from framework.data import IdTokenizer
    from framework.generate import SamplingParams, check_inputs
    from framework.hf import checkpoint_tokenizer, resolve_checkpoint

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
    meta = checkpoint.read_meta(ckpt)  # the config only: no weights are read here
    cfg = ModelConfig(**meta["config"]["model"])
    ep = _ep(args, meta, cfg)
    tok = checkpoint_tokenizer(ckpt) or IdTokenizer(cfg.vocab_size)
    ids = [tok.encode(t) for t in texts]
    for t, x in zip(texts, ids):
        if len(x) + params.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt {t[:30]!r}... has {len(x)} tokens; with --max-new-tokens "
                             f"{params.max_new_tokens} it exceeds the context of {cfg.max_seq_len}: "
                             "shorten it or ask for fewer tokens")
    check_inputs(cfg, ids, params, args.speculative)  # token ids, --speculative without MTP
    params.stop_tokens = _eos(ckpt, tok)
    if ep == 1:
        tokens, stats = _one_process(ckpt, ids, params, args.speculative)
        where = ""
    else:
        tokens, stats = _as_ranks(ckpt, cfg, ep, ids, params, args.speculative)
        where = f" on {ep} ranks (ep {ep})"
    outs = [tok.decode(x + t) for x, t in zip(ids, tokens)]
    n, seconds = sum(len(t) for t in tokens), stats["seconds"]
    note = f", {stats['accepted']}/{stats['drafted']} drafts accepted" if args.speculative else ""
    print(f"duet-generate: {n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s){where}{note}",
          file=sys.stderr)
    return outs


def _one_process(ckpt: Path, ids: list[list[int]], params, speculative: bool) -> tuple[list[list[int]], dict]:
    import torch

    from framework.generate import generate
    from framework.hf import load_duet_checkpoint

    model, _ = load_duet_checkpoint(ckpt)
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    start = time.perf_counter()
    gen = generate(model, ids, params, speculative=speculative)
    stats = {"seconds": time.perf_counter() - start, "drafted": gen.drafted, "accepted": gen.accepted}
    return [t.tolist() for t in gen.tokens], stats


def _as_ranks(ckpt: Path, cfg, ep: int, ids: list[list[int]], params,
              speculative: bool) -> tuple[list[list[int]], dict]:
    """Decode on `ep` spawned ranks, rank r taking the r-th contiguous block of the prompts."""
    import os

    from launch.ranks import RankError, run_ranks

    n = len(ids)
    blocks = [list(range(r * n // ep, (r + 1) * n // ep)) for r in range(ep)]
    try:
        per_rank = run_ranks(_rank_generate, ep, str(ckpt), cfg, ids, blocks, params, speculative,
                             threads=max(1, (os.cpu_count() or 1) // ep), timeout_s=RANK_TIMEOUT_S)
    except RankError as err:
        raise RanksFailed(str(err)) from None
    tokens: list[list[int] | None] = [None] * n
    for block, got in zip(blocks, per_rank):
        for i, t in zip(block, got["tokens"]):
            tokens[i] = t
    stats = {"seconds": max(g["seconds"] for g in per_rank),
             "drafted": sum(g["drafted"] for g in per_rank), "accepted": sum(g["accepted"] for g in per_rank)}
    return tokens, stats


class RanksFailed(Exception):
    """A spawned rank raised (a bug or a broken checkpoint, not bad input): exit status 1."""


# The ranks' collective timeout and the launcher's deadline: long, since a large model decodes
# slowly on CPU; a stuck run is stopped with Ctrl-C (the ranks are killed with this process).
RANK_TIMEOUT_S = 24 * 3600.0


def _rank_generate(rank: int, world: int, ckpt: str, model_cfg, ids: list[list[int]], blocks: list[list[int]],
                   params, speculative: bool) -> dict:
    """One rank: this rank's experts from the checkpoint, its block of prompts, lock-step decoding."""
    import dataclasses

    import torch

    from framework.config import ParallelConfig, TrainConfig
    from framework.generate import ep_all_done, generate
    from parallel.mesh import Layout, build_mesh
    from parallel.parallelize import parallelize

    cfg = TrainConfig(device="cpu")
    cfg.model = model_cfg
    cfg.parallel = dataclasses.replace(ParallelConfig(), dp=world, ep=world)
    mesh = build_mesh(Layout.from_config(cfg.parallel))
    model = parallelize(model_cfg, cfg, mesh, torch.device("cpu"), "fp32", trainable=False,
                        weights_from=Path(ckpt)).model
    mine = blocks[rank]
    prompts, seeds = [ids[i] for i in mine], [params.seed + i for i in mine]
    if not prompts:  # fewer prompts than ranks: decode a stand-in, discarded, to serve the others
        prompts, seeds = [ids[0][:1]], [0]
        params = dataclasses.replace(params, max_new_tokens=1)
    start = time.perf_counter()
    gen = generate(model, prompts, params, seeds=seeds, speculative=speculative,
                   all_done=ep_all_done(mesh.ep_group))
    seconds = time.perf_counter() - start
    return {"tokens": [t.tolist() for t in gen.tokens][: len(mine)], "seconds": seconds,
            "drafted": gen.drafted if mine else 0, "accepted": gen.accepted if mine else 0}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        outs = run(args)
    except RanksFailed as e:  # not bad input (that is found before spawning): every rank's traceback
        print(str(e).rstrip(), file=sys.stderr)
        print("duet-generate: decoding on ranks failed (tracebacks above)", file=sys.stderr)
        return 1
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
