"""``python -m geko_core.info``: versions, active backends and why, threads, CPU features.

Paste its output into bug reports.
"""

from __future__ import annotations

import os
import platform
import sys


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # noqa: BLE001 - report, never fail
        return f"not available ({type(exc).__name__}: {exc})"
    return str(getattr(module, "__version__", "unknown"))


def collect() -> dict:
    """Everything ``python -m geko_core.info`` prints, as a dict."""
    from . import __version__
    from ._backend import backend_status, compiled_core_error, load_compiled_core

    info: dict = {
        "geko_core": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "backends": {name: {"available": s.available, "reason": s.reason} for name, s in backend_status().items()},
    }
    if compiled_core_error() is None:
        info["compiled_core"] = dict(load_compiled_core().build_info())
    else:
        info["compiled_core"] = {"error": compiled_core_error()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = str(exc)
    return info


def _print(info: dict, indent: int = 0) -> None:
    pad = " " * indent
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{pad}{key}:")
            _print(value, indent + 2)
        else:
            print(f"{pad}{key}: {value}")


def main() -> None:
    _print(collect())


if __name__ == "__main__":
    main()
