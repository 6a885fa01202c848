"""Compile every Triton kernel in duet_kernels/ for sm90 (H100/H200) without a GPU and report its resources.

    python -m duet_kernels.sm90_report [--jobs 2] [--json out.json] [--ptx-dir DIR]

Each kernel is compiled with Triton's offline compiler (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`) for every launch the code can make on a GPU: every config
its autotuner may pick, and every constexpr/dtype variant the public functions pass. The
registers, stack (spill) and local bytes are read from the cubin with the `cuobjdump` that
ships in the triton wheel; dynamic shared memory comes from the compiled kernel's metadata.
A table goes to stdout (--json: the rows with their signatures, constexprs and options;
--ptx-dir: each launch's PTX). Exit status 1 if a compile failed or a kernel under duet_kernels/
(a `@triton.jit` function named `*_kernel`) has no launch listed in `all_cases`.

TRITON_INTERPRET must not be set: under the interpreter `@triton.jit` builds interpreter
objects that the compiler cannot lower. Kept free of framework/ and parallel/ imports.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size of an H100/H200
DIVISIBLE_16 = [["tt.divisibility", 16]]  # what Triton's launcher attaches to a 16-aligned argument

_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class Case:
    """One launch to compile: a kernel, the constexpr values of one variant, one config.

    `aligned` names the integer arguments that are multiples of 16 at training sizes (Triton
    specialises them with tt.divisibility=16 at run time); every pointer is 16-byte aligned
    (torch allocations). Plain data, so that cases can go to worker processes.
    """

    module: str
    fn_name: str
    variant: str
    signature: dict
    constexprs: dict
    aligned: tuple = ()
    options: dict = field(default_factory=dict)

    @property
    def config(self) -> str:
        """Tile sizes and launch options, e.g. "BM128 BN128 BK128 w8 s4" (Triton's defaults shown)."""
        blocks = [f"{k.replace('BLOCK_', 'B')}{v}" for k, v in self.constexprs.items()
                  if k.startswith("BLOCK")]
        from triton.backends.nvidia.compiler import CUDAOptions  # its defaults are the launcher's

        warps = self.options.get("num_warps", CUDAOptions.num_warps)
        stages = self.options.get("num_stages", CUDAOptions.num_stages)
        regs = [f"maxnreg{self.options['maxnreg']}"] if "maxnreg" in self.options else []
        return " ".join([*blocks, f"w{warps}", f"s{stages}", *regs])


def _sig(ptrs: dict, ints: list[str], constexprs: dict) -> dict:
    sig = {name: f"*{dtype}" for name, dtype in ptrs.items()}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _check_signature(case: Case, arg_names: list[str]) -> None:
    """A kernel that gained or lost an argument must fail here by name, not deep in the compiler."""
    mismatch = set(arg_names) ^ set(case.signature)
    if mismatch:
        raise ValueError(f"{case.fn_name}: signature and kernel arguments differ in {sorted(mismatch)}")


def _tuned_cases(module: str, fn_name: str, tuner, variant: str, ptrs: dict, ints: list[str],
                 fixed: dict, aligned: tuple) -> list[Case]:
    """One case per config of an autotuner, so that whatever it picks has been compiled."""
    cases = []
    for cfg in tuner.configs:
        constexprs = {**fixed, **cfg.kwargs}
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if cfg.maxnreg is not None:
            options["maxnreg"] = cfg.maxnreg
        sig = _sig(ptrs, ints, constexprs)
        cases.append(Case(module, fn_name, variant, sig, constexprs, aligned, options))
    return cases


def all_cases() -> list[Case]:
    """Every kernel x variant x config the fp8 package can launch on a GPU."""
    # By module path: duet_kernels.fp8 re-exports functions named gemm and grouped_gemm.
    g = importlib.import_module("duet_kernels.fp8.gemm")
    gg = importlib.import_module("duet_kernels.fp8.grouped_gemm")
    q = importlib.import_module("duet_kernels.fp8.quantize")

    cases: list[Case] = []
    Q = "duet_kernels.fp8.quantize"
    in_dtypes = ("fp32", "bf16")  # activations and weights reach the quantisers in fp32 or bf16

    for x in in_dtypes:
        c = {"BLOCK": q.CAST_BLOCK}
        cases.append(Case(Q, "_cast_kernel", f"{x} in", _sig({"x_ptr": x, "y_ptr": "fp8e4nv"}, ["n"], c), c,
                          ("n",)))
        for pow2 in (False, True):
            label = f"{x} in, pow2={pow2}"
            c = {"POW2": pow2, "BLOCK_M": q.ROWS_PER_PROGRAM, "T": q.TILE}
            ptrs = {"x_ptr": x, "y_ptr": "fp8e4nv", "s_ptr": "fp32"}
            cases.append(Case(Q, "_quant_rows_kernel", label,
                              _sig(ptrs, ["M", "K", "stride_xm", "stride_ym", "stride_sm"], c), c,
                              ("M", "K", "stride_xm", "stride_ym")))
            c = {"POW2": pow2, "BLOCK_K": q.ROWS_PER_PROGRAM, "T": q.TILE}
            cases.append(Case(Q, "_quant_cols_kernel", label,
                              _sig(ptrs, ["M", "K", "stride_xm", "stride_yk", "stride_sk"], c), c,
                              ("M", "K", "stride_xm", "stride_yk")))
            c = {"POW2": pow2, "T": q.TILE}
            cases.append(Case(Q, "_quant_blocks_kernel", label,
                              _sig({"w_ptr": x, "y_ptr": "fp8e4nv", "s_ptr": "fp32"},
                                   ["N", "K", "stride_wb", "stride_wn", "stride_sb", "stride_sn"], c), c,
                              ("N", "K", "stride_wb", "stride_wn"), {"num_warps": q.QUANT_BLOCKS_WARPS}))
    for out in in_dtypes:
        for sr, sc, layout in ((1, q.TILE, "1x128"), (q.TILE, q.TILE, "128x128")):
            c = {"SR": sr, "SC": sc, "BLOCK_R": q.DEQUANT_BLOCK[0], "BLOCK_C": q.DEQUANT_BLOCK[1]}
            cases.append(Case(Q, "_dequant_kernel", f"{layout} scales, {out} out",
                              _sig({"x_ptr": "fp8e4nv", "s_ptr": "fp32", "y_ptr": out},
                                   ["R", "C", "stride_xb", "stride_xr", "stride_sb", "stride_sr"], c), c,
                              ("R", "C", "stride_xb", "stride_xr")))

    # gemm() writes the caller's dtype with 128x128 b-scales; gemm_1x128 (wgrad) writes fp32 with
    # 1x128 b-scales, fresh or accumulating (its own autotuner, which restores c between trials).
    # _launch passes 128x128 scales as [Nb, Kb] (K-block stride 1) and 1x128 ones as [Kb, N]
    # (column stride 1); Triton compiles an int argument equal to 1 as a constant, so that
    # stride is a constexpr here. The other one, like stride_asm, is Kb or N: not assumed aligned.
    ints = ["M", "N", "K", "stride_am", "stride_asm", "stride_bn", "stride_bsn", "stride_bsk", "stride_cm"]
    aligned = ("M", "N", "K", "stride_am", "stride_bn", "stride_cm")
    for out, rows, acc, tuner, label in (("bf16", 128, False, g._gemm_tuned, "gemm, bf16 out"),
                                         ("fp32", 128, False, g._gemm_tuned, "gemm, fp32 out"),
                                         ("fp32", 1, False, g._gemm_tuned, "gemm_1x128"),
                                         ("fp32", 1, True, g._gemm_acc_tuned, "gemm_1x128, accumulate")):
        ptrs = {"a_ptr": "fp8e4nv", "as_ptr": "fp32", "b_ptr": "fp8e4nv", "bs_ptr": "fp32", "c_ptr": out}
        unit = "stride_bsk" if rows == q.TILE else "stride_bsn"
        fixed = {unit: 1, "B_SCALE_ROWS": rows, "ACCUMULATE": acc, "BLOCK_K": q.TILE}
        cases += _tuned_cases("duet_kernels.fp8.gemm", "_gemm_kernel", tuner, label, ptrs,
                              [n for n in ints if n != unit], fixed, aligned)

    ints = ["M", "N", "K", "E", "stride_am", "stride_asm", "stride_be", "stride_bn", "stride_bse",
            "stride_bsn", "stride_cm"]
    aligned = ("M", "N", "K", "stride_am", "stride_be", "stride_bn", "stride_cm")
    for out in ("bf16", "fp32"):  # the MoE experts ask for fp32 (h1, h3, dgrad) and the model dtype
        ptrs = {"a_ptr": "fp8e4nv", "as_ptr": "fp32", "b_ptr": "fp8e4nv", "bs_ptr": "fp32", "c_ptr": out,
                "mi_ptr": "i32"}
        cases += _tuned_cases("duet_kernels.fp8.grouped_gemm", "_grouped_gemm_kernel", gg._grouped_tuned,
                              f"{out} out", ptrs, ints, {"BLOCK_K": q.TILE}, aligned)
    # The experts' weight gradients: one k-grouped launch, fp32 out, 1x128 b-scales as [Kb, N]
    # (column stride 1, a constexpr as in gemm_1x128); stride_bsk is N, not assumed aligned.
    ints = ["M", "N", "stride_am", "stride_asm", "stride_bn", "stride_bsk", "stride_ce", "stride_cm"]
    ptrs = {"a_ptr": "fp8e4nv", "as_ptr": "fp32", "b_ptr": "fp8e4nv", "bs_ptr": "fp32", "c_ptr": "fp32",
            "seg_ptr": "i32"}
    cases += _tuned_cases("duet_kernels.fp8.grouped_gemm", "_k_grouped_kernel", gg._k_grouped_tuned,
                          "fp32 out", ptrs, ints, {"stride_bsn": 1, "BLOCK_K": q.TILE},
                          ("M", "N", "stride_am", "stride_bn", "stride_ce", "stride_cm"))
    return cases


def discover_kernels() -> set[tuple[str, str]]:
    """(module, name) of every Triton kernel under duet_kernels/: each `@triton.jit` function whose
    name ends in `_kernel` (the convention here). Device helpers such as `round_to_e4m3` or
    `block_scaled_acc` are compiled inside the kernels that call them."""
    import pkgutil

    import triton

    import duet_kernels

    found = set()
    for info in pkgutil.walk_packages(duet_kernels.__path__, "duet_kernels."):
        if info.name == (__spec__.name if __spec__ else __name__):
            continue  # this module: no kernels, and `python -m` has it loaded as __main__ already
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if (isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
                    and getattr(fn, "__module__", None) == info.name):
                found.add((info.name, name))
    return found


def resource_usage(cubin: bytes, fn_name: str) -> dict:
    """REG/STACK/SHARED/LOCAL of fn_name in a cubin, from the triton wheel's cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    # The output lists " Function NAME:" then its usage line; take the line after our name.
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Function {fn_name}:" and i + 1 < len(lines):
            m = _USAGE.search(lines[i + 1])
            if m:
                regs, stack, shared, local = map(int, m.groups())
                return {"regs": regs, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}
    raise RuntimeError(f"no resource usage for {fn_name} in cuobjdump output:\n{out}")


def compile_case(case: Case, ptx_dir: str | None = None) -> dict:
    """Compile one case for sm90; the result row (error text instead of numbers on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": case.fn_name, "module": case.module, "variant": case.variant, "config": case.config,
           "signature": case.signature, "constexprs": case.constexprs, "options": case.options}
    try:
        fn = getattr(importlib.import_module(case.module), case.fn_name)
        names = fn.arg_names
        _check_signature(case, names)
        attrs = {(names.index(n),): DIVISIBLE_16 for n, t in case.signature.items()
                 if t.startswith("*") or n in case.aligned}
        start = time.perf_counter()
        with warnings.catch_warnings():
            # Triton 3.9 warns once that FP fusion defaults to on; the run-time launcher takes the
            # same default, which is what should be compiled here.
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            compiled = triton.compile(ASTSource(fn, case.signature, case.constexprs, attrs),
                                      target=GPUTarget(*SM90), options=case.options)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row.update(resource_usage(compiled.asm["cubin"], case.fn_name))
        row["dynamic_shared"] = int(compiled.metadata.shared)
        if ptx_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{case.fn_name}-{case.variant}-{case.config}").strip("_")
            row["ptx"] = os.path.join(ptx_dir, slug + ".ptx")
            with open(row["ptx"], "w") as f:
                f.write(compiled.asm["ptx"])
    except Exception as exc:  # report every failure, not only the first
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def run(cases: list[Case], jobs: int = 1, ptx_dir: str | None = None) -> list[dict]:
    """Compile cases with `jobs` worker processes; rows in the order of cases."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if jobs <= 1:
        return [compile_case(c, ptx_dir) for c in cases]
    # spawn, not fork: the parent may hold threads (torch) that a forked child would inherit locked.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(compile_case, cases, [ptx_dir] * len(cases)))


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "variant", "config", "regs", "spill(stack) B", "local B", "shared KiB")
    body = []
    for r in rows:
        if "error" in r:
            first_line = r["error"].splitlines()[0][:60]
            body.append((r["kernel"], r["variant"], r["config"], "ERROR", first_line, "", ""))
        else:
            body.append((r["kernel"], r["variant"], r["config"], str(r["regs"]), str(r["stack_bytes"]),
                         str(r["local_bytes"]), f"{r['dynamic_shared'] / 1024:.0f}"))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--ptx-dir", help="write each kernel's PTX into this folder")
    p.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("sm90_report: unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled",
              file=sys.stderr)
        return 2
    cases = all_cases()
    # A kernel added under duet_kernels/ without cases here would go unchecked: that is an error too.
    uncovered = sorted(discover_kernels() - {(c.module, c.fn_name) for c in cases})
    if args.kernel:
        cases = [c for c in cases if c.fn_name in args.kernel]
        uncovered = [u for u in uncovered if u[1] in args.kernel]
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    rows = run(cases, args.jobs, args.ptx_dir)
    rows += [{"kernel": name, "module": module, "variant": "-", "config": "-",
              "error": "no launch of this kernel is listed in duet_kernels/sm90_report.py:all_cases"}
             for module, name in uncovered]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": list(SM90), "rows": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
