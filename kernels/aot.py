"""Ahead-of-time compilation of the geko_core kernels for GPU targets, without a GPU.

``triton.compile`` runs the whole pipeline (Triton IR -> LLVM -> PTX -> ``ptxas``) for a
given ``GPUTarget`` on any machine, so compile errors, register counts, spills and shared
memory are known before the kernels ever meet a GPU. The register and spill counts come
from ``ptxas -v`` (Triton only reads them from the driver when a GPU loads the binary).

Usage::

    python -m geko_core.kernels.aot                  # table for sm_80 and sm_90
    python -m geko_core.kernels.aot --capability 90 --json

Needs TRITON_INTERPRET unset: ``@triton.jit`` reads it when the kernel modules are imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CompileReport",
    "KernelVariant",
    "angle_kernel_variants",
    "compile_all",
    "compile_variant",
    "format_table",
    "kernel_variants",
    "main",
]

#: Compute capabilities the kernels are checked for (A100, H100).
DEFAULT_CAPABILITIES: tuple[int, ...] = (80, 90)

_DTYPES = ("fp32", "bf16", "fp16")
# A typical LLM vocabulary: the largest V tile, the most registers.
_LARGE_VOCAB = 32000
# A small vocabulary (classification): one small tile; and the smallest tile.
_SMALL_VOCAB = 1000
_TINY_VOCAB = 10
# The loss options' constexprs (kernels/loss_options.py), in the kernels' order.
_OPTION_FLAGS = ("HAS_TEMPERATURE", "HAS_SOFTCAP", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_CLASS_WEIGHT")
_OPTION_ARGS = (("temperature", "fp32"), ("softcap", "fp32"), ("label_smoothing", "fp32"), ("z_loss", "fp32"))


def _option_flags(on: Sequence[str] = ()) -> tuple[tuple[str, bool], ...]:
    """The options' constexprs, ``on`` set and the others off."""
    unknown = set(on) - set(_OPTION_FLAGS)
    if unknown:
        raise ValueError(f"unknown option flag(s): {sorted(unknown)}")
    return tuple((name, name in on) for name in _OPTION_FLAGS)


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One specialisation of one kernel: argument types, constexprs, warps."""

    kernel: str
    dtype: str  # logits dtype, "-" when the kernel does not read logits
    signature: tuple[tuple[str, str], ...]  # (argument name, Triton type) in order
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    aligned: tuple[str, ...]  # arguments hinted divisible by 16, as Triton specialises them

    @property
    def label(self) -> str:
        # the loss options' flags only when on: the plain variants keep their labels
        shown = [(name, value) for name, value in self.constexprs if not (name in _OPTION_FLAGS and not value)]
        consts = ",".join(f"{name}={int(value) if isinstance(value, bool) else value}" for name, value in shown)
        index = "i64" if any(ty == "i64" for _, ty in self.signature) else "i32"
        # align=16: pointers and row strides divisible by 16 (e.g. V = 32000), vector loads;
        # align=1: an odd vocabulary such as 50257, element-wise loads
        align = 16 if self.signature[0][0] in self.aligned else 1
        # the attention mask's element type (HF int64 or bool/uint8), for kernels that read one
        mask = "".join(f",mask={ty.lstrip('*')}" for name, ty in self.signature if name == "mask_ptr")
        return f"{consts}{mask},warps={self.num_warps},idx={index},align={align}"


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What ptxas says about one compiled variant."""

    kernel: str
    dtype: str
    variant: str
    capability: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    shared: int  # bytes of shared memory (Triton metadata)
    seconds: float

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _stats_signature(dtype: str, index: str, write_lse: bool) -> tuple[tuple[str, str], ...]:
    # (the launcher passes the float32 token block as the unused lse pointer without WRITE_LSE)
    return (
        ("logits_ptr", f"*{dtype}"),
        ("labels_ptr", "*i64"),
        ("token_ptr", "*fp32"),
        ("valid_ptr", "*i8"),
        ("bad_ptr", "*i8"),
        ("lse_ptr", "*fp64" if write_lse else "*fp32"),
        ("T", "i32"),
        ("V", "i32"),
        ("stride_ls", index),
        ("stride_lt", index),
        ("stride_ys", "i32"),
        ("stride_yt", "i32"),
        ("field_stride", "i32"),
        ("ignore_index", "i32"),
        ("class_weight_ptr", "*fp32"),  # (the token block when unused)
        *_OPTION_ARGS,
        ("BLOCK_V", "constexpr"),
        ("WRITE_LSE", "constexpr"),
        *((name, "constexpr") for name in _OPTION_FLAGS),
    )


def _backward_signature(dtype: str, index: str) -> tuple[tuple[str, str], ...]:
    return (
        ("logits_ptr", f"*{dtype}"),
        ("labels_ptr", "*i64"),
        ("lse_ptr", "*fp64"),
        ("scale_ptr", "*fp32"),
        ("grad_ptr", f"*{dtype}"),
        ("T", "i32"),
        ("V", "i32"),
        ("stride_ls", index),
        ("stride_lt", index),
        ("stride_ys", "i32"),
        ("stride_yt", "i32"),
        ("stride_lse_s", "i32"),
        ("stride_lse_t", "i32"),
        ("stride_scale_s", "i32"),
        ("stride_scale_t", "i32"),
        ("stride_gs", index),
        ("stride_gt", index),
        ("ignore_index", "i32"),
        ("class_weight_ptr", "*fp32"),  # (the token scales when unused)
        ("weight_sum_ptr", "*fp32"),
        *_OPTION_ARGS,
        ("BLOCK_V", "constexpr"),
        *((name, "constexpr") for name in _OPTION_FLAGS),
    )


_REDUCE_SIGNATURE: tuple[tuple[str, str], ...] = (
    ("token_ptr", "*fp32"),
    ("valid_ptr", "*i8"),
    ("bad_ptr", "*i8"),
    ("sample_ptr", "*fp32"),
    ("valid_tokens_ptr", "*i32"),
    ("bucket_ptr", "*i8"),
    ("S", "i32"),
    ("T", "i32"),
    ("field_stride", "i32"),
    ("correct_threshold", "fp32"),
    ("freeze_confidence", "fp32"),
    ("hard_confidence", "fp32"),
    ("correct_margin", "fp32"),
    ("BLOCK_T", "constexpr"),
    ("MARGIN", "constexpr"),
    ("FREEZE", "constexpr"),
    ("LIGHT", "constexpr"),
    ("FOCUS", "constexpr"),
    ("HARD", "constexpr"),
    ("INVALID", "constexpr"),
)

#: Bucket codes the reduction is compiled with; the caller passes the codes of
#: csrc/include/geko/config.h, and any small integers compile to the same code shape.
_BUCKET_CONSTANTS = (("FREEZE", 0), ("LIGHT", 1), ("FOCUS", 2), ("HARD", 3), ("INVALID", -1))


def _angle_norms_signature(dtype: str, mask: str, index: str) -> tuple[tuple[str, str], ...]:
    return (
        ("hidden_ptr", f"*{dtype}"),
        ("mask_ptr", f"*{mask}"),
        ("inv_norm_ptr", "*fp32"),
        ("status_ptr", "*i8"),
        ("T", "i32"),
        ("D", "i32"),
        ("stride_hb", index),
        ("stride_ht", index),
        ("stride_mb", "i32"),
        ("stride_mt", "i32"),
        ("HAS_MASK", "constexpr"),
        ("BLOCK_T", "constexpr"),
        ("BLOCK_D", "constexpr"),
    )


def _angle_sums_signature(dtype: str, index: str) -> tuple[tuple[str, str], ...]:
    return (
        ("hidden_ptr", f"*{dtype}"),
        ("inv_norm_ptr", "*fp32"),
        ("prefix_ptr", "*i64"),
        ("partial_ptr", "*fp32"),
        ("T", "i32"),
        ("D", "i32"),
        ("num_chunks", "i32"),
        ("stride_hb", index),
        ("stride_ht", index),
        ("HAS_PREFIX", "constexpr"),
        ("BLOCK_T", "constexpr"),
        ("BLOCK_D", "constexpr"),
    )


_ANGLE_FINALIZE_SIGNATURE: tuple[tuple[str, str], ...] = (
    ("status_ptr", "*i8"),
    ("partial_ptr", "*fp32"),
    ("prefix_ptr", "*i64"),
    ("concentration_ptr", "*fp32"),
    ("cross_ptr", "*fp32"),
    ("valid_tokens_ptr", "*i32"),
    ("T", "i32"),
    ("num_chunks", "i32"),
    ("HAS_PREFIX", "constexpr"),
    ("BLOCK_T", "constexpr"),
    ("BLOCK_C", "constexpr"),
)

# A large model's hidden size and context: the largest tiles of the angle kernels (the
# tiles stop growing at d = 512 / 64 and T = 1024, so 16384 x 32768 compiles the same).
_HIDDEN_DIM = 4096
_CONTEXT = 4096


def angle_kernel_variants() -> list[KernelVariant]:
    """The angle-concentration kernels (``kernels/angle.py``): every dtype with an int64
    attention mask and with/without the prefix term, plus a bool mask, no mask, 64-bit
    strides (``B·T·d`` past 2**31) and an odd hidden size (unaligned rows)."""
    from .angle import NUM_WARPS, finalize_launch_config, norms_launch_config, sums_launch_config

    variants: list[KernelVariant] = []
    norms_t, norms_d = norms_launch_config(_HIDDEN_DIM, _CONTEXT)
    sums_t, sums_d = sums_launch_config(_HIDDEN_DIM, _CONTEXT)
    norms_aligned = ("hidden_ptr", "mask_ptr", "inv_norm_ptr", "status_ptr", "stride_hb", "stride_ht")
    sums_aligned = ("hidden_ptr", "inv_norm_ptr", "prefix_ptr", "partial_ptr", "stride_hb", "stride_ht")

    def norms(dtype: str, mask: str, has_mask: bool, index: str = "i32", aligned=norms_aligned) -> KernelVariant:
        consts = (("HAS_MASK", has_mask), ("BLOCK_T", norms_t), ("BLOCK_D", norms_d))
        signature = _angle_norms_signature(dtype, mask, index)
        return KernelVariant("_angle_norms_kernel", dtype, signature, consts, NUM_WARPS, aligned)

    def sums(dtype: str, has_prefix: bool, index: str = "i32", aligned=sums_aligned) -> KernelVariant:
        consts = (("HAS_PREFIX", has_prefix), ("BLOCK_T", sums_t), ("BLOCK_D", sums_d))
        signature = _angle_sums_signature(dtype, index)
        return KernelVariant("_angle_sums_kernel", dtype, signature, consts, NUM_WARPS, aligned)

    for dtype in _DTYPES:
        variants.append(norms(dtype, "i64", True))
        for has_prefix in (False, True):
            variants.append(sums(dtype, has_prefix))
    variants.append(norms("bf16", "u8", True))
    variants.append(norms("bf16", "bf16", False))
    variants.append(norms("bf16", "i64", True, index="i64"))
    variants.append(norms("bf16", "i64", True, aligned=("mask_ptr", "inv_norm_ptr", "status_ptr")))
    variants.append(sums("bf16", True, index="i64"))
    variants.append(sums("bf16", True, aligned=("inv_norm_ptr", "prefix_ptr", "partial_ptr")))
    block_t, block_c, finalize_warps = finalize_launch_config(_CONTEXT, _HIDDEN_DIM // sums_d)
    for has_prefix in (False, True):
        variants.append(
            KernelVariant(
                "_angle_finalize_kernel",
                "-",
                _ANGLE_FINALIZE_SIGNATURE,
                (("HAS_PREFIX", has_prefix), ("BLOCK_T", block_t), ("BLOCK_C", block_c)),
                finalize_warps,
                ("status_ptr", "partial_ptr", "prefix_ptr", "concentration_ptr", "cross_ptr", "valid_tokens_ptr"),
            )
        )
    return variants


def kernel_variants() -> list[KernelVariant]:
    """The matrix checked by the tests and printed by the CLI.

    Every kernel in every logits dtype with the launch configuration of a large vocabulary
    (largest tile, most registers); the statistics kernel also with and without ``WRITE_LSE``,
    with small vocabularies, with unaligned rows (odd V) and with 64-bit strides (tensors
    past 2**31 elements); the loss forward and the backward also with the loss options on
    (every option in every dtype, soft-capping alone, smoothing with class weights).
    """
    from .sample_stats import reduce_launch_config, stats_launch_config

    variants: list[KernelVariant] = []
    large_block, large_warps = stats_launch_config(_LARGE_VOCAB)
    stats_aligned = ("logits_ptr", "labels_ptr", "token_ptr", "valid_ptr", "bad_ptr", "lse_ptr", "stride_ls", "stride_lt")
    backward_aligned = ("logits_ptr", "labels_ptr", "lse_ptr", "scale_ptr", "grad_ptr", "stride_ls", "stride_lt", "stride_gs", "stride_gt")

    plain = _option_flags()  # every loss option off

    def stats(
        dtype: str, write_lse: bool, index: str = "i32", aligned=stats_aligned, vocab: int = _LARGE_VOCAB, flags=plain
    ) -> KernelVariant:
        block, warps = stats_launch_config(vocab)
        consts = (("BLOCK_V", block), ("WRITE_LSE", write_lse), *flags)
        return KernelVariant("_sample_stats_kernel", dtype, _stats_signature(dtype, index, write_lse), consts, warps, aligned)

    def backward(dtype: str, aligned=backward_aligned, flags=plain) -> KernelVariant:
        consts = (("BLOCK_V", large_block), *flags)
        return KernelVariant("_cross_entropy_backward_kernel", dtype, _backward_signature(dtype, "i32"), consts, large_warps, aligned)

    variants += [stats(dtype, write_lse) for dtype in _DTYPES for write_lse in (False, True)]
    variants.append(stats("bf16", True, index="i64"))
    variants.append(stats("bf16", True, aligned=("token_ptr", "valid_ptr", "bad_ptr", "lse_ptr")))
    variants += [stats("bf16", False, vocab=vocab) for vocab in (_SMALL_VOCAB, _TINY_VOCAB)]
    variants += [backward(dtype) for dtype in _DTYPES]
    variants.append(backward("bf16", aligned=("labels_ptr", "lse_ptr", "scale_ptr")))
    # the loss options (forward of the loss, WRITE_LSE=1, and its backward): every option on
    # in every dtype, soft-capping alone (Gemma) and smoothing with class weights in bf16
    option_cases = [(dtype, _option_flags(_OPTION_FLAGS)) for dtype in _DTYPES]
    option_cases += [("bf16", _option_flags(("HAS_SOFTCAP",))), ("bf16", _option_flags(("HAS_SMOOTHING", "HAS_CLASS_WEIGHT")))]
    for dtype, flags in option_cases:
        variants.append(stats(dtype, True, aligned=(*stats_aligned, "class_weight_ptr"), flags=flags))
        variants.append(backward(dtype, aligned=(*backward_aligned, "class_weight_ptr", "weight_sum_ptr"), flags=flags))
    block_t, reduce_warps = reduce_launch_config(4096)
    for margin in (False, True):  # without and with the margin rule of "correct"
        variants.append(
            KernelVariant(
                "_sample_reduce_kernel",
                "-",
                _REDUCE_SIGNATURE,
                (("BLOCK_T", block_t), ("MARGIN", margin), *_BUCKET_CONSTANTS),
                reduce_warps,
                ("token_ptr", "valid_ptr", "bad_ptr", "sample_ptr", "valid_tokens_ptr", "bucket_ptr"),
            )
        )
    variants.extend(angle_kernel_variants())
    return variants


def _kernel_function(name: str):
    from . import angle, cross_entropy, sample_stats

    for module in (sample_stats, cross_entropy, angle):
        if hasattr(module, name):
            return getattr(module, name)
    raise ValueError(f"unknown kernel {name!r}")


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas_log(log: str, kernel: str) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, stack frame) from ``ptxas -v`` output."""
    registers = _PTXAS_REGISTERS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read register/spill counts of {kernel} from the ptxas log:\n{log}")
    stack, stores, loads = (int(value) for value in spills.groups())
    return int(registers.group(1)), stores, loads, stack


def compile_variant(variant: KernelVariant, capability: int) -> CompileReport:
    """Compile one variant for ``sm_<capability>`` and read its resource usage.

    Raises:
        RuntimeError: the kernels were imported under TRITON_INTERPRET=1, or ptxas said
            nothing parsable. Compilation errors propagate as Triton raises them.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = _kernel_function(variant.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{variant.kernel} is a {type(fn).__name__}, not a JITFunction: the kernels were imported with "
            "TRITON_INTERPRET=1. Run the ahead-of-time compilation in a process without it."
        )
    names = [name for name, _ in variant.signature]
    if names != list(fn.arg_names):
        raise RuntimeError(f"aot signature of {variant.kernel} is out of date: {names} != {fn.arg_names}")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in variant.aligned}
    source = ASTSource(fn=fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs), attrs=attrs)
    log = io.StringIO()
    start = time.perf_counter()
    # A cache hit skips ptxas, whose log is the only source of the register counts.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": variant.num_warps})
    seconds = time.perf_counter() - start
    registers, stores, loads, stack = _parse_ptxas_log(log.getvalue(), variant.kernel)
    return CompileReport(
        kernel=variant.kernel,
        dtype=variant.dtype,
        variant=variant.label,
        capability=capability,
        registers=registers,
        spill_stores=stores,
        spill_loads=loads,
        stack_frame=stack,
        shared=int(compiled.metadata.shared),
        seconds=seconds,
    )


def compile_all(
    capabilities: Sequence[int] = DEFAULT_CAPABILITIES, kernels: Sequence[str] | None = None
) -> list[CompileReport]:
    """Compile every variant of ``kernel_variants()`` (only of ``kernels`` when given) for
    every capability."""
    variants = [v for v in kernel_variants() if kernels is None or v.kernel in kernels]
    if kernels is not None:
        unknown = set(kernels) - {v.kernel for v in variants}
        if unknown:
            raise ValueError(f"unknown kernel(s): {sorted(unknown)}")
    return [compile_variant(variant, capability) for capability in capabilities for variant in variants]


def format_table(reports: Sequence[CompileReport]) -> str:
    """A markdown table: kernel x target x dtype -> registers, spills, shared memory."""
    lines = [
        "| kernel | target | dtype | variant | registers | spills (st/ld bytes) | stack | shared | compile s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.kernel} | sm_{r.capability} | {r.dtype} | {r.variant} | {r.registers} | "
            f"{r.spill_stores}/{r.spill_loads} | {r.stack_frame} | {r.shared} | {r.seconds:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the resource table; exit status 1 when any variant spills."""
    parser = argparse.ArgumentParser(prog="python -m geko_core.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--capability",
        type=int,
        action="append",
        help="compute capability to compile for, e.g. 80 or 90 (repeatable; default: 80 and 90)",
    )
    parser.add_argument("--kernel", action="append", help="compile only this kernel (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler")
    capabilities = tuple(args.capability) if args.capability else DEFAULT_CAPABILITIES
    reports = compile_all(capabilities, args.kernel)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) | {"spills": r.spills} for r in reports], indent=2))
    else:
        print(format_table(reports))
    spilling = [r for r in reports if r.spills or r.stack_frame]
    if spilling:
        print(f"{len(spilling)} variant(s) spill or use a stack frame", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
