"""GekoTrainer: the Selector inside transformers.Trainer, on tiny randomly initialised models."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from geko_core import Selector  # noqa: E402
from geko_core.integrations.hf import (  # noqa: E402
    GEKO_INDEX_KEY,
    GekoIndexCollator,
    GekoIndexedDataset,
    GekoTrainer,
    load_selector_state,
    save_selector_state,
    selector_state_file,
)

VOCAB, SEQ = 256, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and two cores shared with other jobs make
    # OpenMP's spinning threads slow everything down badly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_data(n: int, *, seed: int = 0, masked: bool = False) -> list[dict]:
    """Half easy sequences (a period-4 cycle over 4 tokens, learnt in a few dozen steps),
    half random bytes (never learnt). ``masked``: some labels are -100 (prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        if i % 2 == 0:
            phase = int(torch.randint(0, 4, (1,), generator=g))
            ids = [10 + (phase + t) % 4 for t in range(SEQ)]
        else:
            ids = torch.randint(0, VOCAB, (SEQ,), generator=g).tolist()
        labels = list(ids)
        if masked and i % 3 == 0:
            labels[: 1 + i % 5] = [-100] * (1 + i % 5)
        items.append({"input_ids": ids, "labels": labels})
    return items


def make_args(tmp_path, name: str = "run", **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=2e-2,
        logging_steps=1000, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    options.update(overrides)
    return TrainingArguments(**options)


class Recorder:
    """Mixin recording the dataset indices of every training micro-batch, with the global step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, list[int]]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if GEKO_INDEX_KEY in inputs and model.training:
            self.seen.append((self.state.global_step, inputs[GEKO_INDEX_KEY].tolist()))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class RecordingGekoTrainer(Recorder, GekoTrainer):
    pass


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


# -- savings and metrics --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def geko_and_uniform(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("savings")
    data = make_data(64)
    runs = {}
    for policy in ("uniform", "geko"):
        args = make_args(tmp, policy, num_train_epochs=6, learning_rate=3e-2, logging_steps=4)
        # A budget: in 6 epochs of 64 tiny sequences the default curriculum's PEAK copies of
        # HARD samples and the guard's full last epoch outweigh what it skips.
        options = {"budget": 0.7} if policy == "geko" else None
        trainer = GekoTrainer(model=tiny_llama(), args=args, train_dataset=data, geko_policy=policy, geko_options=options)
        output = trainer.train()
        runs[policy] = (trainer, output)
    return runs


def test_geko_backpropagates_fewer_sequences_than_uniform(geko_and_uniform):
    uniform, uniform_out = geko_and_uniform["uniform"]
    geko, geko_out = geko_and_uniform["geko"]
    assert uniform.selector.metrics()["backpropagated"] == 6 * 64
    assert uniform_out.global_step == 6 * 8
    m = geko.selector.metrics()
    assert m["backpropagated"] < 6 * 64
    assert m["saved_fraction"] > 0.0
    assert m["buckets"]["LIGHT"] + m["buckets"]["FREEZE"] > 0  # the easy half was learnt
    # Shorter epochs are fewer optimizer steps, and the Trainer ran all six epochs.
    assert geko_out.global_step == geko.selector.step_count < uniform_out.global_step
    assert geko.state.epoch == pytest.approx(6.0)
    assert len(geko.selector.history) == 6  # every epoch finished
    assert np.isfinite(geko_out.training_loss)


def test_metrics_are_in_the_trainer_logs(geko_and_uniform):
    geko, _ = geko_and_uniform["geko"]
    train_logs = [h for h in geko.state.log_history if "loss" in h]
    assert train_logs, "no training log entries"
    last = train_logs[-1]
    for key in ("geko/backpropagated", "geko/saved_fraction", "geko/phase", "geko/bucket_FREEZE", "geko/bucket_FOCUS"):
        assert key in last, key
    assert isinstance(last["geko/phase"], str)
    counts = [h["geko/backpropagated"] for h in train_logs]
    assert counts == sorted(counts) and counts[-1] <= geko.selector.metrics()["backpropagated"]
    summary = geko.state.log_history[-1]
    assert "train_loss" in summary and summary["geko/backpropagated"] == geko.selector.metrics()["backpropagated"]


def test_learning_rate_schedule_follows_progress(geko_and_uniform):
    # Linear decay must reach (almost) zero at the end of the shorter geko run too.
    for policy in ("uniform", "geko"):
        trainer, _ = geko_and_uniform[policy]
        lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
        assert lrs == sorted(lrs, reverse=True)
        assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12), policy


# -- loss equivalence ---------------------------------------------------------------------------------
class _PlanSampler(torch.utils.data.Sampler):
    """The order a uniform Selector plans, for a plain Trainer."""

    def __init__(self, n: int, epochs: int, seed: int):
        self._selector = Selector(n, policy="uniform", epochs=epochs, seed=seed)

    def __len__(self):
        return self._selector.num_samples

    def __iter__(self):
        return iter(self._selector.plan()[0].tolist())

    def set_epoch(self, epoch: int) -> None:
        self._selector.set_epoch(epoch)


class PlanOrderTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return _PlanSampler(len(self.train_dataset), int(self.args.num_train_epochs), self.args.seed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_uniform_matches_a_plain_trainer(tmp_path, arch):
    """Same batches, gradient accumulation, masked labels: the same losses and weights."""
    data = make_data(48, masked=True)
    # SGD: Adam would turn rounding noise in exactly-zero gradients (a key bias) into whole steps.
    kwargs = dict(num_train_epochs=2, gradient_accumulation_steps=2, logging_steps=1, optim="sgd", learning_rate=0.5)
    losses = {}
    models = {}
    for name, cls, extra in (("plain", PlanOrderTrainer, {}), ("geko", GekoTrainer, {"geko_policy": "uniform"})):
        log = LossLog()
        model = MODELS[arch]()
        trainer = cls(model=model, args=make_args(tmp_path, name, **kwargs), train_dataset=data, callbacks=[log], **extra)
        output = trainer.train()
        assert output.global_step == 6
        losses[name], models[name] = log.losses, model
    assert len(losses["geko"]) == 6
    np.testing.assert_allclose(losses["geko"], losses["plain"], rtol=2e-5)
    for (key, a), (_, b) in zip(models["plain"].state_dict().items(), models["geko"].state_dict().items()):
        # Adam turns float32 rounding in near-zero gradients into differences of ~1e-5.
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


# -- resume -----------------------------------------------------------------------------------------
def _selector_file(checkpoint):
    state = torch.load(checkpoint / "geko_selector.pt", weights_only=True)  # readable without unpickling code
    plan = state["epoch_plan"]
    if plan is None:  # saved at an epoch's end: the Selector has moved to the next, not yet planned
        return state["epoch"], 0, 0
    return state["epoch"], plan["position"], len(plan["indices"]["__geko_ndarray__"])


def test_resume_is_exact(tmp_path):
    """Resume in a fresh Trainer, mid-epoch and at an epoch's end, in epochs that have shrunk
    (where the Trainer's own epoch arithmetic would be wrong): the same batches follow, the
    same table and the same weights result."""
    data = make_data(64)
    kwargs = dict(
        num_train_epochs=6, gradient_accumulation_steps=2, per_device_train_batch_size=4, learning_rate=3e-2,
        save_strategy="steps", save_steps=1,
    )
    shrink = {"budget": 0.7}  # shrunk epochs, where the Trainer's own epoch arithmetic is wrong
    full = RecordingGekoTrainer(model=tiny_llama(), args=make_args(tmp_path, "full", **kwargs), train_dataset=data, geko_options=shrink)
    full.train()
    updates_per_full_epoch = 8
    assert full.state.global_step < 6 * updates_per_full_epoch  # epochs shrank
    # Every epoch ends in an optimizer step, also when its last accumulation group is short.
    per_epoch = [h["epoch_backpropagated"] for h in full.selector.history]
    assert len(per_epoch) == 6 and sum(per_epoch) == full.selector.metrics()["backpropagated"]
    assert any(math.ceil(n / 4) % 2 for n in per_epoch), "no epoch with a short accumulation group"
    assert full.state.global_step == full.selector.step_count == sum(math.ceil(math.ceil(n / 4) / 2) for n in per_epoch)
    checkpoints = {int(p.name.split("-")[1]): p for p in (tmp_path / "full").glob("checkpoint-*")}
    assert not [f for p in checkpoints.values() for f in os.listdir(p) if f.endswith(".tmp")]
    info = {step: _selector_file(path) for step, path in checkpoints.items()}
    mid = [s for s, (epoch, pos, n) in info.items() if 0 < pos < n and epoch >= 3]
    last = full.state.global_step
    ends = [s for s, (epoch, pos, n) in info.items() if n == 0 and 3 <= epoch and s < last]
    assert mid and ends
    # Prefer an epoch end where the Trainer's own arithmetic (steps // full epoch) is wrong.
    end = max([s for s in ends if s // updates_per_full_epoch != info[s][0]] or ends)
    for step in (min(mid), end):
        name = f"resumed{step}"
        resumed = RecordingGekoTrainer(model=tiny_llama(seed=5), args=make_args(tmp_path, name, **kwargs), train_dataset=data, geko_options=shrink)
        resumed.train(resume_from_checkpoint=str(checkpoints[step]))
        after = [batch for s, batch in full.seen if s >= step]
        assert resumed.seen and [batch for _, batch in resumed.seen] == after, step
        assert resumed.state.global_step == full.state.global_step
        a, b = full.selector.state_dict(), resumed.selector.state_dict()
        for key in ("epoch", "step", "counters"):
            assert a[key] == b[key], key
        assert a["epoch_plan"] is None and b["epoch_plan"] is None  # both finished the run
        for key, value in a["table"].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(b["table"][key], value, err_msg=key)
        for (key, x), (_, y) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_resume_needs_the_selector_state(tmp_path):
    data = make_data(16)
    args = make_args(tmp_path, "a", num_train_epochs=1, save_strategy="steps", save_steps=1)
    GekoTrainer(model=tiny_llama(), args=args, train_dataset=data).train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    os.remove(checkpoint / "geko_selector.pt")
    trainer = GekoTrainer(model=tiny_llama(), args=make_args(tmp_path, "b", num_train_epochs=1), train_dataset=data)
    with pytest.raises(FileNotFoundError, match="geko_selector.pt"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_saved_state_ignores_prefetched_samples(tmp_path):
    """A DataLoader that ran the sampler to the end must not make a resume skip batches."""
    sel = Selector(12, policy="geko", epochs=2, seed=1)
    order = list(sel.sampler)  # prefetched the whole epoch
    logits = torch.randn(6, 5)
    sel.observe(order[:6], logits, torch.arange(6) % 5)
    path = selector_state_file(str(tmp_path))
    save_selector_state(sel, path)
    fresh = Selector(12, policy="geko", epochs=2, seed=1)
    load_selector_state(fresh, path)
    assert list(fresh.sampler) == order[6:]
    # With drop_last, the epoch is planned in whole batches: nothing is left to drop.
    whole = Selector(12, policy="geko", epochs=2, seed=1, batch_size=8, drop_last=True)
    assert len(whole.sampler) == 8 and list(whole.sampler) == order[:8]


# -- precision, compile, PEFT --------------------------------------------------------------------------
def test_bf16_autocast(tmp_path):
    model = tiny_llama()
    dtypes = set()
    model.lm_head.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    trainer = GekoTrainer(model=model, args=make_args(tmp_path, bf16=True, num_train_epochs=1), train_dataset=make_data(16))
    output = trainer.train()
    assert dtypes == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert np.isfinite(output.training_loss) and trainer.selector.metrics()["backpropagated"] == 16


class HalfLogits(torch.nn.Module):
    """Returns the logits in a 16-bit dtype, as a GPU autocast forward does."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = tiny_llama(), dtype

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out["logits"] = out["logits"].to(self.dtype)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits(tmp_path, dtype):
    # On CPU, fp16=True does not autocast (accelerate), so the 16-bit logits are made by hand.
    model = HalfLogits(dtype)
    before = model.inner.lm_head.weight.detach().clone()
    trainer = GekoTrainer(model=model, args=make_args(tmp_path, num_train_epochs=1), train_dataset=make_data(16), geko_shift=True)
    output = trainer.train()
    assert np.isfinite(output.training_loss) and output.training_loss == pytest.approx(np.log(VOCAB), rel=0.05)
    assert not torch.equal(model.inner.lm_head.weight, before)
    assert trainer.selector.metrics()["buckets"]["UNSEEN"] == 0


def test_torch_compiled_model_trains(tmp_path):
    args = make_args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager", num_train_epochs=1)
    trainer = GekoTrainer(model=tiny_llama(), args=args, train_dataset=make_data(16))
    output = trainer.train()
    assert np.isfinite(output.training_loss) and output.global_step == 2
    assert trainer.selector.metrics()["backpropagated"] == 16


@pytest.mark.slow
# Something on inductor's import path still uses torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiled_model_trains(tmp_path):
    """The default torch.compile backend (inductor, C++ codegen on CPU): about 10 s."""
    trainer = GekoTrainer(model=tiny_llama(), args=make_args(tmp_path, torch_compile=True, num_train_epochs=1), train_dataset=make_data(16))
    output = trainer.train()
    assert np.isfinite(output.training_loss) and trainer.selector.metrics()["backpropagated"] == 16


def test_evaluation_does_not_feed_the_selector(tmp_path):
    data = make_data(16)
    trainer = GekoTrainer(model=tiny_llama(), args=make_args(tmp_path, num_train_epochs=1), train_dataset=data, eval_dataset=data)
    trainer.train()
    before = trainer.selector.state_dict()
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    trainer.evaluate(trainer.train_dataset)  # items that carry geko_index
    after = trainer.selector.state_dict()
    assert after["counters"] == before["counters"] and after["epoch"] == before["epoch"] and after["epoch_plan"] == before["epoch_plan"] is None


# peft 0.21 still calls a transformers 5 deprecated alias while wrapping the model.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = GekoTrainer(model=model, args=make_args(tmp_path, num_train_epochs=1), train_dataset=make_data(16))
    output = trainer.train()
    assert np.isfinite(output.training_loss) and trainer.selector.metrics()["backpropagated"] == 16
    changed = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed and all("lora_" in k for k in changed)


# -- pieces and bad input -------------------------------------------------------------------------
def test_index_survives_remove_unused_columns(tmp_path):
    data = [dict(item, comment="not a model input") for item in make_data(8)]
    trainer = RecordingGekoTrainer(model=tiny_llama(), args=make_args(tmp_path, num_train_epochs=1), train_dataset=data)
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert sorted(i for _, batch in trainer.seen for i in batch) == list(range(8))


def test_collator_and_dataset_wrappers():
    ds = GekoIndexedDataset([{"x": 1}, {"x": 2}])
    assert ds[1] == {"x": 2, GEKO_INDEX_KEY: 1} and len(ds) == 2
    collate = GekoIndexCollator(lambda feats: {"x": torch.tensor([f["x"] for f in feats])})
    batch = collate([ds[1], ds[0]])
    assert batch[GEKO_INDEX_KEY].tolist() == [1, 0] and batch[GEKO_INDEX_KEY].dtype == torch.int64
    assert batch["x"].tolist() == [2, 1]
    assert collate([{"x": 3}])["x"].tolist() == [3]  # evaluation features pass through
    with pytest.raises(TypeError, match="mappings"):
        GekoIndexedDataset([(1, 2)])[0]
    with pytest.raises(ValueError, match=GEKO_INDEX_KEY):
        GekoIndexedDataset([{GEKO_INDEX_KEY: 3}])[0]


def test_bad_configurations_are_refused(tmp_path):
    data = make_data(8)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    with pytest.raises(TypeError, match="map-style"):
        GekoTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=Stream())
    with pytest.raises(ValueError, match="whole epochs"):
        GekoTrainer(model=tiny_llama(), args=make_args(tmp_path, num_train_epochs=1.5), train_dataset=data).selector
    with pytest.raises(ValueError, match="meta-batch"):
        GekoTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=data, geko_policy="es").selector
    with pytest.raises(ValueError, match="9 samples"):
        GekoTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=data, selector=Selector(9, epochs=2))
    with pytest.raises(ValueError, match="epochs=3"):
        GekoTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=data, selector=Selector(8, epochs=3))


def test_max_steps_builds_a_step_budget_selector(tmp_path):
    args = make_args(tmp_path, max_steps=5, num_train_epochs=1)
    trainer = GekoTrainer(model=tiny_llama(), args=args, train_dataset=make_data(16))
    assert trainer.selector.total_steps == 5
    output = trainer.train()
    assert output.global_step == 5 and trainer.selector.step_count == 5
    assert trainer.selector.progress() == 1.0


class _StopAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_a_callback_that_stops_training_stops_it(tmp_path):
    """A user callback's stop in on_step_end ends the run there, as with a plain Trainer
    (the Selector's own step callback must not undo it)."""
    for cls, extra in ((Trainer, {}), (GekoTrainer, {"geko_policy": "uniform"})):
        args = make_args(tmp_path, cls.__name__, num_train_epochs=3)
        trainer = cls(model=tiny_llama(), args=args, train_dataset=make_data(32), callbacks=[_StopAtStep(5)], **extra)
        assert trainer.train().global_step == 5, cls.__name__
    assert trainer.selector.step_count == 5


def test_import_geko_core_does_not_import_transformers():
    code = "import sys, geko_core, geko_core.integrations; print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'accelerate')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- DDP through torch.distributed.run ----------------------------------------------------------------
_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    sys.path.insert(0, {tests!r})
    from test_hf import RecordingGekoTrainer, make_data, make_args, tiny_llama
    from pathlib import Path

    out = Path({out!r})
    args = make_args(
        out, "ddp", num_train_epochs=2, per_device_train_batch_size=4, ddp_backend="gloo", ddp_find_unused_parameters=False,
        logging_steps=1,
    )

    data = make_data(24, masked=True)
    tokens = [sum(label != -100 for label in item["labels"][1:]) for item in data]

    class TokenCostTrainer(RecordingGekoTrainer):
        def _geko_selector_options(self):  # each sample costs its target tokens
            return {{"sample_tokens": np.array(tokens)}}

    trainer = TokenCostTrainer(model=tiny_llama(), args=args, train_dataset=data)
    trainer.train()
    rank = int(os.environ["RANK"])
    sel = trainer.selector
    table = sel.table.state_dict()
    json.dump({{
        "logged": [{{k: v for k, v in h.items() if k.startswith("geko/")}} for h in trainer.state.log_history if "loss" in h],
        "local": {{k: v for k, v in sel.metrics().items() if k in ("backpropagated", "backpropagated_tokens")}},
        "progress": sel.epoch_progress(), "tokens": sum(tokens),
        "seen": trainer.seen, "steps": trainer.state.global_step, "world": trainer.args.world_size,
        "history": [[h["epoch_backpropagated"]] for h in sel.history],
        "table": {{k: v.tolist() for k, v in table.items() if hasattr(v, "tolist")}},
        "weights": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
    }}, open(out / f"rank{{rank}}.json", "w"))
    """
)


def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"]
    first = [[i for step, batch in r["seen"] for i in batch][:12] for r in ranks]  # epoch 0: 24 samples over 2 ranks
    assert not set(first[0]) & set(first[1]) and sorted(first[0] + first[1]) == list(range(24))
    assert ranks[0]["table"] == ranks[1]["table"]  # statistics are all-gathered
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)  # DDP kept replicas equal
    # The logged counts and saved fractions are the run's: every rank logs the same figures
    # (but its own timings).
    logged = [[{k: v for k, v in h.items() if "seconds" not in k} for h in r["logged"]] for r in ranks]
    assert logged[0] == logged[1] and len(logged[0]) == ranks[0]["steps"]
    last = ranks[0]["logged"][-1]
    for name in ("backpropagated", "backpropagated_tokens"):
        assert last[f"geko/{name}"] == ranks[0]["local"][name] + ranks[1]["local"][name]
    assert ranks[0]["local"]["backpropagated_tokens"] != ranks[1]["local"]["backpropagated_tokens"]
    progress = ranks[0]["progress"]
    assert last["geko/saved_fraction"] == pytest.approx(1 - last["geko/backpropagated"] / (progress * 24))
    assert last["geko/saved_token_fraction"] == pytest.approx(1 - last["geko/backpropagated_tokens"] / (progress * ranks[0]["tokens"]))
