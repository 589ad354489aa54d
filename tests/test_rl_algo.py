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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_are_the_plain_log_softmax_and_its_gradient(temperature):
    # The fused path against log_softmax(head(h) / tau).gather(...) on the materialised logits:
    # the same values at the kept positions, 0 elsewhere, and the same parameter gradients of a
    # GRPO loss (so the RL loop trains the same function of the parameters).
    model = _model(4)
    prompts = torch.from_numpy(load_data(SCALES["smoke"]).train.prompts[:3]).repeat_interleave(4, dim=0)
    out = generate(model, prompts[::4], 4, max_new_tokens=MAX_ANSWER, generator=torch.Generator().manual_seed(5))
    mask = token_mask(out.lengths, MAX_ANSWER)
    assert 0 < int(mask.sum()) < mask.numel()
    advantages = torch.linspace(-1.0, 1.0, prompts.shape[0])

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        if fused:
            logp = completion_logprobs(model, prompts, out.tokens, mask=mask, temperature=temperature)
        else:
            h = model.hidden(torch.cat((prompts, out.tokens[:, :-1]), dim=1))[:, PROMPT_LEN - 1 :]
            plain = torch.log_softmax(model.head(h) / temperature, dim=-1)
            logp = plain.gather(2, out.tokens[..., None]).squeeze(2)
        old = logp.detach() + 0.1 * mask  # a ratio away from 1, so the clipping acts
        grpo_loss(logp, old, advantages, mask).backward()
        return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fused, fused_grads = run(True)
    plain, plain_grads = run(False)
    torch.testing.assert_close(fused[mask], plain[mask], atol=1e-5, rtol=1e-5)
    assert (fused[~mask] == 0).all()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    whole = completion_logprobs(model, prompts, out.tokens, temperature=temperature)  # no mask: every position
    torch.testing.assert_close(whole[mask], fused[mask], atol=1e-6, rtol=1e-6)


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
    full = make_policy("full", 100, 0, epochs=2)
    full.begin_epoch(0)
    assert sorted(full.choose(0, 1000).tolist()) == list(range(100))
    assert len(full.choose(1, 10)) == 0
    subset = make_policy("random_subset", 100, 0, epochs=2, budget=0.3)
    assert subset.selector.policy.name == "random_subset" and subset.selector.policy.budget == 0.3
    subset.begin_epoch(0)
    assert len(subset.choose(0, 1000)) == 30 and len(subset.choose(1, 10)) == 0
    assert make_policy("dynamic", 10, 0, epochs=1).filter_zero_variance is True
    assert make_policy("greso", 10, 0, epochs=1).filter_zero_variance is False
    for name in ("greso", "geko", "gainrl", "random_subset", "dynamic"):
        assert make_policy(name, 10, 0, epochs=1, fill=True).filter_zero_variance is True
    assert make_policy("full", 10, 0, epochs=1, fill=True).filter_zero_variance is False  # plain GRPO either way
    with pytest.raises(ValueError, match="unknown RL policy"):
        make_policy("nope", 10, 0, epochs=1)
    with pytest.raises(ValueError, match="budget"):
        make_policy("random_subset", 10, 0, epochs=1, budget=0.0)


def test_selector_policy_feeds_observe_rewards_and_trains_keep():
    """The loop's counts agree with the Selector's: rollouts, rollout tokens, zero-variance
    prompts; the trained groups are exactly ``stats.keep``; dynamic sampling's dropped groups
    are the zero-variance ones."""
    cfg = SCALES["smoke"]
    data = load_data(cfg)
    for name, fill in (("greso", False), ("dynamic", False), ("geko", False), ("greso", True)):
        model = TinyLM(PROMPT_LEN + MAX_ANSWER, cfg.width, cfg.layers, cfg.heads)
        model.load_state_dict(warm_start(cfg, 0))
        policy = make_policy(name, len(data.train), 0, epochs=cfg.epochs, fill=fill)
        counters, _ = grpo_train(model, data, policy, cfg, 0)
        m = policy.selector.metrics()
        assert m["rollouts"] == counters.rollouts and m["rollout_tokens"] == counters.rollout_tokens
        assert m["zero_variance_prompts"] == counters.zero_variance_groups and m["prompts"] == counters.groups
        if name == "dynamic" or fill:
            assert counters.dropped_groups == counters.zero_variance_groups
        else:
            assert counters.dropped_groups == 0


def test_gainrl_prepass_is_counted():
    cfg = SCALES["smoke"]
    data = load_data(cfg)
    model = TinyLM(PROMPT_LEN + MAX_ANSWER, cfg.width, cfg.layers, cfg.heads)
    model.load_state_dict(warm_start(cfg, 0))
    policy = make_policy("gainrl", len(data.train), 0, epochs=cfg.epochs)
    counters, _ = grpo_train(model, data, policy, cfg, 0)
    m = policy.metrics()
    # once, before the first epoch: every training prompt's PROMPT_LEN tokens
    assert m["prepass_tokens"] == len(data.train) * PROMPT_LEN and m["prepass_seconds"] > 0
    assert policy.selector.metrics()["gainrl/prepass_tokens"] == len(data.train) * PROMPT_LEN
    assert counters.seconds["selection"] >= m["prepass_seconds"]


# --------------------------------------------------------------------------------------------
# The suite's statistics (rl_stats) on hand-made figures


def _pt(step, tokens, seconds, val, test):
    return {"step": step, "rollout_tokens": tokens, "rl_seconds": seconds, "validation_exact_%": val, "test_exact_%": test}


_CURVE = [_pt(0, 0, 0.0, 30.0, 31.0), _pt(10, 100, 2.0, 38.0, 37.0), _pt(20, 200, 4.0, 41.0, 40.0), _pt(30, 300, 6.0, 40.0, 42.0)]


def test_paired_differences_and_noise():
    from geko_core.bench.rl_stats import mean_std, paired

    base = {0: 40.0, 1: 35.0, 2: 45.0, 3: 38.0, 4: 42.0}
    # every seed 2 pt better: no spread in the differences, so not noise whatever the seeds' spread
    better = {s: v + 2.0 for s, v in base.items()}
    d = paired(better, base)
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(0.0) and d["noise"] is False
    assert d["seeds"] == [0, 1, 2, 3, 4]
    # differences +3, -3, +1, -1, +0.5: mean 0.1, the interval holds 0
    mixed = {0: 43.0, 1: 32.0, 2: 46.0, 3: 37.0, 4: 42.5}
    d = paired(mixed, base)
    diffs = np.array([3.0, -3.0, 1.0, -1.0, 0.5])
    assert d["mean"] == pytest.approx(diffs.mean()) and d["std"] == pytest.approx(diffs.std(ddof=1))
    assert d["ci95"] == pytest.approx(2.776 * diffs.std(ddof=1) / np.sqrt(5))
    assert d["noise"] is True
    # only the seeds both have are paired
    assert paired({0: 1.0, 9: 5.0}, base)["seeds"] == [0]
    assert paired({0: 1.0}, base)["noise"] is True and paired({0: 1.0}, base)["ci95"] is None
    with pytest.raises(ValueError, match="no seed in common"):
        paired({7: 1.0}, base)
    assert mean_std([2.0, 4.0]) == pytest.approx((3.0, np.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_target_cost_and_equal_budget_on_hand_made_curves():
    from geko_core.bench.rl_stats import accuracy_at_budget, cost_to_target, mean_curve, target_of

    # full ends at 40% on 100 validation prompts: the target is 40 - 100 * sqrt(.4 * .6 / 100)
    target = target_of(_CURVE, 100)
    assert target == pytest.approx(40.0 - 100.0 * np.sqrt(0.24 / 100))
    assert cost_to_target(_CURVE, target) == {"step": 10, "rollout_tokens": 100, "rl_seconds": 2.0}
    assert cost_to_target(_CURVE, 41.0) == {"step": 20, "rollout_tokens": 200, "rl_seconds": 4.0}
    assert cost_to_target(_CURVE, 41.5) is None
    assert cost_to_target(_CURVE, 0.0)["step"] == 0
    # the model held when the budget is spent: the last point within it
    assert accuracy_at_budget(_CURVE, 250) == 40.0
    assert accuracy_at_budget(_CURVE, 200) == 40.0
    assert accuracy_at_budget(_CURVE, 199) == 37.0
    assert accuracy_at_budget(_CURVE, 10_000) == 42.0
    assert accuracy_at_budget(_CURVE, 50, key="validation_exact_%") == 30.0
    with pytest.raises(ValueError):
        target_of([], 100)
    with pytest.raises(ValueError):
        accuracy_at_budget([], 1)
    other = [_pt(0, 0, 0.0, 30.0, 35.0), _pt(10, 150, 1.0, 30.0, 45.0)]
    mean, std = mean_curve([_CURVE, other], np.array([0.0, 100.0, 150.0, 300.0]), "test_exact_%")
    assert mean[:3].tolist() == pytest.approx([33.0, 36.0, 41.0])
    assert np.isnan(mean[3]) and np.isnan(std[3])  # past a run's end: no mean of the others
    assert std[0] == pytest.approx(np.std([31.0, 35.0], ddof=1))


def _fake_run(policy, seed, tokens, seconds, final_test, curve):
    return {
        "policy": policy, "seed": seed, "rollout_tokens": tokens, "trained_tokens": tokens // 2, "rl_seconds": seconds,
        "seconds": {"rollout": seconds * 0.6, "training": seconds * 0.3, "selection": seconds * 0.01, "other": seconds * 0.09},
        "after": {"test": {"exact_%": final_test, "sampled_reward": final_test / 100}, "validation": {"exact_%": curve[-1]["validation_exact_%"]}},
        "zero_variance_share": 0.5, "dropped_rollout_tokens": 0, "curve": curve,
    }


def test_summarise_pairs_seeds_and_costs():
    from geko_core.bench.rl_bench import format_rl_table, summarise

    runs = []
    for seed, shift in enumerate((0.0, 2.0, -1.0, 1.0, 0.5)):
        full = [_pt(0, 0, 0.0, 30 + shift, 30 + shift), _pt(10, 500, 5.0, 38 + shift, 38 + shift), _pt(20, 1000, 10.0, 40 + shift, 40 + shift)]
        half = [_pt(0, 0, 0.0, 30 + shift, 30 + shift), _pt(10, 250, 2.0, 39 + shift, 39 + shift), _pt(20, 500, 4.0, 40 + shift, 41 + shift)]
        runs.append(_fake_run("full", seed, 1000, 10.0, 40 + shift, full))
        runs.append(_fake_run("random_subset", seed, 500, 4.0, 41 + shift, half))
    rows = summarise(runs, num_validation=10_000, equal_budget=0.5)
    assert [r["policy"] for r in rows] == ["full", "random_subset"]
    full, sub = rows
    assert sub["test_exact_%_vs_full"]["mean"] == pytest.approx(1.0) and sub["test_exact_%_vs_full"]["noise"] is False
    assert sub["rollout_tokens_saved_%"] == pytest.approx((50.0, 0.0))
    assert sub["rl_seconds_saved_%"] == pytest.approx((60.0, 0.0))
    # target 40 + shift - 0.49: full reaches it at its end (100%), the subset at 500 tokens and 4 s
    assert full["cost_to_target_tokens_%"] == pytest.approx((100.0, 0.0)) and full["target_reached"] == "5/5"
    assert sub["cost_to_target_tokens_%"] == pytest.approx((50.0, 0.0))
    assert sub["cost_to_target_seconds_%"] == pytest.approx((40.0, 0.0))
    # at 500 rollout tokens full holds 38 + shift and the subset 41 + shift
    assert sub["test_exact_at_budget_vs_full"]["mean"] == pytest.approx(3.0)
    assert sub["selection_share_%"][0] == pytest.approx(1.0)
    text = format_rl_table(rows)
    assert "random_subset" in text and "+1.0 ± 0.0" in text and "5/5" in text


def test_suite_smoke_runs_counts_and_rejects_unknown():
    from geko_core.bench.rl_bench import run_suite, summarise, write_rl_outputs

    with pytest.raises(ValueError, match="unknown rl-algo policy"):
        run_suite(["full", "nope"], [0], "smoke")
    with pytest.raises(ValueError, match="scale"):
        run_suite(["full"], [0], "huge")
    seen = []
    runs = run_suite(["random_subset", "full", "dynamic", "geko"], [0, 1], "smoke", on_run=seen.append)
    assert [(r["policy"], r["seed"]) for r in runs] == [(p, s) for s in (0, 1) for p in ("full", "geko", "dynamic", "random_subset")]
    assert seen == runs
    for r in runs:
        s = r["seconds"]
        assert r["rl_seconds"] == pytest.approx(s["rollout"] + s["training"] + s["selection"] + s["other"])
        assert r["curve"][-1]["rollout_tokens"] == r["rollout_tokens"]
        assert r["dropped_rollout_tokens"] <= r["rollout_tokens"]
        assert (r["dropped_rollout_tokens"] > 0) == (r["policy"] == "dynamic" and r["dropped_groups"] > 0)
    # the random subset's budget is GEKO's rollout-token share of full GRPO on the same seed
    for seed in (0, 1):
        by = {r["policy"]: r for r in runs if r["seed"] == seed}
        assert by["random_subset"]["budget"] == pytest.approx(min(1.0, by["geko"]["rollout_tokens"] / by["full"]["rollout_tokens"]))
    rows = summarise(runs, SCALES["smoke"].num_validation)
    assert [r["policy"] for r in rows] == ["full", "geko", "dynamic", "random_subset"]
    assert rows[3]["rollout_tokens_vs_full"]["seeds"] == [0, 1]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_rl_outputs(Path(tmp), runs, rows, {"scale": "smoke"})
        assert [p.name for p in paths] == ["rl-algo.json", "rl-algo_test_exact_vs_rollout_tokens.png", "rl-algo_validation_exact_vs_rollout_tokens.png"]
        assert all(p.stat().st_size > 0 for p in paths)


def test_matched_steps_keep_full_grpos_steps_and_shrink_each_rollout():
    """``matched_steps``: a policy planning a share of the prompts rolls out that share of a
    batch each step, so an epoch has full GRPO's number of steps; a filtering policy is left
    as it is."""
    cfg = SCALES["smoke"]
    data = load_data(cfg)
    steps = {}
    for name, matched in (("full", False), ("random_subset", True), ("random_subset", False)):
        model = TinyLM(PROMPT_LEN + MAX_ANSWER, cfg.width, cfg.layers, cfg.heads)
        model.load_state_dict(warm_start(cfg, 0))
        policy = make_policy(name, len(data.train), 0, epochs=cfg.epochs, budget=0.5)
        counters, _ = grpo_train(model, data, policy, cfg.with_(matched_steps=matched), 0)
        steps[name, matched] = counters
    full, matched, plain = steps["full", False], steps["random_subset", True], steps["random_subset", False]
    per_epoch = cfg.num_train // cfg.batch_prompts
    assert matched.groups == plain.groups == cfg.epochs * cfg.num_train // 2  # the same prompts rolled out
    assert plain.steps <= cfg.epochs * per_epoch // 2 + cfg.epochs
    # every draw holds half a batch: full GRPO's step count, less the steps whose groups were all flat
    assert matched.steps <= cfg.epochs * per_epoch and full.steps <= cfg.epochs * per_epoch
    assert matched.steps > plain.steps


def test_geko_bench_rl_late_runs_the_late_scale_with_matched_steps(tmp_path):
    """``geko-bench --tasks rl-late`` runs the late-RL scale (matched steps; GEKO and the random
    subset fill their batches) and writes its own JSON and plots."""
    import json

    from geko_core.bench import main as bench_main

    code = bench_main(["--smoke", "--tasks", "rl-late", "--rl-policies", "full,random_subset", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rl-late.json", "rl-late_test_exact_vs_rollout_tokens.png", "rl-late_validation_exact_vs_rollout_tokens.png",
    ]
    saved = json.loads((tmp_path / "rl-late.json").read_text())
    assert saved["meta"]["task"] == "rl-late" and saved["meta"]["scale"] == "late-smoke"
    assert saved["meta"]["config"]["matched_steps"] is True
    runs = {r["policy"]: r for r in saved["runs"]}
    assert set(runs) == {"full", "random_subset"} and all(r["matched_steps"] for r in runs.values())
    assert runs["random_subset"]["fill"] is True and runs["full"]["fill"] is False
    assert runs["random_subset"]["rollouts"] < runs["full"]["rollouts"]
