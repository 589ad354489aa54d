"""The shared argument checks (geko_core/_checks.py): what they accept, convert and refuse."""

import numpy as np
import pytest
import torch

from geko_core._checks import (
    check_array_1d,
    check_bool,
    check_choice,
    check_float_array,
    check_index_array,
    check_int,
    check_real,
    check_same_device,
    check_seed,
    check_shard,
    check_tensor,
)


def test_check_int():
    for value in (3, np.int64(3), np.uint8(3), torch.tensor(3), np.array(3)):
        result = check_int(value, "n")
        assert result == 3 and type(result) is int
    for value, got in ((True, "bool"), (np.bool_(False), "bool"), (2.0, "float"), ("3", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"n must be an int, got {got}$"):
            check_int(value, "n")
    with pytest.raises(TypeError, match=r"shape \(1,\)"):
        check_int(torch.tensor([3]), "n")  # one element, but not a scalar
    with pytest.raises(TypeError, match="torch.bool"):
        check_int(torch.tensor(True), "n")
    assert check_int(5, "n", low=5, high=5) == 5
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\], got 5"):
        check_int(5, "n", low=0, high=4)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", low=1)
    with pytest.raises(ValueError, match="n must be <= 2, got 3"):
        check_int(3, "n", high=2)


def test_check_real_bool_seed_and_shard():
    assert check_real(1, "x") == 1.0 and type(check_real(np.float32(0.5), "x")) is float
    for value in (True, "1", None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="x must be a real number"):
            check_real(value, "x")
    assert check_bool(np.bool_(True), "flag") is True
    for value in (1, 0, None, "yes"):
        with pytest.raises(TypeError, match="flag must be a bool"):
            check_bool(value, "flag")
    assert check_seed(2**64 - 1) == 2**64 - 1
    with pytest.raises(ValueError, match=r"seed must be in \[0, 18446744073709551615\], got -1"):
        check_seed(-1)
    assert check_shard(4, 3) == (4, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=4\), got 4"):
        check_shard(4, 4)
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        check_shard(0, 0)


def test_check_choice_compares_strings_and_none_only():
    assert check_choice("sum", "reduction", ("mean", "sum")) == "sum"
    assert check_choice(None, "backend", (None, "cpp")) is None
    for value in ("avg", True, 1, np.array(["sum"]), ["sum"]):
        with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', got"):
            check_choice(value, "reduction", ("mean", "sum"))


def test_check_tensor():
    x = torch.zeros(2, 3)
    assert check_tensor(x, "x", dtype="floating", ndim=(2, 3), shape=(2, 3)) is x
    assert check_tensor(None, "x", optional=True) is None
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor \[B, T\], got list"):
        check_tensor([1.0], "x", layout="[B, T]")
    with pytest.raises(TypeError, match="x must be None or a torch.Tensor, got ndarray"):
        check_tensor(np.zeros(3), "x", optional=True)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        check_tensor(x.long(), "x", dtype="floating")
    with pytest.raises(TypeError, match="x must be an integer tensor, got torch.bool"):
        check_tensor(x.bool(), "x", dtype="integer")
    assert check_tensor(x.bool(), "x", dtype="integer_or_bool") is not None
    with pytest.raises(TypeError, match="x must be bool or an integer tensor, got torch.float32"):
        check_tensor(x, "x", dtype="integer_or_bool")
    with pytest.raises(TypeError, match="x must be float32 or bfloat16, got torch.float64"):
        check_tensor(x.double(), "x", dtype=(torch.float32, torch.bfloat16))
    with pytest.raises(ValueError, match=r"x must be \[B, T, d\] \(3-D\), got shape \(2, 3\)"):
        check_tensor(x, "x", ndim=3, layout="[B, T, d]")
    with pytest.raises(ValueError, match=r"x must be 1-D or 3-D, got shape \(2, 3\)"):
        check_tensor(x, "x", ndim=(1, 3))
    with pytest.raises(ValueError, match=r"x must be \[B\] = \(3,\), got shape \(2, 3\)"):
        check_tensor(x, "x", shape=(3,), layout="[B]")
    with pytest.raises(ValueError, match=r"x must be of shape \(3, 2\), got shape \(2, 3\)"):
        check_tensor(x, "x", shape=(3, 2))
    with pytest.raises(ValueError, match="x is on meta but y is on cpu; they must be on the same device"):
        check_same_device(x.to("meta"), "x", x, "y")


def test_check_array_1d():
    tensor = torch.arange(4)
    assert np.shares_memory(check_array_1d(tensor, "a"), tensor.numpy())  # no copy
    assert check_array_1d(torch.ones(3, dtype=torch.bfloat16), "a").dtype == np.float32
    assert check_array_1d([1, 2], "a").tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"a is on device meta; pass CPU data \(a.cpu\(\)\)"):
        check_array_1d(torch.ones(3, device="meta"), "a")
    with pytest.raises(ValueError, match=r"a must be 1-D, got shape \(1, 3\)"):
        check_array_1d(np.zeros((1, 3)), "a")


def test_check_float_array():
    kept = np.zeros(3, np.float32)
    assert check_float_array(kept, "w") is kept
    assert check_float_array(np.zeros(3, np.float16), "w").dtype == np.float64
    assert check_float_array(np.arange(3), "w", allow_int=True).dtype == np.float64
    assert check_float_array(np.array([True, False]), "w", dtype=np.float32, allow_bool=True).tolist() == [1.0, 0.0]
    assert check_float_array(np.array([1e300]), "w", dtype=np.float32).tolist() == [np.inf]
    strided = check_float_array(np.zeros(6, np.float32)[::2], "w")
    assert strided.flags.c_contiguous
    with pytest.raises(TypeError, match="w must be a float array, got dtype int64"):
        check_float_array(np.arange(3), "w")
    with pytest.raises(TypeError, match="w must be a float or integer array, got dtype bool"):
        check_float_array(np.array([True]), "w", allow_int=True)
    with pytest.raises(TypeError, match="w must be a float or bool array, got dtype <U1"):
        check_float_array(np.array(["a"]), "w", allow_bool=True)


def test_check_index_array():
    assert check_index_array(np.array([0, 4], np.int32), "idx", 5).dtype == np.int32
    assert check_index_array(np.array([0, 4], np.uint16), "idx", 5).dtype == np.int64
    assert check_index_array(torch.tensor([1, 2]), "idx", 5).tolist() == [1, 2]
    with pytest.raises(IndexError, match=r"index -1 at position 1 of idx is out of range for \[0, 5\)"):
        check_index_array(np.array([0, -1, 9]), "idx", 5)
    with pytest.raises(IndexError, match="index 5 at position 0 of idx is out of range for a table of 5 samples"):
        check_index_array([5], "idx", 5, what="a table of 5 samples")
    # out of range, left to the callee...
    assert check_index_array(np.array([7]), "idx", 5, check_range=False).tolist() == [7]
    # ...but never an index that int64 cannot hold
    with pytest.raises(IndexError, match=f"index {2**64 - 1} at position 1"):
        check_index_array(np.array([0, 2**64 - 1], np.uint64), "idx", 5, check_range=False)
    with pytest.raises(TypeError, match="idx must be an integer array, got dtype bool"):
        check_index_array(np.array([True]), "idx", 5)
    with pytest.raises(TypeError, match="idx must be an integer array, got dtype float64"):
        check_index_array([1.0], "idx", 5)
