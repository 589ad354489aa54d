"""capture_hidden_states: a forward hook recording one layer's [B, T, d] output.

Generic behaviour on toy modules; Hugging Face GPT-2 and LLaMA with tiny random weights built
from configs (nothing downloaded) when transformers is installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from geko_core.angle import angle_concentration, angle_concentration_reference
from geko_core.integrations.hidden import HiddenStateCapture, capture_hidden_states, find_decoder_layers


class Block(nn.Module):
    def __init__(self, dim: int, tuple_output: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.tuple_output = tuple_output

    def forward(self, x):
        y = x + torch.tanh(self.linear(x))
        return (y, None) if self.tuple_output else y


class Toy(nn.Module):
    """Blocks under ``transformer.h`` (GPT-2's path) or, with ``odd_path``, under a name no
    path lists, next to a shorter ModuleList (the fallback must pick the longest)."""

    def __init__(self, dim=8, layers=3, tuple_output=False, odd_path=False) -> None:
        super().__init__()
        blocks = nn.ModuleList(Block(dim, tuple_output) for _ in range(layers))
        if odd_path:
            self.heads = nn.ModuleList([nn.Linear(dim, dim)])
            self.stack = nn.Module()
            self.stack.blocks = blocks
        else:
            self.transformer = nn.Module()
            self.transformer.h = blocks
        self.blocks = blocks

    def forward(self, x):
        for block in self.blocks:
            out = block(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


def expected_outputs(model: Toy, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    for block in model.blocks:
        out = block(x)
        x = out[0] if isinstance(out, tuple) else out
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("tuple_output", [False, True])
@pytest.mark.parametrize("odd_path", [False, True])
def test_int_layer_on_toy_models(tuple_output, odd_path):
    model = Toy(tuple_output=tuple_output, odd_path=odd_path)
    assert find_decoder_layers(model) is model.blocks
    x = torch.randn(2, 5, 8, requires_grad=True)
    expected = expected_outputs(model, x)
    for layer in (0, 1, -1):
        with capture_hidden_states(model, layer) as capture:
            model(x)
        assert torch.equal(capture.hidden, expected[layer])
        assert not capture.hidden.requires_grad  # detached
        assert not capture.active and not model.blocks[layer]._forward_hooks  # hook removed


def test_module_and_dotted_name_and_keep_all():
    model = Toy()
    x = torch.randn(3, 4, 8)
    expected = expected_outputs(model, x)
    with capture_hidden_states(model, model.blocks[1]) as by_module:
        model(x)
    with capture_hidden_states(model, "transformer.h.1", keep_all=True) as by_name:
        model(x)
        model(x[:, :2])
    assert torch.equal(by_module.hidden, expected[1])
    assert len(by_name.captured) == 2 and torch.equal(by_name.captured[0], expected[1])
    assert by_name.hidden.shape == (3, 2, 8)
    with capture_hidden_states(model, 0) as latest_only:
        model(x)
        model(x[:1])
    assert len(latest_only.captured) == 1 and latest_only.hidden.shape == (1, 4, 8)


def test_hook_removed_when_the_block_raises():
    model = Toy()
    with pytest.raises(ZeroDivisionError):
        with capture_hidden_states(model, 0) as capture:
            model(torch.randn(1, 2, 8))
            1 / 0
    assert not model.blocks[0]._forward_hooks
    assert capture.hidden.shape == (1, 2, 8)  # what was captured stays readable


def test_start_and_remove_without_context():
    model = Toy()
    capture = HiddenStateCapture(model, -1).start()
    with pytest.raises(RuntimeError, match="already active"):
        capture.start()
    model(torch.randn(1, 3, 8))
    capture.remove()
    capture.remove()  # idempotent
    model(torch.randn(2, 3, 8))  # not recorded
    assert capture.hidden.shape == (1, 3, 8)


def test_bad_arguments():
    model = Toy()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        capture_hidden_states("gpt2", 0)
    with pytest.raises(IndexError, match="out of range for a model with 3 decoder layers"):
        capture_hidden_states(model, 3)
    with pytest.raises(IndexError, match="out of range"):
        capture_hidden_states(model, -4)
    with pytest.raises(ValueError, match="no submodule 'transformer.h.7'"):
        capture_hidden_states(model, "transformer.h.7")
    with pytest.raises(ValueError, match="not a submodule"):
        capture_hidden_states(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got bool"):
        capture_hidden_states(model, True)
    with pytest.raises(TypeError, match="got float"):
        capture_hidden_states(model, 1.0)
    with pytest.raises(ValueError, match="could not find the decoder layers"):
        capture_hidden_states(nn.Linear(2, 2), 0)
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        with capture_hidden_states(model, 0) as capture:
            pass
        capture.hidden  # noqa: B018
    # a layer whose output is not [B, T, d]
    flat = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"expected \[B, T, d\]"):
        with capture_hidden_states(flat, "0"):
            flat(torch.randn(2, 4))


def test_transformers_is_not_imported():
    code = "import sys, geko_core.integrations.hidden; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------
# Hugging Face models with tiny random weights


def tiny_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=101,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(config).eval(), "transformer.ln_f"
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        vocab_size=101,
    )
    return transformers.LlamaForCausalLM(config).eval(), "model.norm"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_decoder_layers(kind):
    model, final_norm = tiny_model(kind)
    ids = torch.randint(0, 101, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    with torch.no_grad():
        with capture_hidden_states(model, 0) as first, capture_hidden_states(model, -1) as last:
            with capture_hidden_states(model, final_norm) as normed:
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(find_decoder_layers(model)) == 2
    assert first.hidden.shape == (3, 7, 32) and first.hidden.dtype == torch.float32
    # decoder layer i's output is hidden_states[i + 1]; the last one is reported after the final norm
    torch.testing.assert_close(first.hidden, out.hidden_states[1], atol=0, rtol=0)
    torch.testing.assert_close(normed.hidden, out.hidden_states[-1], atol=0, rtol=0)
    assert not torch.equal(last.hidden, out.hidden_states[-1])
    assert not first.active and not last.active

    stats = angle_concentration(last.hidden, mask, prefix_len=torch.tensor([3, 2, 4]))
    ref = angle_concentration_reference(last.hidden.double(), mask, torch.tensor([3, 2, 4]))
    assert stats.valid_tokens.tolist() == [7, 5, 5]
    torch.testing.assert_close(stats.concentration, ref.concentration.float(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stats.cross, ref.cross.float(), atol=2e-6, rtol=1e-5)
