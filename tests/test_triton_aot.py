"""Ahead-of-time compilation of every kernel for sm_80 and sm_90, without a GPU.

``@triton.jit`` reads TRITON_INTERPRET when the kernel modules are imported, and this test
session runs in the interpreter, so the compilation runs in a subprocess without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from geko_core._backend import triton_interpreter_enabled  # noqa: E402
from geko_core.kernels import aot  # noqa: E402

KERNELS = {
    "_sample_stats_kernel",
    "_sample_reduce_kernel",
    "_cross_entropy_backward_kernel",
    # angle concentration (tests/test_angle_aot.py checks them in detail)
    "_angle_norms_kernel",
    "_angle_sums_kernel",
    "_angle_finalize_kernel",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """JSON records of ``python -m geko_core.kernels.aot --json`` for sm_80 and sm_90."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "geko_core.kernels.aot", "--json", "--capability", "80", "--capability", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"aot failed ({result.returncode}):\n{result.stderr}\n{result.stdout[-4000:]}"
    return json.loads(result.stdout)


def test_every_kernel_compiles_for_sm80_and_sm90_in_every_dtype(compiled):
    built = {(r["kernel"], r["capability"], r["dtype"]) for r in compiled}
    for capability in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            assert ("_sample_stats_kernel", capability, dtype) in built
            assert ("_cross_entropy_backward_kernel", capability, dtype) in built
        assert ("_sample_reduce_kernel", capability, "-") in built
    assert {r["kernel"] for r in compiled} == KERNELS
    assert len(compiled) == 2 * len(aot.kernel_variants())
    # the forward of the loss (WRITE_LSE=1) and the plain statistics (WRITE_LSE=0) both built
    assert {"WRITE_LSE=0" in r["variant"] for r in compiled if r["kernel"] == "_sample_stats_kernel"} == {True, False}


def test_no_variant_spills(compiled):
    for r in compiled:
        where = f"{r['kernel']} sm_{r['capability']} {r['dtype']} {r['variant']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["stack_frame"] == 0, where
        assert 0 < r["registers"] <= 255, where
        # small reduction scratch only: nothing is staged through shared memory
        assert r["shared"] <= 1024, where


def test_ptxas_log_parser():
    log = (
        "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
        "ptxas info    : Function properties for _k\n"
        "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert aot._parse_ptxas_log(log, "_k") == (255, 40, 36, 48)
    with pytest.raises(RuntimeError, match="register/spill counts of _k"):
        aot._parse_ptxas_log("ptxas fatal : something else", "_k")


def test_compile_refuses_interpreted_kernels():
    if not triton_interpreter_enabled():
        pytest.skip("this session imported the kernels as JITFunctions (no interpreter)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_variant(aot.kernel_variants()[0], 90)
