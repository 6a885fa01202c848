"""TFLOPS of duet's FP8 block-scaled GEMMs against torch BF16 and torch._scaled_mm, same run.

    python -m benchmarks.fp8_gemm [--reps 20]

On CUDA: DeepGEMM's shapes (dense M x N x K 4096x7168x16384 and 4096x4096x7168; grouped
8 experts x 4096 rows, N 4096, K 7168, contiguous layout) through the Triton kernels, with
torch BF16 matmul and torch._scaled_mm (1x128/128x128 block scales if this torch/GPU accepts
them and gives the same answer, else per-tensor scales, as labelled) as baselines. Grouped
baselines run one matmul per expert. Every row also reports calc_diff against BF16.

On CPU there are no kernels to time: it runs the torch reference path at a small shape so
the script stays exercised, and says so. Those numbers are not GPU figures.

Legend: M rows, N out features, K reduction dim, E experts.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import bench_ms
from duet_kernels import fp8


def scaled_mm_fn(a_MK, b_NK, a_q, a_s, b_q, b_s, expect):
    """torch._scaled_mm for one NT product: block scales if accepted and correct, else per-tensor."""
    # torch's blockwise-scale API has changed between releases (shapes, row- vs column-major
    # scales): try the plausible layouts and keep the first that gives the right answer.
    col_major = lambda s: s.t().contiguous().t()  # noqa: E731
    for sa in (a_s, col_major(a_s)):
        for sb in (b_s, b_s.t(), b_s.t().contiguous(), col_major(b_s)):
            fn = lambda sa=sa, sb=sb: torch._scaled_mm(a_q, b_q.t(), scale_a=sa, scale_b=sb,  # noqa: E731
                                                       out_dtype=torch.bfloat16)
            try:
                if fp8.calc_diff(fn(), expect) < 1e-2:
                    return "block 1x128/128x128", fn
            except Exception:  # noqa: BLE001 - layout not accepted here: try the next one
                continue
    # Per-tensor fallback: quantise both operands whole-tensor from the high-precision inputs.
    sa = (a_MK.abs().max().float() / fp8.FP8_MAX).reshape(())
    sb = (b_NK.abs().max().float() / fp8.FP8_MAX).reshape(())
    a_pt, b_pt = fp8.to_fp8_e4m3(a_MK.float() / sa), fp8.to_fp8_e4m3(b_NK.float() / sb)
    return "per-tensor", lambda: torch._scaled_mm(a_pt, b_pt.t(), scale_a=sa, scale_b=sb,
                                                  out_dtype=torch.bfloat16)


def _gpu_only(device: str) -> None:
    """torch._scaled_mm is a GPU baseline; on CPU it is an emulation (about 11 s for one
    256x512x1024 product on an Intel AMX host), which would only slow the CPU smoke run."""
    if device != "cuda":
        raise RuntimeError("skipped on CPU (a GPU baseline; its CPU emulation is very slow)")


def dense_rows(M, N, K, reps, device):
    a_MK = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    b_NK = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    a_q, a_s = fp8.quantize_act(a_MK)
    b_q, b_s = fp8.quantize_weight(b_NK)
    flops = 2 * M * N * K
    ref = a_MK @ b_NK.T if device == "cuda" else (a_MK.float() @ b_NK.float().T)
    ours = fp8.gemm(a_q, a_s, b_q, b_s)
    name = f"gemm {M}x{N}x{K}"
    rows = [(name, "torch bf16 matmul" if device == "cuda" else "torch fp32 matmul",
             bench_ms(lambda: a_MK @ b_NK.T if device == "cuda" else a_MK.float() @ b_NK.float().T, reps),
             flops, 0.0)]
    try:
        _gpu_only(device)
        label, fn = scaled_mm_fn(a_MK, b_NK, a_q, a_s, b_q, b_s, ref)
        rows.append((name, f"torch._scaled_mm {label}", bench_ms(fn, reps), flops, fp8.calc_diff(fn(), ref)))
    except Exception as exc:  # noqa: BLE001 - e.g. CPU builds without fp8 matmul
        print(f"  torch._scaled_mm unavailable here: {exc}")
    impl = "duet triton" if device == "cuda" else "duet torch reference"
    rows.append((name, impl, bench_ms(lambda: fp8.gemm(a_q, a_s, b_q, b_s), reps), flops,
                 fp8.calc_diff(ours, ref)))
    return rows


def grouped_rows(E, rows_per_expert, N, K, reps, device):
    a_MK = torch.randn(E * rows_per_expert, K, device=device, dtype=torch.bfloat16)
    b_ENK = torch.randn(E, N, K, device=device, dtype=torch.bfloat16)
    m_indices = torch.arange(E, device=device, dtype=torch.int32).repeat_interleave(rows_per_expert)
    a_q, a_s = fp8.quantize_act(a_MK)
    b_q, b_s = fp8.quantize_weight(b_ENK)
    flops = 2 * E * rows_per_expert * N * K
    segs = [slice(e * rows_per_expert, (e + 1) * rows_per_expert) for e in range(E)]

    def per_expert_matmul():
        if device == "cuda":
            return torch.cat([a_MK[s] @ b_ENK[e].T for e, s in enumerate(segs)])
        return torch.cat([a_MK[s].float() @ b_ENK[e].float().T for e, s in enumerate(segs)])

    ref = per_expert_matmul()
    name = f"grouped {E}x{rows_per_expert}x{N}x{K}"
    rows = [(name, "torch matmul per expert", bench_ms(per_expert_matmul, reps), flops, 0.0)]
    try:
        _gpu_only(device)
        fns = [scaled_mm_fn(a_MK[s], b_ENK[e], a_q[s], a_s[s], b_q[e], b_s[e], ref[s])
               for e, s in enumerate(segs)]
        run_all = lambda: torch.cat([fn() for _, fn in fns])  # noqa: E731
        rows.append((name, f"torch._scaled_mm {fns[0][0]} per expert", bench_ms(run_all, reps), flops,
                     fp8.calc_diff(run_all(), ref)))
    except Exception as exc:  # noqa: BLE001
        print(f"  torch._scaled_mm unavailable here: {exc}")
    impl = "duet triton" if device == "cuda" else "duet torch reference"
    ours = fp8.grouped_gemm(a_q, a_s, b_q, b_s, m_indices)
    rows.append((name, impl, bench_ms(lambda: fp8.grouped_gemm(a_q, a_s, b_q, b_s, m_indices), reps), flops,
                 fp8.calc_diff(ours, ref)))
    return rows


def print_table(rows) -> None:
    print(f"{'shape':<28} {'implementation':<44} {'ms':>9} {'TFLOPS':>9} {'vs base':>8} {'calc_diff':>10}")
    base = {}
    for shape, impl, ms, flops, diff in rows:
        tflops = flops / ms / 1e9
        base.setdefault(shape, tflops)  # first row of each shape is the baseline
        print(f"{shape:<28} {impl:<44} {ms:>9.3f} {tflops:>9.3f} {tflops / base[shape]:>7.2f}x {diff:>10.2e}")


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} - Triton kernels (autotuned on first call)")
        rows = dense_rows(4096, 7168, 16384, args.reps, "cuda")
        rows += dense_rows(4096, 4096, 7168, args.reps, "cuda")
        rows += grouped_rows(8, 4096, 4096, 7168, args.reps, "cuda")
    else:
        print("No CUDA device: NO GPU FIGURES WERE MEASURED. Timing the plain-torch reference path "
              "at a small shape on CPU (not the Triton kernels; not comparable to DeepGEMM's numbers).")
        reps = min(args.reps, 5)
        rows = dense_rows(256, 512, 1024, reps, "cpu") + grouped_rows(4, 128, 256, 512, reps, "cpu")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
