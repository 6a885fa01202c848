"""Every Triton kernel in duet_kernels/ compiled for sm90 (H100/H200) by Triton's offline compiler, on CPU.

`python -m duet_kernels.sm90_report` compiles each kernel for every config its autotuner may pick
and every constexpr/dtype variant the public functions launch, and reads registers, stack
(spill) and local bytes from the cubin with the cuobjdump in the triton wheel. It runs once, in
a subprocess: without TRITON_INTERPRET (conftest sets it for the interpreter tests, and
interpreted kernels cannot be compiled) and with a fresh TRITON_CACHE_DIR, so that nothing is
taken from an earlier compile.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Spill bound, bytes of stack frame per thread (ptxas spills registers to the stack). 0: a
# spill turns into local-memory traffic in the GEMM main loop, every kernel here fits in
# registers (measured), and a new spill is exactly the regression this test is for.
SPILL_BOUND_BYTES = 0
SM90_MAX_REGS = 255  # registers per thread on sm90
SM90_MAX_DYNAMIC_SHARED = 227 * 1024  # shared memory per block on H100/H200 (with the opt-in)

QUANTISERS = {"_quant_rows_kernel", "_quant_cols_kernel", "_quant_blocks_kernel"}
GEMMS = {"_gemm_kernel", "_grouped_gemm_kernel"}
WGRAD_GEMMS = {"_k_grouped_kernel"}  # fp32 out only (weight gradients)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "duet_kernels.sm90_report", "--jobs", "2",
                           "--json", str(tmp / "report.json"), "--ptx-dir", str(tmp / "ptx")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert (tmp / "report.json").exists(), f"no report (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads((tmp / "report.json").read_text())
    data["returncode"], data["stdout"], data["stderr"] = proc.returncode, proc.stdout, proc.stderr
    return data


def compiled(report, kernels=None) -> list[dict]:
    rows = [r for r in report["rows"] if "error" not in r and (kernels is None or r["kernel"] in kernels)]
    assert rows, f"no compiled rows for {kernels}"
    return rows


def label(row) -> str:
    return f"{row['kernel']} [{row['variant']}] {row['config']}"


def test_every_kernel_compiles_for_sm90(report):
    errors = [f"{label(r)}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert report["returncode"] == 0, report["stderr"][-4000:]
    # Every kernel under duet_kernels/ (the report fails on one it has no launch for) is here.
    assert {r["kernel"] for r in report["rows"]} == (QUANTISERS | GEMMS | WGRAD_GEMMS
                                                     | {"_cast_kernel", "_dequant_kernel"})


def test_no_spills_and_within_sm90_limits(report):
    bad = [f"{label(r)}: {r['regs']} regs, {r['stack_bytes']} B stack, {r['local_bytes']} B local, "
           f"{r['dynamic_shared']} B shared" for r in compiled(report)
           if r["stack_bytes"] > SPILL_BOUND_BYTES or r["local_bytes"] > SPILL_BOUND_BYTES
           or r["regs"] > SM90_MAX_REGS or r["dynamic_shared"] > SM90_MAX_DYNAMIC_SHARED]
    assert not bad, "\n".join(bad)


def test_every_autotune_config_and_runtime_variant_is_compiled(report):
    # Read from the autotuners themselves, in this (interpreter) process: a config added to a
    # tuner but missing from the report fails here.
    gemm = importlib.import_module("duet_kernels.fp8.gemm")
    grouped = importlib.import_module("duet_kernels.fp8.grouped_gemm")
    # (b-scale rows, accumulate, output dtype) that gemm / gemm_1x128 launch, per tuner.
    gemm_variants = [(gemm._gemm_tuned, 128, False, "bf16"), (gemm._gemm_tuned, 128, False, "fp32"),
                     (gemm._gemm_tuned, 1, False, "fp32"), (gemm._gemm_acc_tuned, 1, True, "fp32")]
    rows = [r for r in report["rows"] if r["kernel"] == "_gemm_kernel"]
    for tuner, b_rows, acc, out in gemm_variants:
        for cfg in tuner.configs:
            match = [r for r in rows if r["constexprs"]["B_SCALE_ROWS"] == b_rows
                     and r["constexprs"]["ACCUMULATE"] == acc and r["signature"]["c_ptr"] == f"*{out}"
                     and all(r["constexprs"][k] == v for k, v in cfg.kwargs.items())
                     and r["options"] == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}]
            assert match, f"gemm config {cfg} (B_SCALE_ROWS={b_rows}, ACCUMULATE={acc}) not compiled"
    assert len(rows) == sum(len(t.configs) for t, *_ in gemm_variants)
    rows = [r for r in report["rows"] if r["kernel"] == "_grouped_gemm_kernel"]
    for out in ("bf16", "fp32"):
        for cfg in grouped._grouped_tuned.configs:
            assert [r for r in rows if r["signature"]["c_ptr"] == f"*{out}"
                    and all(r["constexprs"][k] == v for k, v in cfg.kwargs.items())
                    and r["options"] == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}], cfg
    rows = [r for r in report["rows"] if r["kernel"] == "_k_grouped_kernel"]
    for cfg in grouped._k_grouped_tuned.configs:
        assert [r for r in rows if all(r["constexprs"][k] == v for k, v in cfg.kwargs.items())
                and r["options"] == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}], cfg
    assert len(rows) == len(grouped._k_grouped_tuned.configs)
    # Quantisers: both POW2 settings for fp32 and bf16 inputs; dequantiser: both scale layouts
    # (1x128, 128x128) for fp32 and bf16 outputs.
    inputs = {"_quant_rows_kernel": "x_ptr", "_quant_cols_kernel": "x_ptr", "_quant_blocks_kernel": "w_ptr"}
    for kernel, ptr in inputs.items():
        got = {(r["signature"][ptr], r["constexprs"]["POW2"]) for r in report["rows"]
               if r["kernel"] == kernel}
        assert got == {(x, p) for x in ("*fp32", "*bf16") for p in (False, True)}, kernel
    got = {(r["signature"]["y_ptr"], r["constexprs"]["SR"], r["constexprs"]["SC"])
           for r in report["rows"] if r["kernel"] == "_dequant_kernel"}
    assert got == {(y, sr, 128) for y in ("*fp32", "*bf16") for sr in (1, 128)}


def _ptx(row) -> str:
    return Path(row["ptx"]).read_text()


def test_quantisers_ptx_propagates_nan(report):
    # Before the NaN work these kernels had only plain max.f32 (which returns the other operand
    # for a NaN) and no NaN test at all.
    for row in compiled(report, QUANTISERS):
        ptx = _ptx(row)
        assert "max.NaN.f32" in ptx, label(row)  # amax reduction and the 1e-4 floor
        assert not re.search(r"\bmax\.f32", ptx), f"{label(row)}: a NaN-dropping float max is left"
        assert "setp.nan.f32" in ptx, label(row)  # NaN -> e4m3 NaN bytes in to_e4m3
    for row in compiled(report, {"_cast_kernel"}):
        # On a bf16 input the compiler tests NaN before the (exact) upcast to fp32.
        assert re.search(r"setp\.nan\.(f32|bf16)", _ptx(row)), label(row)
    # bf16 stores (cast_out) keep NaN out of the rounding bit trick.
    out_ptr = {"_dequant_kernel": "y_ptr", "_gemm_kernel": "c_ptr", "_grouped_gemm_kernel": "c_ptr"}
    bf16_rows = [r for r in compiled(report, set(out_ptr)) if r["signature"][out_ptr[r["kernel"]]] == "*bf16"]
    assert {r["kernel"] for r in bf16_rows} == {"_dequant_kernel"} | GEMMS
    for row in bf16_rows:
        assert "setp.nan.f32" in _ptx(row), label(row)


def test_gemm_main_loops_are_pipelined(report):
    # With the loads of later K blocks in flight, the loop waits for "all but N" copy groups,
    # N >= 1. A loop Triton failed to pipeline waits for everything (wait_group 0) each
    # iteration, which would pass the register test (it frees registers) while being slow.
    for row in compiled(report, GEMMS | WGRAD_GEMMS):
        waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", _ptx(row))]
        assert waits and max(waits) >= 1, f"{label(row)}: not pipelined (cp.async waits {waits})"
