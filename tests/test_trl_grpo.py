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


def make_selector(args, policy="uniform", n=NUM_PROMPTS, **options):
    prompts_per_generation = args.generation_batch_size // args.num_generations
    length = {"total_steps": args.max_steps} if args.max_steps > 0 else {"epochs": int(args.num_train_epochs)}
    return Selector(n, policy, signal="rewards", seed=args.seed, batch_size=prompts_per_generation, drop_last=True,
                    num_replicas=1, rank=0, policy_options=options or None, **length)


# -- recording ----------------------------------------------------------------------------------------
class Recording(GekoGRPOTrainer):
    """Records the prompts of every generation call and the metrics TRL logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated: list[list[str]] = []
        self.observed: list[tuple[list[int], torch.Tensor]] = []
        self.lengths: list[torch.Tensor] = []

    def _generate(self, prompts):
        self.generated.append(list(prompts))
        return super()._generate(prompts)

    def _geko_observe(self, indices, rewards, lengths):
        self.observed.append((indices.view(-1, GROUP)[:, 0].tolist(), rewards.view(-1, GROUP).clone()))
        self.lengths.append(lengths.view(-1, GROUP).clone())
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


def expected_table(observed, n=NUM_PROMPTS, alpha=0.5):
    """visits, last pass rate and pass-rate EMA of every prompt from the observed groups (0/1 rewards)."""
    visits, last, ema = np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for prompts, rewards in observed:
        for i, p in zip(prompts, rewards.mean(dim=1).numpy()):
            ema[i] = p if visits[i] == 0 else (1 - alpha) * ema[i] + alpha * p
            last[i], visits[i] = p, visits[i] + 1
    return visits, last, ema


def test_uniform_generates_every_prompt_in_whole_groups_and_feeds_the_rewards(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer)
    trainer.train()
    selector = trainer.selector
    text = {row["prompt"]: i for i, row in enumerate(prompts())}
    per_epoch = NUM_PROMPTS // 2  # P = 8 // 4 = 2 prompts per generation
    assert len(trainer.generated) == len(trainer.observed) == 2 * per_epoch
    for call, (observed, rewards) in zip(trainer.generated, trainer.observed):
        # Each generation call holds P prompts, each G times in a row, and it is what was observed.
        assert [text[p] for p in call] == [i for i in observed for _ in range(GROUP)]
        assert rewards.shape == (2, GROUP)
    for epoch in range(2):
        seen = [i for observed, _ in trainer.observed[epoch * per_epoch : (epoch + 1) * per_epoch] for i in observed]
        assert sorted(seen) == list(range(NUM_PROMPTS))
    # The rewards that reached the table are those the reward function gave.
    visits, last, ema = expected_table(trainer.observed)
    table = selector.table
    np.testing.assert_array_equal(table.field("visits"), visits)
    np.testing.assert_allclose(table.field("last_pass"), last, rtol=1e-6)
    np.testing.assert_allclose(table.field("pass_ema"), ema, rtol=1e-6)
    flat = sum(int(((r.max(1).values - r.min(1).values) == 0).sum()) for _, r in trainer.observed)
    assert 0 < flat < 2 * NUM_PROMPTS  # the reward gives groups with and without a spread
    metrics = selector.metrics()
    assert metrics["rollouts"] == 2 * NUM_PROMPTS * GROUP
    assert metrics["rollout_tokens"] == sum(int(x.sum()) for x in trainer.lengths)
    assert metrics["zero_variance_prompts"] == flat
    assert trainer.state.global_step == 2 * per_epoch  # one generation per optimizer step (S = gas = 2)
    assert selector.step_count == trainer.state.global_step


def test_skipped_prompts_are_never_generated(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, policy="random_subset", options={"budget": 0.5}, num_train_epochs=3)
    trainer.train()
    text = {row["prompt"]: i for i, row in enumerate(prompts())}
    generated = [text[p] for call in trainer.generated for p in call]
    visits = trainer.selector.table.field("visits")
    # Three epochs of 6 planned prompts (half of 12), each 3 generations of P = 2 prompts.
    assert len(trainer.generated) == 9 and len(generated) == 9 * 2 * GROUP
    assert int(visits.sum()) == 18 and int((visits > 0).sum()) < NUM_PROMPTS
    for i in range(NUM_PROMPTS):  # every generated completion is of an observed prompt, and only those
        assert generated.count(i) == GROUP * int(visits[i])
    for epoch in range(3):  # within an epoch, each planned prompt once
        seen = [i for observed, _ in trainer.observed[3 * epoch : 3 * epoch + 3] for i in observed]
        assert len(set(seen)) == 6
    assert trainer.selector.metrics()["skipped_prompts"] == 3 * 6
    assert trainer.state.global_step == 9  # shorter epochs: 3 optimizer steps each, not 6


def test_default_selector_and_metrics_are_logged(tmp_path, tokenizer):
    args = make_args(tmp_path, num_train_epochs=3)
    trainer = Recording(
        model=tiny_llama(len(tokenizer)), reward_funcs=[length_reward], args=args, train_dataset=prompts(),
        processing_class=tokenizer, geko_policy="greso",
    )
    trainer.train()
    selector = trainer.selector
    assert selector.signal == "rewards" and selector.policy.name == "greso"
    assert selector.batch_size == 2 and selector.drop_last and selector.num_replicas == 1
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == len(trainer.observed) == trainer.state.global_step
    metrics = selector.metrics()
    last = logs[-1]
    for name in ("rollouts", "rollout_tokens", "prompts", "zero_variance_prompts", "skipped_prompts"):
        assert last[f"geko/{name}"] == metrics[name], name
    assert last["geko/rollout_tokens"] == sum(int(x.sum()) for x in trainer.lengths) > 0
    assert last["geko/rollouts"] == GROUP * last["geko/prompts"] == GROUP * 2 * len(trainer.observed)
    assert sum(last[f"geko/bucket_{b}"] for b in ("FREEZE", "LIGHT", "FOCUS", "HARD", "UNSEEN")) == NUM_PROMPTS
    for entry, (_, rewards) in zip(logs, trainer.observed):
        spread = rewards.max(dim=1).values - rewards.min(dim=1).values
        assert entry["geko/batch_zero_variance_share"] == pytest.approx(float((spread <= 1e-6).float().mean()))
        # TRL's own figure of the same batch agrees.
        assert entry["geko/batch_zero_variance_share"] == pytest.approx(entry["frac_reward_zero_std"])


def test_resume_continues_exactly(tmp_path, tokenizer):
    options = dict(policy="random_subset", options={"budget": 0.5}, save_strategy="steps", save_steps=2, num_train_epochs=3)
    full = build(tmp_path, tokenizer, name="full", **options)
    full.train()
    build(tmp_path, tokenizer, name="part", **options).train()
    for at in (4, 6):  # inside epoch 1, and at its end (3 optimizer steps per epoch)
        checkpoint = os.path.join(str(tmp_path / "part"), f"checkpoint-{at}")
        assert os.path.isfile(os.path.join(checkpoint, "geko_selector.pt"))
        resumed = build(tmp_path, tokenizer, name=f"resumed{at}", **options)
        resumed.train(resume_from_checkpoint=checkpoint)
        # The same prompts, the same completions' rewards, the same table and model.
        assert len(resumed.observed) == len(full.observed) - at == 9 - at
        assert [o for o, _ in resumed.observed] == [o for o, _ in full.observed[at:]]
        for (_, a), (_, b) in zip(resumed.observed, full.observed[at:]):
            assert torch.equal(a, b)
        for name, value in full.selector.table.state_dict().items():
            np.testing.assert_array_equal(resumed.selector.table.state_dict()[name], value, err_msg=name)
        assert resumed.selector.metrics()["rollout_tokens"] == full.selector.metrics()["rollout_tokens"]
        for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(a, b), name


def test_refuses_mismatched_selectors(tmp_path, tokenizer):
    args = make_args(tmp_path)

    def rewards_selector(**options):
        return Selector(NUM_PROMPTS, "uniform", signal="rewards", **{"epochs": 2, "batch_size": 2, "drop_last": True, **options})

    with pytest.raises(ValueError, match="batch_size=2"):
        build(tmp_path, tokenizer, selector=rewards_selector(batch_size=4))
    with pytest.raises(ValueError, match="drop_last=True"):
        build(tmp_path, tokenizer, selector=rewards_selector(drop_last=False))
    with pytest.raises(ValueError, match="epochs=3"):
        build(tmp_path, tokenizer, selector=rewards_selector(epochs=3))
    with pytest.raises(ValueError, match="13 prompts"):
        build(tmp_path, tokenizer, selector=Selector(13, "uniform", signal="rewards", epochs=2, batch_size=2, drop_last=True))
    with pytest.raises(ValueError, match="signal='rewards'"):
        build(tmp_path, tokenizer, selector=Selector(NUM_PROMPTS, "uniform", epochs=2, batch_size=2, drop_last=True))
    with pytest.raises(ValueError, match="draws more prompts"):
        build(tmp_path, tokenizer, selector=Selector(NUM_PROMPTS, "dynamic", signal="rewards", epochs=2, batch_size=2,
                                                     drop_last=True))
    with pytest.raises(ValueError, match="train_dataset"):
        GekoGRPOTrainer(model=tiny_llama(len(tokenizer)), reward_funcs=[length_reward], args=args, processing_class=tokenizer)
    with pytest.raises(TypeError, match="geko_fused_head"):
        GekoGRPOTrainer(model=tiny_llama(len(tokenizer)), reward_funcs=[length_reward], args=args, train_dataset=prompts(),
                        processing_class=tokenizer, geko_fused_head=True)


def test_unscored_completions_count_as_their_groups_mean(tmp_path, tokenizer):
    def partly_scored(completions, target, **kwargs):
        # The first completion of every group is left unscored; the rest scored as before.
        scores = length_reward(completions, target)
        return [None if i % GROUP == 0 else s for i, s in enumerate(scores)]

    args = make_args(tmp_path, num_train_epochs=1)
    trainer = Recording(
        model=tiny_llama(len(tokenizer)), reward_funcs=[partly_scored], args=args, train_dataset=prompts(),
        processing_class=tokenizer, selector=make_selector(args),
    )
    trainer.train()
    last = trainer.selector.table.field("last_pass")
    for observed, rewards in trainer.observed:
        assert torch.isnan(rewards[:, 0]).all() and not torch.isnan(rewards[:, 1:]).any()
        expected = rewards[:, 1:].mean(dim=1)  # the unscored one at the mean leaves the mean as it is
        np.testing.assert_allclose(last[observed], expected.numpy(), rtol=1e-6)


def test_import_geko_core_stays_light():
    import subprocess
    import sys

    code = "import sys, geko_core; print(sorted(m for m in ('trl', 'transformers', 'datasets') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # and the GRPO trainer is where the TRL integration is exported
    from geko_core.integrations import trl as trl_integration

    assert trl_integration.GekoGRPOTrainer is GekoGRPOTrainer


def test_example_runs_at_a_tiny_size(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "grpo_tiny_tasks.py"
    spec = importlib.util.spec_from_file_location("grpo_tiny_tasks", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--epochs", "1", "--num-train", "32", "--warmup-steps", "5", "--policy", "random_subset"])
    out = capsys.readouterr().out
    plain, geko = rows
    assert plain[0] == "GRPOTrainer" and geko[0] == "GekoGRPOTrainer (random_subset)"
    assert plain[1] == 32 * 8 and geko[1] == 16 * 8  # rollouts: every prompt, then half of them (budget 0.5)
    assert geko[3] == 16 and 0 < geko[2] < plain[2]  # skipped prompts; fewer rollout tokens
    assert "rollout tokens saved" in out and "held-out" in out
    assert "log-probabilities through linear_logprobs" in out


def test_several_optimisation_passes_per_generation(tmp_path, tokenizer):
    # num_iterations=2: every generation batch is trained twice, so a chunk of prompts lasts two
    # optimizer steps; a checkpoint between them cannot hold TRL's buffered completions.
    trainer = build(tmp_path, tokenizer, num_train_epochs=1, num_iterations=2, save_strategy="steps", save_steps=1)
    with pytest.warns(UserWarning, match="inside a generation window"):
        trainer.train()
    assert len(trainer.generated) == len(trainer.observed) == NUM_PROMPTS // 2
    assert sorted(i for observed, _ in trainer.observed for i in observed) == list(range(NUM_PROMPTS))
    assert trainer.state.global_step == 2 * len(trainer.observed)
    np.testing.assert_array_equal(trainer.selector.table.field("visits"), np.ones(NUM_PROMPTS))


def test_max_steps_runs_over_shorter_epochs(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, policy="random_subset", options={"budget": 0.5}, max_steps=5)
    trainer.train()
    assert trainer.state.global_step == len(trainer.observed) == 5
    selector = trainer.selector
    assert selector.total_steps == 5 and selector.step_count == 5 and selector.epoch == 1  # 3 steps per epoch
    assert int(selector.table.field("visits").sum()) == 10


# -- the policy's per-token log-probabilities through linear_logprobs -----------------------------------
def _scored_batch(tokenizer, vocab):
    """A left-padded prompt + completion batch as TRL scores it: ids, attention mask, completion width."""
    generator = torch.Generator().manual_seed(7)
    prompt_ids = torch.randint(3, vocab, (6, 5), generator=generator)
    completion_ids = torch.randint(3, vocab, (6, 4), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[:2, :2] = 0  # left padding
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[3:, 2:] = 0  # completions that ended early
    ids = torch.cat((prompt_ids, completion_ids), dim=1)
    return ids, torch.cat((prompt_mask, completion_mask), dim=1), completion_ids.shape[1], completion_mask.bool()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logprobs_are_trls_and_the_plain_log_softmax(tmp_path, tokenizer, monkeypatch, temperature):
    import trl.trainer.utils as trl_utils

    vocab = len(tokenizer)
    ours = build(tmp_path, tokenizer, name="ours", temperature=temperature)
    assert ours.geko_logprob_path == "linear_logprobs"
    theirs = GRPOTrainer(
        model=tiny_llama(vocab), reward_funcs=[length_reward], args=make_args(tmp_path, "theirs", temperature=temperature),
        train_dataset=prompts(), processing_class=tokenizer,
    )
    theirs.model.load_state_dict(ours.model.state_dict())
    ids, attention, keep, completion_mask = _scored_batch(tokenizer, vocab)
    advantages = torch.linspace(-1.0, 1.0, ids.shape[0])[:, None]

    def run(trainer):
        trainer.model.zero_grad(set_to_none=True)
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, keep, compute_entropy=True)
        # a policy-gradient loss with an entropy bonus, so both outputs carry a gradient
        loss = -((logps * advantages + 0.1 * entropies) * completion_mask).sum() / completion_mask.sum()
        loss.backward()
        return logps.detach(), entropies.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    # Our path never enters TRL's chunked function.
    with monkeypatch.context() as patch:
        patch.setattr(trl_utils, "_ChunkedLogProbFunction", None)
        logps, entropies, grads = run(ours)
    trl_logps, trl_entropies, trl_grads = run(theirs)
    # The plain path: the model's own logits, divided by the temperature, log_softmax, gather.
    with torch.no_grad():
        logits = theirs.model(input_ids=ids, attention_mask=attention).logits[:, -keep - 1 : -1] / temperature
    plain = torch.log_softmax(logits.float(), dim=-1)
    plain_logps = plain.gather(2, ids[:, -keep:, None]).squeeze(2)
    plain_entropy = -(plain.exp() * plain).sum(-1)
    assert logps.shape == entropies.shape == completion_mask.shape
    kept = completion_mask
    torch.testing.assert_close(logps[kept], plain_logps[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropies[kept], plain_entropy[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps, trl_logps, atol=1e-5, rtol=1e-5)  # padding positions: 0 on both
    torch.testing.assert_close(entropies, trl_entropies, atol=1e-5, rtol=1e-5)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_models_whose_logits_linear_logprobs_does_not_form_keep_trls_path(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    model.config.final_logit_softcapping = 30.0  # Gemma-2's soft-capping: TRL's fused head applies it
    args = make_args(tmp_path)
    trainer = GekoGRPOTrainer(
        model=model, reward_funcs=[length_reward], args=args, train_dataset=prompts(), processing_class=tokenizer,
        selector=make_selector(args),
    )
    assert trainer.geko_logprob_path.startswith("trl: ") and "final_logit_softcapping" in trainer.geko_logprob_path
    ids, attention, keep, completion_mask = _scored_batch(tokenizer, len(tokenizer))
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, keep)
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -keep - 1 : -1]
    capped = 30.0 * torch.tanh(logits.float() / 30.0)
    expected = torch.log_softmax(capped, dim=-1).gather(2, ids[:, -keep:, None]).squeeze(2)
    torch.testing.assert_close(logps[completion_mask], expected[completion_mask], atol=1e-5, rtol=1e-5)
