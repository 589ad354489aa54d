"""The fine-tuning tasks of geko-bench (geko_core/bench/sft.py, sft_data.py, pretrain.py): data,
masks, splits, metrics, the pre-training cache, and the validation splits of every task. Smoke
scale, CPU, one thread."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geko_core.bench import pretrain, sft, sft_data
from geko_core.bench.data import load_checked, make_stdlib_text
from geko_core.bench.base import ByteLM
from geko_core.bench.tasks import TASK_NAMES, make_task

TINY_PRETRAIN = pretrain.PretrainConfig(seq_len=16, width=16, layers=1, heads=2, steps=3, batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def _algo(seed=0):
    return sft_data.make_algo_sft(160, 48, 64, seed=seed)


def _stdlib(seed=0):
    return sft_data.make_stdlib_sft(100, 40, 40, seq_len=48, seed=seed)


def _splits(data):
    return {"train": data.train, "validation": data.validation, "test": data.test}


def test_generation_is_deterministic_in_the_seed():
    for make in (_algo, _stdlib):
        a, b, other = make(0), make(0), make(1)
        for name in ("train", "validation", "test"):
            x, y = _splits(a)[name], _splits(b)[name]
            assert np.array_equal(x.inputs, y.inputs) and np.array_equal(x.labels, y.labels)
            assert np.array_equal(x.family, y.family) and x.text == y.text
        assert not np.array_equal(a.train.inputs, other.train.inputs)


@pytest.mark.parametrize("make", [_algo, _stdlib], ids=["algo", "stdlib"])
def test_labels_are_the_response_and_minus_100_elsewhere(make):
    data = make()
    for split in _splits(data).values():
        assert split.inputs.dtype == np.int64 and split.labels.dtype == np.int64
        assert split.inputs.shape == split.labels.shape == (len(split), data.seq_len)
        for i, (prompt, response) in enumerate(split.text):
            start, end = len(prompt), len(prompt) + len(response)
            assert split.prompt_len[i] == start
            assert bytes(split.inputs[i, :end].astype(np.uint8)) == (prompt + response).encode()
            assert (split.inputs[i, end:] == sft_data.PAD).all()
            assert (split.labels[i, :start] == -100).all() and (split.labels[i, end:] == -100).all()
            assert np.array_equal(split.labels[i, start:end], split.inputs[i, start:end])
        assert np.array_equal(split.response_tokens, [len(r) for _, r in split.text])


def test_family_ids_match_the_prompts():
    algo = _algo()
    for split in _splits(algo).values():
        assert [p.split(" ")[0] for p, _ in split.text] == [algo.families[f] for f in split.family]
        assert np.bincount(split.family, minlength=len(algo.families)).min() >= len(split) // len(algo.families)
    marker = {"private": "# private:", "kind": "# kind:", "count": "# parameters:", "defname": "# name:"}
    stdlib = _stdlib()
    for split in _splits(stdlib).values():
        for (prompt, response), f in zip(split.text, split.family):
            family = stdlib.families[f]
            if family == "docname":
                assert prompt.startswith("# ") and prompt.endswith("\ndef ") and response.endswith("(")
            else:
                assert prompt.startswith("def ") and prompt.endswith(marker[family])
        for family in ("private", "kind"):  # two-answer families are balanced
            answers = [r for (_, r), f in zip(split.text, split.family) if stdlib.families[f] == family]
            assert abs(2 * answers.count(answers[0]) - len(answers)) <= 1


@pytest.mark.parametrize("make", [_algo, _stdlib], ids=["algo", "stdlib"])
def test_validation_is_disjoint_from_train_and_test(make):
    data = make()
    prompts = {name: {(int(f), p) for (p, _), f in zip(s.text, s.family)} for name, s in _splits(data).items()}
    assert len(prompts["validation"]) == len(data.validation)  # no repeats inside a split either
    assert not prompts["validation"] & prompts["train"]
    assert not prompts["validation"] & prompts["test"]
    assert not prompts["test"] & prompts["train"]


def test_stdlib_splits_follow_files():
    records = sft_data._function_records()
    assert {r["split"] for r in records} == {"train", "validation", "test"}
    # the test files are stdlib-lm's held-out files; validation files are taken from its training files
    root = sft_data._stdlib_root()
    splits = [sft_data._file_split(path.relative_to(root).as_posix()) for path in sft_data._stdlib_files()]
    text = make_stdlib_text(8, 8, seq_len=16)
    assert splits.count("test") == text.num_test_files
    assert splits.count("train") + splits.count("validation") == text.num_train_files
    assert 0.05 < splits.count("validation") / len(splits) < 0.15
    stdlib = _stdlib()
    names_by_split = {s: {r["name"] for r in records if r["split"] == s} for s in ("train", "validation", "test")}
    for prompt, response in stdlib.test.text:
        if prompt.startswith("def "):
            assert prompt[4 : prompt.index("(")] in names_by_split["test"]


def _greedy_exact_match(model, split, families):
    """Brute force: decode each response greedily from its prompt, one token at a time."""
    exact, nll = [], []
    with torch.no_grad():
        for (prompt, response), start in zip(split.text, split.prompt_len):
            tokens = list(prompt.encode())
            target = list(response.encode())
            produced, loss = [], 0.0
            for t, want in enumerate(target):
                context = torch.tensor([tokens + target[:t]])  # teacher forcing for the loss
                logits = model(context)[0, -1]
                loss -= float(torch.log_softmax(logits.double(), -1)[want])
                greedy = torch.tensor([tokens + produced])
                produced.append(int(model(greedy)[0, -1].argmax()))
            exact.append(produced == target)
            nll.append(loss)
    return np.array(exact), np.array(nll)


def test_exact_match_and_perplexity_equal_a_brute_force_reference():
    data = sft_data.make_algo_sft(200, 48, 48, seed=0)
    torch.manual_seed(0)
    model = ByteLM(data.seq_len, width=32, layers=1)
    torch.nn.init.normal_(model.position, std=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(data.train.inputs), torch.from_numpy(data.train.labels)
    for step in range(80):  # enough for the easy families to come out right
        idx = torch.randint(0, len(x), (32,))
        logits = model(x[idx])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), y[idx, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    got = sft.response_metrics(model, data.test, data.families, batch_size=7)
    exact, nll = _greedy_exact_match(model, data.test, data.families)
    assert 0 < exact.sum() < len(exact)  # the comparison means something
    assert got["exact_match_%"] == pytest.approx(100 * exact.mean())
    tokens = data.test.response_tokens
    assert got["perplexity"] == pytest.approx(math.exp(nll.sum() / tokens.sum()), rel=1e-4)
    for f, name in enumerate(data.families):
        mask = data.test.family == f
        assert got["families"][name]["samples"] == mask.sum()
        assert got["families"][name]["exact_match_%"] == pytest.approx(100 * exact[mask].mean())
        assert got["families"][name]["perplexity"] == pytest.approx(math.exp(nll[mask].sum() / tokens[mask].sum()), rel=1e-4)
    assert not model.training  # response_metrics restores the mode it found


def test_pretrained_model_is_cached_and_a_damaged_cache_is_rebuilt(monkeypatch):
    calls = []
    real = pretrain._pretrain
    monkeypatch.setattr(pretrain, "_pretrain", lambda config, progress: calls.append(config) or real(config, progress))

    first = pretrain.pretrained_stdlib_lm(TINY_PRETRAIN, progress=False)
    path = pretrain.cache_dir() / f"stdlib_lm_{TINY_PRETRAIN.key()}.pt.ck"
    assert len(calls) == 1 and path.exists() and load_checked(path) is not None
    again = pretrain.pretrained_stdlib_lm(TINY_PRETRAIN, progress=False)
    assert len(calls) == 1  # read from the cache, not trained again
    assert all(torch.equal(first[k], again[k]) for k in first)

    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.warns(RuntimeWarning, match="damaged"):
        rebuilt = pretrain.pretrained_stdlib_lm(TINY_PRETRAIN, progress=False)
    assert len(calls) == 2 and load_checked(path) is not None
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)  # pre-training is deterministic

    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="damaged"):
        pretrain.pretrained_stdlib_lm(TINY_PRETRAIN, progress=False)
    assert len(calls) == 3

    other = pretrain.PretrainConfig(**{**TINY_PRETRAIN.__dict__, "steps": 2})
    assert other.key() != TINY_PRETRAIN.key()


def test_pretraining_shows_progress_on_request(capsys):
    pretrain.pretrained_stdlib_lm(TINY_PRETRAIN, progress=True)
    err = capsys.readouterr().err
    assert "pre-training" in err and f"step {TINY_PRETRAIN.steps}/{TINY_PRETRAIN.steps}" in err


@pytest.mark.parametrize("name", ["sft-algo", "sft-stdlib"])
def test_fine_tuning_tasks_are_registered(name):
    task = make_task(name, "smoke")
    assert task.name == name and task.shift and task.higher_is_better
    assert task.metric_name == "exact_match_%"
    assert task.inputs.shape == task.targets.shape and task.inputs.dtype == torch.int64
    assert task.family.shape == (task.num_samples,) and int(task.family.max()) == len(task.families) - 1
    assert ((task.targets != -100).sum(1) > 0).all() and (task.targets[:, 0] == -100).all()
    model = task.make_model(0)
    test = task.evaluate(model)
    detail = task.evaluate_detail(model, "test")
    assert detail["exact_match_%"] == test and set(detail["families"]) == set(task.families)
    assert 0.0 <= task.evaluate_validation(model) <= 100.0
    assert detail["perplexity"] > 1.0
    with pytest.raises(ValueError, match="split"):
        task.evaluate_detail(model, "train")


def test_unknown_task_lists_every_name():
    with pytest.raises(ValueError) as raised:
        make_task("sft-nope", "smoke")
    assert all(name in str(raised.value) for name in TASK_NAMES)


def test_stdlib_lm_validation_leaves_train_and_test_unchanged():
    plain = make_stdlib_text(64, 16, seq_len=32)
    with_validation = make_stdlib_text(64, 16, seq_len=32, num_validation=16)
    assert np.array_equal(plain.train, with_validation.train) and np.array_equal(plain.test, with_validation.test)
    assert plain.validation is None and with_validation.validation.shape == (16, 33)
    train = {row.tobytes() for row in with_validation.train}
    assert not any(row.tobytes() in train for row in with_validation.validation)
    task = make_task("stdlib-lm", "smoke")
    assert task.evaluate_validation is not None and task.evaluate_validation(task.make_model(0)) > 1.0


def test_mnist1d_validation_is_fresh_and_clean():
    pytest.importorskip("mnist1d")
    from geko_core.bench.data import make_mnist1d

    task = make_task("mnist1d", "smoke")
    data = make_mnist1d(2_000)
    assert torch.equal(task.inputs, torch.from_numpy(data.x_train))  # training data unchanged
    accuracy = task.evaluate_validation(task.make_model(0))
    assert 0.0 <= accuracy <= 100.0


def test_the_per_task_settings_are_those_docs_tuning_gives():
    """docs/tuning.md's table of recommended per-task settings names every option a task runs
    GEKO with (geko_core/bench/settings.py), with its value."""
    import re
    from pathlib import Path

    from geko_core.bench.settings import TASK_GEKO_OPTIONS

    text = (Path(__file__).resolve().parent.parent / "docs" / "tuning.md").read_text()
    section = text.split("## Recommended per-task settings", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in section.splitlines() if line.startswith("| `")}
    for name, options in TASK_GEKO_OPTIONS.items():
        written = dict(re.findall(r"(\w+)=([\w.\"]+)", rows[f"`{name}`"]))
        assert {k: _json_value(v) for k, v in written.items()} == options, name
    for name in ("sft-algo", "sft-stdlib"):
        assert make_task(name, "smoke").policy_options["geko"] == TASK_GEKO_OPTIONS[name]
    assert make_task("stdlib-lm", "smoke").policy_options["geko"] == TASK_GEKO_OPTIONS["stdlib-lm"]


def _json_value(text):
    """``2`` -> 2, ``0.6`` -> 0.6, ``"tokens"`` -> "tokens"."""
    import json

    return json.loads(text)
