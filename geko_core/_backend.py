"""The one place that loads the compiled core and decides which implementation runs.

Backends of the statistics operators:

* ``"triton"``: the fused Triton kernels in ``geko_core.kernels``, for CUDA tensors
  (or any tensor when ``TRITON_INTERPRET=1``, the CPU interpreter used in tests);
* ``"cpp"``: the compiled OpenMP kernels in ``geko_core._C``, for CPU tensors;
* ``"reference"``: the plain torch implementation in ``geko_core.reference``, on request.

``backend_status()`` says which are usable here and, when one is not, why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import os
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

__all__ = [
    "BackendStatus",
    "CompiledCoreError",
    "backend_status",
    "compiled_core_error",
    "load_compiled_core",
    "resolve_backend",
    "source_tree_root",
]

BUILD_HINT = (
    "Build it from the source checkout with `pip install .` "
    "(or `pip install --no-build-isolation -e .` for development); "
    "a C++17 compiler, CMake >= 3.18 and pybind11 are needed."
)


class CompiledCoreError(ImportError):
    """geko_core._C is missing, broken or built for another version."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def source_tree_root() -> Path | None:
    """The source checkout this package is imported from, when it has no compiled core.

    From a checkout's root, ``import geko_core`` finds the ``geko_core/`` folder of the
    sources before the installed package (the working directory comes first on
    ``sys.path``); that folder holds no ``_C``. Recognised by the checkout's
    ``pyproject.toml`` and ``csrc/`` next to the package folder, and no ``_C`` extension in
    any folder of the package (an editable install keeps it outside the sources).
    """
    import geko_core

    package = Path(__file__).resolve().parent
    root = package.parent
    if not ((root / "pyproject.toml").is_file() and (root / "csrc").is_dir()):
        return None
    for folder in getattr(geko_core, "__path__", [str(package)]):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (Path(folder) / f"_C{suffix}").exists():
                return None
    return root


@functools.lru_cache(maxsize=None)
def _import_compiled_core() -> tuple[ModuleType | None, str | None]:
    from . import __version__

    try:
        module = importlib.import_module("geko_core._C")
    except ImportError as exc:  # missing, or an undefined symbol / ABI problem
        root = source_tree_root()
        if root is not None:
            return None, (
                f"geko_core._C could not be imported: you are importing the source tree at {root}; "
                "run from another folder or install with `pip install -e .` "
                f"(the import failed with: {exc})"
            )
        return None, f"geko_core._C could not be imported ({exc}). {BUILD_HINT}"
    built = module.build_info().get("version")
    if built != __version__:
        return None, (
            f"geko_core._C was built for version {built}, but the Python package is {__version__}. "
            f"Rebuild it. {BUILD_HINT}"
        )
    return module, None


def compiled_core_error() -> str | None:
    """Why the compiled core cannot be used, or None when it can."""
    return _import_compiled_core()[1]


def load_compiled_core() -> ModuleType:
    """geko_core._C, or a CompiledCoreError that says how to build it."""
    module, error = _import_compiled_core()
    if module is None:
        raise CompiledCoreError(error)
    return module


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_probe() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return BackendStatus(False, f"triton is not importable ({type(exc).__name__}: {exc})")
    return BackendStatus(True, f"triton {triton.__version__}")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def backend_status() -> dict[str, BackendStatus]:
    """Which statistics backends can run here, and why not when they cannot."""
    status: dict[str, BackendStatus] = {}
    triton_status = _triton_probe()
    if not triton_status.available:
        status["triton"] = triton_status
    elif triton_interpreter_enabled():
        status["triton"] = BackendStatus(True, f"{triton_status.reason}, interpreter (TRITON_INTERPRET=1): CPU tensors, slow")
    elif _cuda_available():
        status["triton"] = BackendStatus(True, f"{triton_status.reason} on CUDA")
    else:
        status["triton"] = BackendStatus(False, f"{triton_status.reason} is installed but no CUDA device is visible")
    error = compiled_core_error()
    status["cpp"] = BackendStatus(error is None, "compiled core loaded" if error is None else error)
    status["reference"] = BackendStatus(True, "torch reference (always available)")
    return status


def resolve_backend(device_type: str, requested: str | None, *, traced: bool = False, float64: bool = False) -> str:
    """The backend that runs for tensors on ``device_type``: the one place that chooses.

    Every operation (``sample_stats``, the two cross-entropies, the angle statistics) keeps a
    table of backends keyed by these names and looks the answer up there.

    Args:
        device_type: ``tensor.device.type`` of the logits.
        requested: ``None`` (automatic), ``"triton"``, ``"cpp"`` or ``"reference"``.
        traced: torch.compile is tracing the caller (``torch.compiler.is_compiling()``):
            every backend but the reference is then ``"op"``, the ``torch.ops.geko``
            operators, which pick the kernel by device inside the graph.
        float64: the inputs are float64. They are computed in float64, which only the
            reference does (the compiled kernels accumulate in float32): ``None`` and
            ``"cpp"`` (and the operators under torch.compile) answer ``"reference"``; the
            Triton backend refuses float64 (the caller says so).

    Raises:
        ValueError: unknown backend name, or a backend that cannot take these tensors.
        CompiledCoreError: the C++ backend was needed but is not built.
    """
    if requested is None and device_type == "cpu" and not traced and not float64 and compiled_core_error() is None:
        return "cpp"  # the usual CPU call, answered before anything else is looked at
    # Imported here: `import geko_core` stays free of torch, so that a broken install can
    # still report itself (`python -m geko_core.info`).
    from ._checks import check_choice

    check_choice(requested, "backend", (None, "triton", "cpp", "reference"))
    if requested == "reference" or (float64 and requested != "triton"):
        return "reference"
    if traced:
        return "op"
    if requested is None:
        if device_type == "cuda":
            requested = "triton"
        elif device_type == "cpu":
            requested = "cpp"
        else:
            return "reference"
    if requested == "triton":
        probe = _triton_probe()
        if not probe.available:
            raise ValueError(f"backend 'triton' is unavailable: {probe.reason}")
        if device_type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {device_type}); "
                "set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter"
            )
        return "triton"
    if device_type != "cpu":
        raise ValueError(f"backend 'cpp' needs CPU tensors, got {device_type}")
    load_compiled_core()
    return "cpp"
