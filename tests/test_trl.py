"""GekoSFTTrainer: the Selector inside TRL's SFTTrainer, on a tiny randomly initialised LLaMA and
generated instruction/response pairs (a character tokenizer built here: nothing is downloaded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import huggingface_hub.constants  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

import geko_core  # noqa: E402
from geko_core import Selector  # noqa: E402
from geko_core.integrations.hf import GEKO_INDEX_KEY, GekoTrainerMixin  # noqa: E402
from geko_core.integrations.trl import (  # noqa: E402
    GEKO_SEGMENT_KEY,
    GekoSFTCollator,
    GekoSFTTrainer,
)

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :"


@pytest.fixture(autouse=True, scope="module")
def quiet_and_one_thread():
    # Tiny models gain nothing from threads on a shared 2-core box; TRL would ping the Hub
    # (telemetry) from every trainer; datasets' progress bars only add noise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    telemetry = huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if bars:
        datasets.enable_progress_bars()
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = telemetry
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <pad> and </s> (TRL appends the EOS to every completion)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def make_pairs(n: int, seed: int = 0) -> datasets.Dataset:
    """Instruction/response pairs of three families and varied lengths: reverse a word, repeat
    a letter, copy a number."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    rows = []
    for i in range(n):
        family = i % 3
        if family == 0:
            word = "".join(rng.choice(letters, size=int(rng.integers(2, 7))))
            rows.append({"prompt": f"rev {word}:", "completion": word[::-1]})
        elif family == 1:
            letter, times = str(rng.choice(letters)), int(rng.integers(1, 6))
            rows.append({"prompt": f"rep {letter} {times}:", "completion": letter * times})
        else:
            number = str(int(rng.integers(0, 10**int(rng.integers(1, 5)))))
            rows.append({"prompt": f"copy {number}:", "completion": number})
    return datasets.Dataset.from_list(rows)


def make_args(tmp_path, name: str = "run", **overrides) -> SFTConfig:
    options = dict(
        output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=2e-2,
        logging_steps=1000, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_pin_memory=False, bf16=False, activation_checkpointing=False, max_length=64,
    )
    options.update(overrides)
    return SFTConfig(**options)


class ObservedStats:
    """Records what the Selector is fed: every training batch's indices and statistics."""

    def __init__(self, selector: Selector):
        self.batches: list[tuple[list[int], geko_core.SampleStats]] = []
        observe = selector.observe_stats

        def recording(idx, stats, **kwargs):
            self.batches.append((torch.as_tensor(idx).tolist(), stats))
            return observe(idx, stats, **kwargs)

        selector.observe_stats = recording

    def per_sample(self) -> dict[int, list[tuple[int, geko_core.SampleStats]]]:
        out: dict[int, list] = {}
        for idx, stats in self.batches:
            for position, i in enumerate(idx):
                out.setdefault(i, []).append((position, stats))
        return out


class Recorder:
    """Mixin recording the dataset indices and the shape of every training micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, list[int]]] = []
        self.packed: list[bool] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if GEKO_INDEX_KEY in inputs and model.training:
            self.seen.append((self.state.global_step, inputs[GEKO_INDEX_KEY].tolist()))
            self.packed.append(GEKO_SEGMENT_KEY in inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class RecordingGekoSFTTrainer(Recorder, GekoSFTTrainer):
    pass


class LossLog(TrainerCallback):
    """The training losses logged, and SFTTrainer's metrics logged with them."""

    def __init__(self):
        self.losses: list[float] = []
        self.sft_metrics: list[tuple[float, float, int]] = []  # entropy, mean_token_accuracy, num_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.sft_metrics.append((logs["entropy"], logs["mean_token_accuracy"], logs["num_tokens"]))


def sample_stats_alone(model, item: dict) -> geko_core.SampleStats:
    """geko_core.sample_stats of one prepared example, forwarded on its own."""
    ids = torch.tensor([item["input_ids"]])
    labels = torch.tensor([item["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return geko_core.sample_stats(logits, labels, shift=True)


# -- statistics -------------------------------------------------------------------------------------
CHAT_TEMPLATE = (  # the assistant turn (and its EOS) is what assistant_only_loss trains
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] }}:{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "masking, packing",
    [("completion", False), ("completion", True), ("assistant", True)],
    ids=["completion-padded", "completion-packed", "assistant-packed"],
)
def test_statistics_are_those_of_each_completion(tmp_path, tokenizer, masking, packing):
    """Completion-only loss (TRL's default for prompt-completion data) or assistant-only loss
    (conversations): what the Selector is fed for a sample is sample_stats on that sample's
    own logits with the prompt masked, whether the batch is padded or packed into one row."""
    pairs = make_pairs(24)
    options = {}
    if masking == "completion":
        data = pairs
    else:
        data = datasets.Dataset.from_list(
            [{"messages": [{"role": "user", "content": p["prompt"][:-1]}, {"role": "assistant", "content": p["completion"]}]} for p in pairs]
        )
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        tokenizer.chat_template = CHAT_TEMPLATE
        options["assistant_only_loss"] = True
    model = tiny_llama(len(tokenizer))
    # Learning rate 0: the model does not move, so each sample can be re-forwarded on its own.
    args = make_args(tmp_path, num_train_epochs=1, learning_rate=0.0, packing=packing, **options)
    trainer = RecordingGekoSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, geko_policy="uniform")
    observed = ObservedStats(trainer.selector)
    trainer.train()
    assert all(trainer.packed) == packing
    seen = observed.per_sample()
    assert sorted(seen) == list(range(24)) and all(len(v) == 1 for v in seen.values())
    model.eval()
    for i, [(position, stats)] in seen.items():
        item = trainer.train_dataset[i]
        prompt_tokens = len(pairs[i]["prompt"])  # one token a character; ':' ends the prompt
        # The prompt is masked: the labels count the completion and its EOS only.
        assert item["labels"][:prompt_tokens] == [-100] * prompt_tokens
        assert int(stats.valid_tokens[position]) == len(pairs[i]["completion"]) + 1
        alone = sample_stats_alone(model, item)
        assert int(stats.valid_tokens[position]) == int(alone.valid_tokens[0])
        assert int(stats.bucket[position]) == int(alone.bucket[0])
        assert float(stats.correct[position]) == float(alone.correct[0])
        for name in ("loss", "confidence", "label_prob", "entropy", "el2n"):
            np.testing.assert_allclose(
                float(getattr(stats, name)[position]), float(getattr(alone, name)[0]), rtol=1e-5, err_msg=f"{name} of {i}"
            )


def test_packed_rows_are_scored_per_sample(tmp_path, tokenizer):
    """Packing puts each batch's samples in one row; every sample is still observed once per
    epoch with its own statistics, and the counts are samples, not rows."""
    n, epochs, batch = 30, 2, 8
    data = make_pairs(n)
    args = make_args(tmp_path, num_train_epochs=epochs, per_device_train_batch_size=batch, packing=True)
    trainer = RecordingGekoSFTTrainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=data, processing_class=tokenizer, geko_policy="uniform"
    )
    observed = ObservedStats(trainer.selector)
    output = trainer.train()
    assert all(trainer.packed) and output.global_step == epochs * math.ceil(n / batch)
    indices = [i for _, batch_idx in trainer.seen for i in batch_idx]
    assert len(indices) == epochs * n
    for epoch in range(epochs):
        assert sorted(indices[epoch * n : (epoch + 1) * n]) == list(range(n))
    for idx, stats in observed.batches:
        assert stats.loss.shape == (len(idx),) and bool(stats.valid.all())
        assert stats.valid_tokens.tolist() == [len(data[i]["completion"]) + 1 for i in idx]
    metrics = trainer.selector.metrics()
    assert metrics["forwarded"] == metrics["backpropagated"] == epochs * n
    completion_tokens = sum(len(completion) + 1 for completion in data["completion"])
    assert metrics["forwarded_tokens"] == metrics["backpropagated_tokens"] == epochs * completion_tokens
    assert trainer.selector.context.sample_tokens.sum() == completion_tokens and metrics["saved_token_fraction"] == 0.0
    assert trainer.selector.table.field("visits").tolist() == [epochs] * n


def test_segment_statistics_and_weighted_packed_loss():
    """Three samples packed into one row (and padding): per-sample statistics equal
    sample_stats of each sample alone; per-sample weights weigh exactly their tokens' loss
    and gradient; a sample with a non-finite logit is invalid, as in sample_stats."""
    torch.manual_seed(0)
    vocab, lengths = 11, [5, 3, 7]
    width = sum(lengths) + 2
    logits = torch.randn(1, width, vocab, dtype=torch.float64).float()
    labels = torch.randint(0, vocab, (1, width))
    segments = torch.full((1, width), -1)
    start = 0
    for s, length in enumerate(lengths):
        segments[0, start : start + length] = s
        labels[0, start] = -100  # a sample's first token is no target
        labels[0, start + 1] = -100 if s == 1 else labels[0, start + 1]  # a masked prompt token
        start += length
    labels[0, start:] = -100
    weights = torch.tensor([0.5, 2.0, 1.0])

    leaf = logits.clone().requires_grad_(True)
    loss, stats = geko_core.cross_entropy_with_stats(
        leaf, labels, segments=segments, sample_weight=weights, shift=True, reduction="sum"
    )
    loss.backward()
    expected_loss = torch.zeros(())
    expected_grad = torch.zeros_like(logits)
    start = 0
    for s, length in enumerate(lengths):
        piece = logits[:, start : start + length].clone().requires_grad_(True)
        alone = geko_core.sample_stats(piece, labels[:, start : start + length], shift=True)
        assert int(stats.valid_tokens[s]) == int(alone.valid_tokens[0]) and int(stats.bucket[s]) == int(alone.bucket[0])
        assert float(stats.correct[s]) == float(alone.correct[0])
        for name in ("loss", "confidence", "label_prob", "entropy", "el2n"):
            torch.testing.assert_close(getattr(stats, name)[s], getattr(alone, name)[0], rtol=1e-6, atol=1e-6)
        piece_loss, _ = geko_core.cross_entropy_with_stats(piece, labels[:, start : start + length], shift=True, reduction="sum")
        (weights[s] * piece_loss).backward()
        expected_loss = expected_loss + weights[s] * piece_loss.detach()
        expected_grad[:, start : start + length] = piece.grad
        start += length
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-6, atol=1e-7)

    # A NaN logit in a counted token invalidates its sample only; no valid token: invalid too.
    bad = logits.clone()
    bad[0, 6, 3] = float("nan")  # sample 1's token 1 predicts its label 2
    empty = labels.clone()
    empty[0, 8:15] = -100  # sample 2 loses every target
    out = geko_core.sample_stats(bad, empty, shift=True, segments=segments, num_segments=3)
    assert out.bucket.tolist()[1:] == [-1, -1] and int(out.bucket[0]) >= 0
    assert math.isnan(float(out.loss[1])) and math.isnan(float(out.loss[2])) and out.valid_tokens.tolist()[2] == 0


def test_collator_marks_the_samples_of_a_packed_row():
    padding_free = GekoSFTCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], GEKO_INDEX_KEY: 4},
        {"input_ids": [8, 9], "labels": [-100, 9], GEKO_INDEX_KEY: 1},
    ]
    batch = padding_free(features)
    assert batch[GEKO_INDEX_KEY].tolist() == [4, 1]
    assert batch[GEKO_SEGMENT_KEY].tolist() == [[0, 0, 0, 1, 1]] and batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    padded = GekoSFTCollator(DataCollatorForLanguageModeling(pad_token_id=0))(features)
    assert GEKO_SEGMENT_KEY not in padded and padded["input_ids"].shape == (2, 3)
    assert GEKO_SEGMENT_KEY not in padding_free([{"input_ids": [1, 2]}])  # evaluation features pass through

    def concatenate(feats):  # packs without telling the model where samples start
        ids = torch.tensor([[t for f in feats for t in f["input_ids"]]])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    with pytest.raises(ValueError, match="attend to each other"):
        GekoSFTCollator(concatenate)(features)
    packed_rows = [{**f, "seq_lengths": [1, len(f["input_ids"]) - 1]} for f in features]
    with pytest.raises(ValueError, match="already packed"):
        padding_free(packed_rows)


# -- training ---------------------------------------------------------------------------------------
class _PlanSampler(torch.utils.data.Sampler):
    """The order a uniform Selector plans, for a plain SFTTrainer."""

    def __init__(self, n: int, epochs: int, seed: int):
        self._selector = Selector(n, policy="uniform", epochs=epochs, seed=seed)

    def __len__(self):
        return self._selector.num_samples

    def __iter__(self):
        return iter(self._selector.plan()[0].tolist())

    def set_epoch(self, epoch: int) -> None:
        self._selector.set_epoch(epoch)


class PlanOrderSFTTrainer(SFTTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return _PlanSampler(len(self.train_dataset), int(self.args.num_train_epochs), self.args.seed)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_uniform_matches_a_plain_sft_trainer(tmp_path, tokenizer, packing):
    """Same batches, gradient accumulation, completion-only loss: TRL's losses, weights and
    logged metrics (entropy, mean_token_accuracy, num_tokens as SFTTrainer computes them from
    its fused LM head). Packed: GEKO packs each batch into one row; the plain trainer does the
    same with padding_free=True (TRL's own BFD packing fixes other rows before training)."""
    data = make_pairs(36)  # 5 batches an epoch: the last accumulation group is one short batch
    # SGD: Adam would turn rounding noise in exactly-zero gradients into whole steps. A constant
    # learning rate: the Selector's schedule follows sample progress, which in an epoch with a
    # short last batch is not the plain trainer's step count.
    kwargs = dict(
        num_train_epochs=2, gradient_accumulation_steps=2, logging_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant",
    )
    plain_kwargs = dict(padding_free=True, max_length=None) if packing else {}
    losses, models, metrics = {}, {}, {}
    for name, cls, extra, options in (
        ("plain", PlanOrderSFTTrainer, {}, plain_kwargs),
        ("geko", GekoSFTTrainer, {"geko_policy": "uniform"}, {"packing": packing}),
    ):
        log = LossLog()
        model = tiny_llama(len(tokenizer))
        args = make_args(tmp_path, name, **kwargs, **options)
        trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[log], **extra)
        output = trainer.train()
        assert output.global_step == 6
        losses[name], models[name], metrics[name] = log.losses, model, log.sft_metrics
    assert len(losses["geko"]) == 6
    np.testing.assert_allclose(losses["geko"], losses["plain"], rtol=2e-5)
    np.testing.assert_allclose(metrics["geko"], metrics["plain"], rtol=2e-5)
    assert [m[2] for m in metrics["geko"]] == [m[2] for m in metrics["plain"]]
    for (key, a), (_, b) in zip(models["plain"].state_dict().items(), models["geko"].state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_importance_weights_in_packed_rows(tmp_path, tokenizer):
    """InfoBatch weighs the kept below-mean samples 2: packed rows, where each sample's weight
    scales its own tokens, train exactly as padded rows, where the kernel weighs whole rows."""
    data = make_pairs(32)
    kwargs = dict(num_train_epochs=3, logging_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant")
    runs = {}
    for packing in (False, True):
        log = LossLog()
        model = tiny_llama(len(tokenizer))
        args = make_args(tmp_path, f"packing{packing}", packing=packing, **kwargs)
        trainer = RecordingGekoSFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[log], geko_policy="infobatch"
        )
        weights = []
        selector_weights = trainer.selector.weights
        trainer.selector.weights = lambda idx: weights.append(selector_weights(idx)) or weights[-1]
        trainer.train()
        assert all(trainer.packed) == packing
        runs[packing] = (trainer.seen, log.losses, model, torch.cat(weights))
    (seen_padded, losses_padded, padded, w_padded), (seen_packed, losses_packed, packed, w_packed) = runs[False], runs[True]
    assert seen_packed == seen_padded and torch.equal(w_packed, w_padded)
    assert set(w_packed.tolist()) == {1.0, 2.0}  # pruned epochs weighed some samples 2
    np.testing.assert_allclose(losses_packed, losses_padded, rtol=2e-5)
    for (key, a), (_, b) in zip(padded.state_dict().items(), packed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_geko_trains_and_logs(tmp_path, tokenizer):
    """SFTConfig's defaults bf16 (autocast) and gradient checkpointing, packed batches."""
    args = make_args(
        tmp_path, num_train_epochs=4, per_device_train_batch_size=6, learning_rate=3e-2, logging_steps=4, packing=True,
        bf16=True, activation_checkpointing=True,
    )
    model = tiny_llama(len(tokenizer))
    dtypes = set()
    model.lm_head.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    trainer = GekoSFTTrainer(
        model=model, args=args, train_dataset=make_pairs(36), eval_dataset=make_pairs(12, seed=1), processing_class=tokenizer
    )
    trainer.train()
    assert dtypes == {torch.bfloat16} and model.is_activation_checkpointing
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    for key in ("geko/backpropagated", "geko/phase", "mean_token_accuracy", "entropy", "num_tokens"):
        assert key in logs[-1], key
    assert trainer.selector.metrics()["buckets"]["UNSEEN"] == 0 and len(trainer.selector.history) == 4
    # Evaluation (TRL packs the evaluation set itself) does not feed the Selector.
    before = trainer.selector.state_dict()["counters"]
    assert np.isfinite(trainer.evaluate()["eval_loss"])
    assert trainer.selector.state_dict()["counters"] == before


# peft 0.21 still calls a transformers 5 deprecated alias while wrapping the model.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    model = tiny_llama(len(tokenizer))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_args(tmp_path, num_train_epochs=1, packing=True)
    trainer = GekoSFTTrainer(model=model, args=args, train_dataset=make_pairs(16), processing_class=tokenizer, peft_config=config)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    output = trainer.train()
    assert np.isfinite(output.training_loss) and trainer.selector.metrics()["backpropagated"] == 16
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed and all("lora_" in k for k in changed)


@pytest.mark.parametrize("policy", ["geko", "infobatch"])
def test_resume_is_exact(tmp_path, tokenizer, policy):
    """Packed batches: resume mid-epoch in a fresh trainer; the same batches follow and the
    same table and weights result (InfoBatch: in pruned epochs, with weights 2 in the rows)."""
    data = make_pairs(24)
    kwargs = dict(
        num_train_epochs=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-2,
        save_strategy="steps", save_steps=1, packing=True,
    )

    def trainer(name: str, seed: int) -> RecordingGekoSFTTrainer:
        args = make_args(tmp_path, name, **kwargs)
        return RecordingGekoSFTTrainer(
            model=tiny_llama(len(tokenizer), seed=seed), args=args, train_dataset=data, processing_class=tokenizer, geko_policy=policy
        )

    full = trainer("full", 0)
    full.train()
    assert all(full.packed)
    if policy == "infobatch":
        assert min(h["epoch_backpropagated"] for h in full.selector.history) < len(data)
    checkpoints = {int(p.name.split("-")[1]): p for p in (tmp_path / "full").glob("checkpoint-*")}
    positions = {}
    for step, path in checkpoints.items():
        state = torch.load(path / "geko_selector.pt", weights_only=True)
        plan = state["epoch_plan"]
        positions[step] = (state["epoch"], 0 if plan is None else plan["position"], 0 if plan is None else len(plan["indices"]["__geko_ndarray__"]))
    mid = [s for s, (epoch, pos, n) in positions.items() if 0 < pos < n and epoch >= 2]
    assert mid
    step = min(mid)
    resumed = trainer(f"resumed{step}", 5)
    resumed.train(resume_from_checkpoint=str(checkpoints[step]))
    assert [batch for _, batch in resumed.seen] == [batch for s, batch in full.seen if s >= step]
    assert resumed.state.global_step == full.state.global_step
    a, b = full.selector.state_dict(), resumed.selector.state_dict()
    assert a["counters"] == b["counters"] and a["epoch"] == b["epoch"]
    for key, value in a["table"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(b["table"][key], value, err_msg=key)
    for (key, x), (_, y) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


# -- refused ----------------------------------------------------------------------------------------
def test_unsupported_configurations_are_refused(tmp_path, tokenizer):
    data = make_pairs(8)

    def build(args, dataset=data, **kwargs):
        return GekoSFTTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)

    for strategy in ("bfd_split", "wrapped"):
        with pytest.raises(ValueError, match=f"packing_strategy='{strategy}'"):
            build(make_args(tmp_path, packing=True, packing_strategy=strategy))
    with pytest.raises(ValueError, match="loss_type='dft'"):
        build(make_args(tmp_path, loss_type="dft"))
    packed = trl.pack_dataset(
        datasets.Dataset.from_dict({"input_ids": [[3, 4, 5], [6, 7], [8, 9, 10]], "labels": [[3, 4, 5], [6, 7], [8, 9, 10]]}), 5
    )
    with pytest.raises(ValueError, match="already packed"):
        build(make_args(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}), dataset=packed)
    with pytest.raises(TypeError, match="map-style"):
        build(make_args(tmp_path, max_steps=2), dataset=data.to_iterable_dataset())

    with pytest.raises(TypeError, match="must come before"):

        class WrongOrder(Trainer, GekoTrainerMixin):
            pass
