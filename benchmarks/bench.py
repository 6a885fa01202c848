"""`duet-bench`: run duet's benchmarks and write a report with tables and PNG plots.

    duet-bench                  # the CPU benchmarks (a few minutes), the GPU ones when CUDA is present
    duet-bench --quick          # a subset in under a minute, for CI
    duet-bench --out DIR        # default bench-report/: report.md plus the PNGs it links

Every figure sits beside its baseline from the same run (DESIGN.md rule 8: speed is measured
and reported, never asserted). Sections: pipeline schedules on paper (simulator, DualPipe vs
1F1B, timelines), expert-parallel overlap, all-to-all bandwidth (NCCL where there are two GPUs or
more, else gloo), and without --quick: measured pipeline bubbles vs the simulator's formula,
trainer overhead vs bare PyTorch, dp scaling, training throughput (tokens/s and MFU: the small
preset on a GPU, tiny on CPU), duet against transformers' DeepseekV3ForCausalLM (benchmarks/
peers.py), a short training run (loss and expert load over steps from its metrics.jsonl; fp8 vs
bf16 where bf16 is fast, else vs fp32), and on a GPU the FP8 GEMM TFLOPS.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from framework.plots import write_lines


def _flat(d, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        key = f"{prefix}{k}"
        numbers = isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
        if isinstance(v, (dict, list)) and not numbers:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _table(result) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return ", ".join(fmt(x) for x in v[:16])
        return str(v)

    rows = [f"| {k} | {fmt(v)} |" for k, v in _flat(result).items()]
    return "\n".join(["| figure | value |", "|---|---|", *rows])


def schedules_on_paper(out: Path, quick: bool) -> tuple[str, list[str]]:
    from framework.plots import write_timeline
    from parallel.pipeline.schedules import Placement, build
    from parallel.pipeline.simulator import Costs, simulate
    from parallel.pipeline.timeline import Timeline

    pp, chunks = (4, 8) if quick else (8, 20)
    costs = Costs(F=1, B=2, W=1, FB=3)
    formula = {"1f1b": (pp - 1) * (costs.F + costs.B - costs.W),  # split backward: W later
               "dualpipe": (pp / 2 - 1) * (costs.FB + costs.B - 3 * costs.W)}
    lines = [f"pp={pp}, {chunks} micro-batches, F=1 B=2 W=1 F&B=3 (DeepSeek's accounting)", "",
             "| schedule | makespan | x 1F1B | worst bubble | formula | peak live micro-batches |",
             "|---|---|---|---|---|---|"]
    files, sims = [], {}
    for name in ("1f1b", "dualpipe", "dualpipev"):
        sims[name] = simulate(build(name, pp, chunks), Placement(name, pp, chunks), costs)
    for name, sim in sims.items():
        lines.append(f"| {name} | {sim.makespan:g} | {sim.makespan / sims['1f1b'].makespan:.3f} | "
                     f"{max(sim.bubble):g} | {formula.get(name, '-')} | {max(sim.peak_live)} |")
        png = write_timeline(Timeline.from_simulation(sim, costs).spans, out / f"sim_{name}.png",
                             title=f"{name} pp={pp} chunks={chunks} simulated")
        files.append(png.name)
    return "\n".join(lines), files


def pipeline_measured(out: Path, quick: bool) -> tuple[str, list[str]]:
    from benchmarks import pipeline_bubble

    r = pipeline_bubble.main((["--quick"] if quick else ["--reps", "2"]) + ["--out", str(out)])
    lines = ["| schedule | step ms | x 1F1B | worst bubble ms | simulator formula ms | measured / formula |",
             "|---|---|---|---|---|---|"]
    for name, e in r["schedules"].items():
        lines.append(f"| {name} | {e['step_ms']:.1f} | {e['vs_1f1b']:.3f} | {e['bubble_max_ms']:.1f} | "
                     f"{e['formula_bubble_ms']:.1f} | {e['ratio']:.2f} |")
    return "\n".join(lines), [Path(f).name for f in r["files"] if f.endswith(".png")]


def alltoall_section(out: Path, quick: bool) -> tuple[str, list[str]]:
    from benchmarks import alltoall_bw

    r = alltoall_bw.main(["--quick"] * quick)
    lines = [f"{r['backend']}, {r['ranks']} ranks" + ("" if r["backend"] == "nccl" else
             " (no multi-GPU host: loopback sockets, not link speed)"), "",
             "| bytes per rank | ms | algbw GB/s | busbw GB/s |", "|---|---|---|---|"]
    lines += [f"| {e['bytes']:,} | {e['ms']:.3f} | {e['algbw_gbps']:.3f} | {e['busbw_gbps']:.3f} |"
              for e in r["sizes"]]
    lines += ["", "| round trip of the same bytes | ms | x raw |", "|---|---|---|",
              f"| raw all_to_all_single, out and back | {r['raw_same_bytes_ms']:.3f} | 1.00 |",
              f"| duet dispatcher: dispatch + combine ({r['rows_per_token']:.2f} rows per token, "
              f"{r['payload_bytes']:,} B) | {r['dispatcher_ms']:.3f} | {r['dispatcher_over_raw']:.2f} |"]
    curve = [(math.log2(e["bytes"]), e["busbw_gbps"]) for e in r["sizes"]]
    png = write_lines({"busbw GB/s": curve}, out / "alltoall_busbw.png",
                      title=f"all-to-all bus bandwidth vs log2 bytes per rank ({r['backend']})")
    return "\n".join(lines), [png.name]


def throughput_section(out: Path, quick: bool) -> tuple[str, list[str]]:
    from benchmarks import throughput

    r = throughput.main(["--quick"] * quick)
    lines = [f"{r['device']}; baseline: measured {r['matmul_ceiling']} matmul, "
             f"{r['matmul_tflops']:.3f} TFLOPS in this run; datasheet BF16 peak "
             f"{r['datasheet_bf16_tflops'] or 'unknown'}", "",
             "| model | precision | tokens/step | ms/step | tokens/s | model TFLOPS | of matmul "
             "| MFU (BF16 peak) |", "|---|---|---|---|---|---|---|---|"]
    for e in r["runs"]:
        mfu = f"{100 * e['mfu']:.1f}%" if e["mfu"] is not None else "-"
        lines.append(f"| {e['model']} | {e['precision']} | {e['tokens_per_step']} | {e['step_ms']:.1f} | "
                     f"{e['tokens_per_s']:,.0f} | {e['model_tflops']:.3f} | "
                     f"{100 * e['of_matmul_ceiling']:.1f}% | {mfu} |")
    return "\n".join(lines), []


def peers_section(out: Path, quick: bool) -> tuple[str, list[str]]:
    from benchmarks import peers

    r = peers.main(["--rounds", "2", "--steps", "1"])
    lines = [f"{r['device']}; duet in its default precision ({r['compute']}); torchtitan's debug model", "",
             "| shape | contender | tok/s min | tok/s median |", "|---|---|---|---|"]
    for e in r["results"]:
        lines += [f"| {e['shape']} | {n} | {c['tok_s_min']:,.0f} | {c['tok_s_median']:,.0f} |"
                  for n, c in e["contenders"].items()]
        lines.append(f"| {e['shape']} | duet / {e['best_peer']} | {e['ratio_min']:.2f}x | "
                     f"{e['ratio_median']:.2f}x |")
    return "\n".join(lines), []


def _module(name: str, argv: list[str]):
    def run(out: Path, quick: bool) -> tuple[str, list[str]]:
        import importlib

        return _table(importlib.import_module(f"benchmarks.{name}").main(argv)), []
    return run


def training_run(out: Path, quick: bool, precision: str = "fp32") -> dict[str, list[dict]]:
    run_dir = out / f"run_{precision}"
    cmd = [sys.executable, "-m", "launch.run", "model=tiny", "steps=30", f"precision={precision}",
           f"run_dir={run_dir}", "logging.log_interval=1", "logging.wandb_mode=disabled",
           "logging.progress_bar=false",
           "logging.sample_tokens=0", "checkpoint.interval=0", "eval_interval=0", "checkpoint.resume=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def training_section(out: Path, quick: bool) -> tuple[str, list[str]]:
    import torch

    from framework.precision import cpu_has_fast_bf16

    # bf16 is the baseline where it is fast (GPUs, CPUs with AMX or AVX512-BF16); elsewhere bf16
    # matmuls are emulated and slower than fp32, which is then the CPU baseline.
    fast = torch.cuda.is_available() or cpu_has_fast_bf16()
    precisions = ["bf16", "fp8"] if fast else ["fp32", "fp8"]
    runs = {p: [r for r in training_run(out, quick, p) if "loss" in r and "step" in r] for p in precisions}
    files = [write_lines({p: [(r["step"], r["loss"]) for r in rs] for p, rs in runs.items()},
                         out / "loss.png", title="training loss " + " vs ".join(precisions)).name]
    base = runs[precisions[0]]
    loads = [(r["step"], r["expert_load"]) for r in base if "expert_load" in r]
    if loads:
        layer0 = {f"expert {e}": [(s, load[0][e]) for s, load in loads] for e in range(len(loads[0][1][0]))}
        title = "tokens per expert, MoE layer 0"
        files.append(write_lines(layer0, out / "expert_load.png", title=title).name)
    lines = ["| precision | first loss | final loss | final / baseline |", "|---|---|---|---|"]
    for p, rs in runs.items():
        lines.append(f"| {p} | {rs[0]['loss']:.4f} | {rs[-1]['loss']:.4f} | "
                     f"{rs[-1]['loss'] / base[-1]['loss']:.4f} |")
    return "\n".join(lines), files


def sections(quick: bool, cuda: bool) -> list[tuple[str, object]]:
    s = [("Pipeline schedules on paper (simulator)", schedules_on_paper),
         ("Expert-parallel communication hidden by overlap",
          _module("ep_overlap", ["--quick"] if quick else [])),
         ("All-to-all bandwidth and the dispatcher beside it", alltoall_section)]
    if not quick:  # spawning pp gloo ranks per schedule takes ~40 s on two cores: not for CI
        s += [("Pipeline bubble measured on gloo ranks vs the simulator", pipeline_measured),
              ("Trainer overhead vs a bare PyTorch loop",
               _module("trainer_overhead", ["--steps", "10", "--rounds", "3"])),
              ("Data-parallel scaling", _module("dp_scaling", ["--steps", "15"])),
              ("Training throughput: tokens/s and MFU", throughput_section),
              ("duet vs transformers' DeepseekV3ForCausalLM (peers)", peers_section),
              ("Short training run: loss and expert load", training_section),
              ("Generation: duet's latent cache vs transformers' generate, MTP speculative decoding",
               _module("generate", []))]
        if cuda:
            s += [("FP8 GEMM vs BF16 matmul (GPU)", _module("fp8_gemm", []))]
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset in under a minute (CI)")
    parser.add_argument("--out", type=Path, default=Path("bench-report"))
    args = parser.parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    todo = sections(args.quick, torch.cuda.is_available())
    report = [f"# duet-bench report{' (--quick)' if args.quick else ''}", "",
              f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}; each figure "
              "beside its baseline from this run; timings depend on the host and are never asserted.", ""]
    start = time.perf_counter()
    for i, (title, fn) in enumerate(todo, 1):
        t0 = time.perf_counter()
        print(f"duet-bench [{i}/{len(todo)}] {title} ...", flush=True)
        try:
            body, files = fn(args.out, args.quick)
        except Exception as err:  # one failing benchmark must not lose the others' results
            body, files = f"failed: {type(err).__name__}: {err}", []
        report += [f"## {title}", "", body, ""] + [f"![{f}]({f})" for f in files] + [""]
        print(f"duet-bench [{i}/{len(todo)}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    (args.out / "report.md").write_text("\n".join(report))
    print(f"duet-bench: wrote {args.out / 'report.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
