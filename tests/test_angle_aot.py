"""Ahead-of-time compilation of the angle-concentration kernels for sm_80 and sm_90.

Runs ``python -m geko_core.kernels.aot --kernel ...`` in a subprocess without
TRITON_INTERPRET (``@triton.jit`` reads it at import, and this session runs the interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from geko_core.kernels import aot  # noqa: E402

ANGLE_KERNELS = ("_angle_norms_kernel", "_angle_sums_kernel", "_angle_finalize_kernel")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    command = [sys.executable, "-m", "geko_core.kernels.aot", "--json", "--capability", "80", "--capability", "90"]
    for kernel in ANGLE_KERNELS:
        command += ["--kernel", kernel]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"aot failed ({result.returncode}):\n{result.stderr}\n{result.stdout[-4000:]}"
    return json.loads(result.stdout)


def test_angle_kernels_compile_for_sm80_and_sm90_in_every_dtype(compiled):
    built = {(r["kernel"], r["capability"], r["dtype"]) for r in compiled}
    for capability in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            assert ("_angle_norms_kernel", capability, dtype) in built
            assert ("_angle_sums_kernel", capability, dtype) in built
        assert ("_angle_finalize_kernel", capability, "-") in built
    assert {r["kernel"] for r in compiled} == set(ANGLE_KERNELS)
    assert len(compiled) == 2 * len(aot.angle_kernel_variants())
    variants = {r["variant"] for r in compiled}
    # with and without the mask and the prefix term, 64-bit strides, unaligned rows, bool masks
    pieces = ("HAS_MASK=0", "HAS_MASK=1", "HAS_PREFIX=0", "HAS_PREFIX=1", "idx=i64", "align=1", "mask=u8", "mask=i64")
    for piece in pieces:
        assert any(piece in v for v in variants), piece


def test_angle_kernels_do_not_spill(compiled):
    for r in compiled:
        where = f"{r['kernel']} sm_{r['capability']} {r['dtype']} {r['variant']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["stack_frame"] == 0, where
        assert 0 < r["registers"] <= 128, where  # leaves room for 4+ resident programs per SM
        assert r["shared"] <= 1024, where  # reduction scratch only


def test_aot_kernel_filter_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown kernel"):
        aot.compile_all((90,), ["_no_such_kernel"])
