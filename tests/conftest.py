import os

# Triton's @jit reads TRITON_INTERPRET when a kernel module is imported, so the whole test
# session runs the Triton kernels in the CPU interpreter; ahead-of-time compilation for GPU
# targets runs in subprocesses with it unset. Triton warns when FP fusion is unset, and the
# tests run with warnings as errors.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory):
    # Child processes (`python -m ...`, `python -c ...`) put their working directory first on
    # sys.path; from the repository root that would shadow the installed package with the
    # source folder, which has neither `_C` nor `geko_core.kernels`.
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(previous)
