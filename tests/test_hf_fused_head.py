"""GekoTrainer with ``geko_fused_head`` (loss from the last hidden states, no logits) and
``geko_inplace_backward``: the same training as the logits path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from geko_core.integrations.hf import GekoTrainer, output_head  # noqa: E402

VOCAB, SEQ = 64, 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=32)
    )


def tiny_gpt2() -> GPT2LMHeadModel:  # tied input and output embeddings
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    )


def make_data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g).tolist()
        labels = [-100] * (2 + i % 3) + ids[2 + i % 3 :]  # a masked prompt
        items.append({"input_ids": ids, "labels": labels})
    return items


def train(tmp_path, model, name, **options):
    args = TrainingArguments(
        # SGD: Adam's normalisation would blow float rounding of near-zero gradients up to
        # visible parameter differences; the paths differ only in summation order.
        output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-1, optim="sgd",
        logging_steps=1000, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    trainer = GekoTrainer(model=model, args=args, train_dataset=make_data(32), geko_policy="geko", **options)
    output = trainer.train()
    return trainer, output


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("option", ["geko_fused_head", "geko_inplace_backward"])
def test_option_trains_as_the_logits_path(tmp_path, make_model, option):
    plain, plain_out = train(tmp_path, make_model(), "plain")
    fused, fused_out = train(tmp_path, make_model(), option, **{option: True})
    assert fused_out.global_step == plain_out.global_step > 0
    assert fused_out.training_loss == pytest.approx(plain_out.training_loss, rel=1e-4)
    for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-4, atol=2e-5, msg=name)
    a, b = plain.selector.metrics(), fused.selector.metrics()
    assert a["buckets"] == b["buckets"] and a["backpropagated_tokens"] == b["backpropagated_tokens"]
    assert np.array_equal(plain.selector.table.field("bucket"), fused.selector.table.field("bucket"))


def test_the_head_is_restored_after_each_step(tmp_path):
    trainer, _ = train(tmp_path, tiny_llama(), "restored", geko_fused_head=True)
    head = trainer.model.get_output_embeddings()
    assert "forward" not in vars(head)
    out = trainer.model(input_ids=torch.randint(0, VOCAB, (2, SEQ)))
    assert out.logits.shape == (2, SEQ, VOCAB)


def test_models_with_transformed_logits_are_refused(tmp_path):
    model = tiny_llama()
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        output_head(model)
    with pytest.raises(TypeError, match="geko_fused_head"):
        train(tmp_path, tiny_llama(), "bad", geko_fused_head="yes")
