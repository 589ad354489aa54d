"""rl-algo: prompts, verifiable rewards, KV-cache sampling, GRPO's arithmetic and its loop
(smoke scale, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geko_core.bench.rl_data import END, FAMILIES, MAX_ANSWER, PAD, PROMPT_LEN, decode, encode, graded_reward, make_rl_data, score
from geko_core.bench.rl_grpo import FullPolicy, group_advantages, grpo_loss, grpo_train, make_policy, run_rl
from geko_core.bench.rl_model import TinyLM, completion_logprobs, generate, token_mask
from geko_core.bench.rl_setup import SCALES, load_data, warm_start


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _completion(text: str, end: bool = True) -> list[int]:
    return encode(text) + ([END] if end else []) + [PAD] * 2


# --------------------------------------------------------------------------------------------
# Data and rewards


def test_rewards_hand_computed():
    assert score("add", "85", _completion("85")) == 1.0
    assert score("add", "85", _completion("58")) == 0.0
    assert score("add", "85", _completion("85", end=False)) == 0.0  # no end token: no answer
    assert score("add", "85", _completion("850")) == 0.0
    assert score("mul", "376", _completion("376")) == 1.0
    assert score("cnt", "3", _completion("3")) == 1.0
    assert score("rev", "dcba", _completion("dcb")) == 0.0
    # graded: share of positions right over the longer of answer and completion
    assert score("srt", "1134", _completion("1134")) == 1.0
    assert score("srt", "1134", _completion("1144")) == pytest.approx(3 / 4)
    assert score("srt", "1134", _completion("113")) == pytest.approx(3 / 4)
    assert score("srt", "1134", _completion("113499")) == pytest.approx(4 / 6)
    assert score("srt", "1134", _completion("4311")) == 0.0
    assert score("srt", "1134", _completion("")) == 0.0
    assert score("srt", "1134", _completion("1134", end=False)) == 0.0
    assert graded_reward("12", "21") == 0.0
    with pytest.raises(ValueError, match="unknown family"):
        score("nope", "1", _completion("1"))


def test_data_answers_and_splits_disjoint():
    data = make_rl_data(120, 36, 60, num_warmup=240, seed=3)
    names = ("train", "validation", "test", "warmup")
    texts = {s: set(getattr(data, s).text) for s in names}
    assert [len(texts[s]) for s in names] == [120, 36, 60, 240]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not texts[a] & texts[b], (a, b)
    for split in (data.train, data.test, data.warmup):
        assert split.prompts.shape[1] == PROMPT_LEN
        for i in range(len(split)):
            assert decode(split.prompts[i]) == split.text[i]
            assert split.reward(i, _completion(split.answers[i])) == 1.0
            prompt, answer = split.text[i], split.answers[i]
            if prompt.endswith("=") and "+" in prompt:
                a, b = prompt[:-1].split("+")
                assert int(answer) == int(a) + int(b)
            if prompt.startswith("srt "):
                assert answer == "".join(sorted(prompt[4:-1]))
    assert np.bincount(data.train.family, minlength=len(FAMILIES)).tolist() == [20] * len(FAMILIES)
    again = make_rl_data(120, 36, 60, num_warmup=240, seed=3)
    assert again.train.text == data.train.text and again.test.text == data.test.text and again.warmup.text == data.warmup.text
    assert make_rl_data(120, 36, 60, num_warmup=240, seed=4).train.text != data.train.text
    with pytest.raises(IndexError):
        data.train.reward(120, _completion("1"))


# --------------------------------------------------------------------------------------------
# The model's sampler


def _model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(PROMPT_LEN + MAX_ANSWER, width=32, layers=2, heads=4)


def test_kv_cache_sampling_matches_no_cache_reference():
    model = _model()
    data = load_data(SCALES["smoke"])
    prompts = torch.from_numpy(data.train.prompts[:5])
    out = generate(model, prompts, 4, max_new_tokens=MAX_ANSWER, generator=torch.Generator().manual_seed(1))
    # Reference without cache: the whole sequence forwarded at once, causally.
    rows = prompts.repeat_interleave(4, dim=0)
    with torch.no_grad():
        reference = completion_logprobs(model, rows, out.tokens)
    mask = token_mask(out.lengths, MAX_ANSWER)
    torch.testing.assert_close(out.logprobs[mask], reference[mask], atol=1e-5, rtol=1e-5)
    assert (out.logprobs[~mask] == 0).all() and (out.tokens[~mask] == PAD).all()
    # Greedy through the cache: every token is the no-cache argmax at its position.
    greedy = generate(model, prompts, 1, max_new_tokens=MAX_ANSWER, greedy=True)
    with torch.no_grad():
        logits, _ = model(torch.cat((prompts, greedy.tokens[:, :-1]), dim=1))
    argmax = logits[:, PROMPT_LEN - 1 :].argmax(-1)
    gmask = token_mask(greedy.lengths, MAX_ANSWER)
    assert torch.equal(argmax[gmask], greedy.tokens[gmask])
    # The cached step's logits themselves against the full forward.
    with torch.no_grad():
        first, cache = model(rows)
        step, _ = model(out.tokens[:, :1], cache)
        full, _ = model(torch.cat((rows, out.tokens[:, :1]), dim=1))
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_rollout_tokens_are_the_generated_lengths():
    model = _model(2)
    prompts = torch.from_numpy(load_data(SCALES["smoke"]).train.prompts[:6])
    out = generate(model, prompts, 8, max_new_tokens=MAX_ANSWER, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (48, MAX_ANSWER)
    for row in range(48):
        toks = out.tokens[row].tolist()
        length = toks.index(END) + 1 if END in toks else MAX_ANSWER
        assert int(out.lengths[row]) == length
        assert all(t == PAD for t in toks[length:])
    assert out.generated_tokens == sum(int(x) for x in out.lengths)
    again = generate(model, prompts, 8, max_new_tokens=MAX_ANSWER, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, out.tokens)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompts, 2, max_new_tokens=3, temperature=0.0)


# --------------------------------------------------------------------------------------------
# GRPO's arithmetic


def test_group_advantages():
    rewards = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.25, 0.75]])
    adv = group_advantages(rewards)
    assert (adv[0] == 0).all() and (adv[1] == 0).all() and (adv[3] == 0).all()
    std = float(np.std([1, 0, 0, 0]))
    torch.testing.assert_close(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))
    torch.testing.assert_close(adv[4], torch.tensor([-1.0, 1, -1, 1]) * 0.25 / (0.25 + 1e-6))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.ones(4))


def test_zero_variance_group_has_exactly_zero_gradient():
    model = _model(1)
    prompts = torch.from_numpy(load_data(SCALES["smoke"]).train.prompts[:2])
    out = generate(model, prompts, 4, max_new_tokens=MAX_ANSWER, generator=torch.Generator().manual_seed(3))
    adv = group_advantages(torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 0]])).reshape(-1)
    rows = prompts.repeat_interleave(4, dim=0)
    logits_leaf = None

    def loss_of(clip_old: bool) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal logits_leaf
        x = torch.cat((rows, out.tokens[:, :-1]), dim=1)
        logits = model(x)[0][:, PROMPT_LEN - 1 :].detach().requires_grad_(True)
        logits_leaf = logits
        logp = torch.log_softmax(logits, -1).gather(2, out.tokens[..., None]).squeeze(2)
        old = logp.detach() + (0.3 if clip_old else 0.0)
        return grpo_loss(logp, old, adv, token_mask(out.lengths, MAX_ANSWER)), logits

    for clip_old in (False, True):
        loss, logits = loss_of(clip_old)
        loss.backward()
        assert (logits.grad[:4] == 0).all()  # the all-right group
        assert logits.grad[4:].abs().sum() > 0


def test_single_update_ratio_is_one_and_loss_is_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = grpo_loss(logp, logp.detach(), adv, mask)
    assert float(loss.detach()) == pytest.approx(-(1 + 1 - 2 - 2 - 2) / 5)
    loss.backward()
    expected = -torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)


# --------------------------------------------------------------------------------------------
# The loop


def test_run_rl_smoke_is_deterministic_and_counts():
    first = run_rl("full", 0, "smoke")
    again = run_rl("full", 0, "smoke")
    for key in ("rollout_tokens", "trained_tokens", "rollouts", "zero_variance_share", "steps"):
        assert first[key] == again[key]
    assert first["after"] == again["after"]

    def figures(curve: list[dict]) -> list[dict]:  # the curve without its wall-clock
        return [{k: v for k, v in p.items() if k != "rl_seconds"} for p in curve]

    assert figures(first["curve"]) == figures(again["curve"])
    cfg = SCALES["smoke"]
    assert first["rollouts"] == cfg.epochs * cfg.num_train * cfg.G
    assert first["dropped_rollout_tokens"] == 0 and first["groups"] == cfg.epochs * cfg.num_train
    assert first["curve"][0]["rollout_tokens"] == 0 and first["curve"][-1]["rollout_tokens"] == first["rollout_tokens"]
    assert first["rollout_tokens"] <= first["rollouts"] * MAX_ANSWER
    assert first["trained_tokens"] <= first["rollout_tokens"]
    other = run_rl("full", 1, "smoke")
    assert other["rollout_tokens"] != first["rollout_tokens"] or other["after"] != first["after"]


class _Recorder(FullPolicy):
    """Full's order, recording every report (to check the loop's counts)."""

    def __init__(self, n: int, seed: int, filtering: bool) -> None:
        super().__init__(n, seed)
        self.filter_zero_variance = filtering
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def report(self, indices, rewards, lengths) -> None:
        self.seen.append((indices.copy(), rewards.copy(), lengths.copy()))


@pytest.mark.parametrize("filtering", [False, True])
def test_loop_counts_rollouts_and_dynamic_sampling_extras(filtering):
    cfg = SCALES["smoke"]
    data = load_data(cfg)
    model = TinyLM(PROMPT_LEN + MAX_ANSWER, cfg.width, cfg.layers, cfg.heads)
    model.load_state_dict(warm_start(cfg, 0))
    policy = _Recorder(len(data.train), 0, filtering)
    counters, epochs = grpo_train(model, data, policy, cfg, 0)
    lengths = np.concatenate([s[2].reshape(-1) for s in policy.seen])
    assert counters.rollout_tokens == int(lengths.sum())
    flat = [(r == r[:, :1]).all(axis=1) for _, r, _ in policy.seen]
    dropped = sum(int(l[f].sum()) for (_, _, l), f in zip(policy.seen, flat))
    assert counters.zero_variance_groups == sum(int(f.sum()) for f in flat)
    if filtering:
        assert counters.dropped_rollout_tokens == dropped and counters.dropped_groups == counters.zero_variance_groups
        # every prompt of every epoch rolled out once; the batches were refilled from the epoch
        assert sorted(np.concatenate([s[0] for s in policy.seen]).tolist()) == sorted(list(range(cfg.num_train)) * cfg.epochs)
        assert any(len(s[0]) < cfg.batch_prompts for s in policy.seen) or counters.zero_variance_groups == 0
    else:
        assert counters.dropped_rollout_tokens == 0 and all(len(s[0]) <= cfg.batch_prompts for s in policy.seen)
    assert len(epochs) == cfg.epochs


def test_policies_and_budget():
    full, subset = make_policy("full", 100, 0), make_policy("random_subset", 100, 0, budget=0.3)
    for p in (full, subset):
        p.begin_epoch(0)
    assert sorted(full.choose(0, 1000).tolist()) == list(range(100))
    assert len(subset.choose(0, 1000)) == 30 and len(subset.choose(1, 10)) == 0
    with pytest.raises(ValueError, match="unknown RL policy"):
        make_policy("greso", 10, 0)
    with pytest.raises(ValueError, match="share"):
        make_policy("random_subset", 10, 0, budget=0.0)
