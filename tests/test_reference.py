"""The oracle's own rules, beyond the contracts it shares with every backend
(test_contracts.py checks every backend, the reference included, against torch's formulas)."""

import pytest
import torch

from geko_core import BUCKET_INVALID
from geko_core.reference import sample_stats_reference


def test_nonfinite_row_and_out_of_range_label_invalidate_only_their_sample():
    # An out-of-range label means what it means to the GPU kernels, which never read out of
    # bounds (the public functions refuse it on CPU tensors before any backend runs).
    logits = torch.randn(4, 8)
    logits[1, 3] = float("nan")
    labels = torch.tensor([1, 2, 99, -100])
    st = sample_stats_reference(logits, labels)
    assert st.bucket.tolist()[1:] == [BUCKET_INVALID] * 3
    assert st.bucket[0].item() != BUCKET_INVALID
    assert st.valid_tokens.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    logits = torch.randn(16, 50)
    labels = torch.randint(0, 50, (16,))
    st = sample_stats_reference(logits.to(dtype), labels)
    ref = sample_stats_reference(logits.to(dtype).float(), labels)
    torch.testing.assert_close(st.loss, ref.loss)
    assert st.loss.dtype == torch.float32
