"""GekoGRPOTrainer: a geko Selector in rewards mode choosing TRL GRPOTrainer's prompts, on a tiny
randomly initialised LLaMA, a character tokenizer built here (nothing is downloaded) and a
rule-based reward. One CPU process: the DDP path (every process holds the same Selector and
observes the gathered batch) is the same code with a world of one, and is not run here."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import huggingface_hub.constants  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from geko_core import Selector  # noqa: E402
from geko_core.integrations.trl_grpo import GekoGRPOTrainer, GekoGroupSampler  # noqa: E402

# TRL 1.16's generation path still calls transformers' deprecated name.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :"
NUM_PROMPTS = 12
GROUP = 4


@pytest.fixture(autouse=True, scope="module")
def quiet_and_one_thread():
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
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def prompts(n: int = NUM_PROMPTS) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": f"q{i} {chr(97 + i % 26)}:", "target": i % 3} for i in range(n)])


def length_reward(completions, target, **kwargs):
    """1 when the completion's length modulo 3 is the prompt's target: random completions of a
    random model give groups with and without a reward spread."""
    return [float(len(c) % 3 == t) for c, t in zip(completions, target)]


def make_args(tmp_path, name: str = "run", **overrides) -> GRPOConfig:
    options = dict(
        output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_generations=GROUP, max_completion_length=5, learning_rate=1e-2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False, bf16=False,
        temperature=1.0, activation_checkpointing=False,
    )
    options.update(overrides)
    return GRPOConfig(**options)


# -- stand-in for the Selector's rewards mode (until it is merged) ----------------------------------
class RewardsSelector(Selector):
    """The real Selector's epochs, plans and resume, fed per-prompt reward summaries through
    ``observe_stats``; records every observed group."""

    signal = "rewards"

    def __init__(self, *args, signal: str = "rewards", **kwargs):
        super().__init__(*args, **kwargs)
        self.visits = np.zeros(self.num_samples, dtype=np.int64)
        self.passes = np.zeros(self.num_samples, dtype=np.float64)
        self.rollouts = 0
        self.rollout_tokens = 0

    def observe_rewards(self, idx, rewards, lengths=None):
        idx = np.asarray(idx, dtype=np.int64)
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        assert rewards.shape == (len(idx), GROUP)
        pass_rate = (rewards >= 1.0).float().mean(dim=1)
        zero = (rewards.max(dim=1).values - rewards.min(dim=1).values) <= 1e-6
        np.add.at(self.visits, idx, 1)
        np.add.at(self.passes, idx, pass_rate.double().numpy())
        self.rollouts += rewards.numel()
        self.rollout_tokens += int(torch.as_tensor(lengths).sum())
        loss = 1.0 - pass_rate
        stats = geko_stats(loss)
        self.observe_stats(idx, stats)

        class Stats:
            zero_variance = zero

        return Stats

    def metrics(self):
        return {**super().metrics(), "rollouts": self.rollouts, "rollout_tokens": self.rollout_tokens}

    def state_dict(self):
        return {**super().state_dict(), "standin": (self.visits.copy(), self.passes.copy(), self.rollouts, self.rollout_tokens)}

    def load_state_dict(self, state):
        state = dict(state)
        visits, passes, self.rollouts, self.rollout_tokens = state.pop("standin")
        super().load_state_dict(state)
        self.visits, self.passes = np.array(visits), np.array(passes)


def geko_stats(loss):
    from geko_core import SampleStats

    n = loss.shape[0]
    ones = torch.ones(n)
    return SampleStats(loss, ones - loss, ones - loss, ones - loss, ones * 0.5, loss, torch.full((n,), 4, dtype=torch.int32),
                       torch.full((n,), 2, dtype=torch.int8))


def make_selector(args, policy="uniform", n=NUM_PROMPTS, **options):
    prompts_per_generation = args.generation_batch_size // args.num_generations
    length = {"total_steps": args.max_steps} if args.max_steps > 0 else {"epochs": int(args.num_train_epochs)}
    return RewardsSelector(n, policy, seed=args.seed, batch_size=prompts_per_generation, drop_last=True, num_replicas=1,
                           rank=0, policy_options=options or None, **length)


# -- recording ----------------------------------------------------------------------------------------
class Recording(GekoGRPOTrainer):
    """Records the prompts of every generation call and the metrics TRL logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated: list[list[str]] = []
        self.observed: list[tuple[list[int], torch.Tensor]] = []

    def _generate(self, prompts):
        self.generated.append(list(prompts))
        return super()._generate(prompts)

    def _geko_observe(self, indices, rewards, lengths):
        self.observed.append((indices.view(-1, GROUP)[:, 0].tolist(), rewards.view(-1, GROUP).clone()))
        return super()._geko_observe(indices, rewards, lengths)


def build(tmp_path, tokenizer, *, name="run", selector=None, policy="uniform", trainer=Recording, options=None, **overrides):
    args = make_args(tmp_path, name, **overrides)
    selector = selector if selector is not None else make_selector(args, policy, **(options or {}))
    return trainer(
        model=tiny_llama(len(tokenizer)), reward_funcs=[length_reward], args=args, train_dataset=prompts(),
        processing_class=tokenizer, selector=selector,
    )


# -- tests ----------------------------------------------------------------------------------------------
def test_group_sampler_matches_trl_repeat_sampler_order():
    from trl.trainer.utils import RepeatSampler

    class Plain:  # a sampler that yields 0..n-1, as RepeatSampler without shuffling
        def __len__(self):
            return 7

        def __iter__(self):
            return iter(range(7))

    ours = GekoGroupSampler(Plain(), prompts_per_generation=3, num_generations=2, repeat_count=4)
    theirs = RepeatSampler(list("abcdefg"), mini_repeat_count=2, batch_size=3, repeat_count=4, shuffle=False)
    assert list(ours) == list(theirs)
    assert len(ours) == len(theirs) == 48
    with pytest.raises(ValueError, match="num_generations"):
        GekoGroupSampler(Plain(), prompts_per_generation=3, num_generations=0, repeat_count=1)


def test_uniform_generates_every_prompt_in_whole_groups_and_feeds_the_rewards(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer)
    trainer.train()
    selector = trainer.selector
    text = {row["prompt"]: i for i, row in enumerate(prompts())}
    per_epoch = NUM_PROMPTS // 2  # P = 8 // 4 = 2 prompts per generation
    assert len(trainer.generated) == 2 * per_epoch
    for call, (observed, rewards) in zip(trainer.generated, trainer.observed):
        # Each generation call holds P prompts, each G times in a row, and it is what was observed.
        ids = [text[p] for p in call]
        assert ids == [i for i in observed for _ in range(GROUP)]
        assert rewards.shape == (2, GROUP)
    for epoch in range(2):
        seen = [i for observed, _ in trainer.observed[epoch * per_epoch : (epoch + 1) * per_epoch] for i in observed]
        assert sorted(seen) == list(range(NUM_PROMPTS))
    # The rewards that reached the Selector are those the reward function gave.
    np.testing.assert_array_equal(selector.visits, np.full(NUM_PROMPTS, 2))
    passes = np.zeros(NUM_PROMPTS)
    for observed, rewards in trainer.observed:
        passes[observed] += rewards.mean(dim=1).double().numpy()
    np.testing.assert_allclose(selector.passes, passes)
    assert selector.rollouts == 2 * NUM_PROMPTS * GROUP
    assert trainer.state.global_step == 2 * per_epoch  # one generation per optimizer step (S = gas = 2)
    assert selector.step_count == trainer.state.global_step


def test_skipped_prompts_are_never_generated(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, policy="random_subset", options={"budget": 0.5})
    trainer.train()
    text = {row["prompt"]: i for i, row in enumerate(prompts())}
    generated = [text[p] for call in trainer.generated for p in call]
    selector = trainer.selector
    planned = [set(h["epoch"] for h in [])]  # noqa: F841
    # Two epochs of 6 planned prompts each (half of 12), 3 generations of P=2 per epoch.
    assert len(trainer.generated) == 6
    assert len(generated) == 6 * 2 * GROUP
    assert int(selector.visits.sum()) == 12 and int((selector.visits > 0).sum()) < NUM_PROMPTS
    for i in range(NUM_PROMPTS):
        assert generated.count(i) == GROUP * int(selector.visits[i])
    assert trainer.state.global_step == 6


def test_metrics_are_logged(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, num_train_epochs=1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    last = logs[-1]
    assert last["geko/rollouts"] == NUM_PROMPTS * GROUP
    assert last["geko/rollout_tokens"] == trainer.selector.rollout_tokens > 0
    for entry, (_, rewards) in zip(logs, trainer.observed):
        spread = rewards.max(dim=1).values - rewards.min(dim=1).values
        assert entry["geko/batch_zero_variance_share"] == pytest.approx(float((spread <= 1e-6).float().mean()))
        # TRL's own figure of the same batch agrees.
        assert entry["geko/batch_zero_variance_share"] == pytest.approx(entry["frac_reward_zero_std"])


@pytest.mark.parametrize("at", [4, 6])  # inside epoch 1, and at the end of epoch 1 (3 steps per epoch)
def test_resume_continues_exactly(tmp_path, tokenizer, at):
    options = dict(policy="random_subset", options={"budget": 0.5}, save_strategy="steps", save_steps=2, num_train_epochs=3)
    full = build(tmp_path, tokenizer, name="full", **options)
    full.train()
    build(tmp_path, tokenizer, name="part", **options).train()
    checkpoint = os.path.join(str(tmp_path / "part"), f"checkpoint-{at}")
    assert os.path.isfile(os.path.join(checkpoint, "geko_selector.pt"))
    resumed = build(tmp_path, tokenizer, name="part", **options)
    resumed.train(resume_from_checkpoint=checkpoint)
    # The same prompts, the same completions' rewards, the same table and model.
    assert [o for o, _ in resumed.observed] == [o for o, _ in full.observed[at:]]
    assert len(resumed.observed) == len(full.observed) - at == 9 - at
    for (_, a), (_, b) in zip(resumed.observed, full.observed[at:]):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(resumed.selector.visits, full.selector.visits)
    np.testing.assert_array_equal(resumed.selector.passes, full.selector.passes)
    assert resumed.selector.metrics()["rollout_tokens"] == full.selector.metrics()["rollout_tokens"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_refuses_mismatched_selectors(tmp_path, tokenizer):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="batch_size=2"):
        build(tmp_path, tokenizer, selector=RewardsSelector(NUM_PROMPTS, "uniform", epochs=2, batch_size=4, drop_last=True))
    with pytest.raises(ValueError, match="epochs=3"):
        build(tmp_path, tokenizer, selector=RewardsSelector(NUM_PROMPTS, "uniform", epochs=3, batch_size=2, drop_last=True))
    with pytest.raises(ValueError, match="signal='rewards'"):
        build(tmp_path, tokenizer, selector=Selector(NUM_PROMPTS, "uniform", epochs=2, batch_size=2, drop_last=True))
    with pytest.raises(ValueError, match="train_dataset"):
        GekoGRPOTrainer(model=tiny_llama(len(tokenizer)), reward_funcs=[length_reward], args=args, processing_class=tokenizer)
