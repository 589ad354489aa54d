"""``Selector.loss`` from hidden states and the output layer (``lm_head=``), and with
``inplace_backward``: the same loss, gradients and table as the logits path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geko_core import Selector


def _pair(num_samples: int = 64, **options):
    return (
        Selector(num_samples, policy="geko", epochs=3, seed=0, **options),
        Selector(num_samples, policy="geko", epochs=3, seed=0, **options),
    )


def _batches(sel: Selector, batch: int):
    order = torch.from_numpy(sel.epoch_plan.indices.copy())
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


@pytest.mark.parametrize("bias", [True, False])
def test_head_path_equals_the_logits_path_on_classification(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 5, bias=bias)
    data = torch.randn(64, 6)
    targets = torch.randint(0, 5, (64,))
    with_head, with_logits = _pair()
    for idx in _batches(with_head, 16)[:3]:
        hidden = data[idx].clone().requires_grad_(True)
        loss = with_head.loss(hidden, targets[idx], idx, lm_head=head, chunk_size=5)
        grads = torch.autograd.grad(loss, [hidden, *head.parameters()])
        hidden2 = data[idx].clone().requires_grad_(True)
        loss2 = with_logits.loss(head(hidden2), targets[idx], idx)
        grads2 = torch.autograd.grad(loss2, [hidden2, *head.parameters()])
        torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
        for g, g2 in zip(grads, grads2):
            torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6)
    a, b = with_head.table.state_dict(), with_logits.table.state_dict()
    for name in ("bucket", "visits", "last_correct", "last_step"):
        assert np.array_equal(a[name], b[name]), name
    for name in ("q", "last_loss", "last_confidence"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert a["visits"].sum() == 48
    assert with_head.metrics()["backpropagated"] == with_logits.metrics()["backpropagated"] == 48


def test_head_path_on_sequences_with_shift_and_a_tied_weight():
    torch.manual_seed(1)
    embed = torch.nn.Embedding(13, 8)
    tokens = torch.randint(0, 13, (32, 7))
    labels = tokens.clone()
    labels[:, :3] = -100  # a prompt that does not count
    with_head, with_logits = _pair(32)
    for idx in _batches(with_head, 8)[:2]:
        hidden = torch.tanh(embed(tokens[idx]))
        loss = with_head.loss(hidden, labels[idx], idx, shift=True, lm_head=embed.weight, chunk_size=4)
        (g,) = torch.autograd.grad(loss, embed.weight)
        hidden2 = torch.tanh(embed(tokens[idx]))
        loss2 = with_logits.loss(hidden2 @ embed.weight.T, labels[idx], idx, shift=True)
        (g2,) = torch.autograd.grad(loss2, embed.weight)
        torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6)
    assert with_head.metrics()["backpropagated_tokens"] == with_logits.metrics()["backpropagated_tokens"] > 0


def test_a_bad_head_is_refused_before_anything_changes():
    sel = Selector(16, policy="geko", epochs=2, seed=0)
    idx = torch.arange(4)
    with pytest.raises(TypeError, match="lm_head"):
        sel.loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), idx, lm_head="head")
    fresh = Selector(16, policy="geko", epochs=2, seed=0)
    with pytest.raises(ValueError, match="weight"):
        fresh.loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), idx, lm_head=torch.nn.Linear(5, 4))
    assert fresh.state_dict()["epoch_plan"] is None and fresh.metrics()["backpropagated"] == 0  # not started


def test_inplace_backward_gives_the_same_gradient():
    torch.manual_seed(2)
    base = torch.randn(16, 9)
    targets = torch.randint(0, 9, (16,))
    first, second = _pair(16)
    idx = _batches(first, 16)[0]
    x = base.clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf whose storage may be overwritten
    first.loss(y, targets[idx], idx, inplace_backward=True).backward()
    x2 = base.clone().requires_grad_(True)
    second.loss(x2 * 1.0, targets[idx], idx).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not torch.equal(y.detach(), base)  # the logits now hold their gradient
