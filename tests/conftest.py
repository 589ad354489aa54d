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
