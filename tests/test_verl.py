"""GekoCurriculumSampler against verl's own interface: built by verl's ``create_rl_sampler`` from
its ``data.sampler.class_path`` lines, fed by the same ``StatefulDataLoader`` and collate
function verl's trainer uses, and updated with hand-made ``DataProto`` batches shaped as verl's
GRPO step leaves them (prompts repeated n times with one ``uid`` each, rows reordered as the
token balancing does, ``token_level_scores`` and ``response_mask``). No model, no Ray, no GPU.

verl is not in the main test environment (it pins transformers<5.11; the ``hf`` extra asks
>=5.23): these tests skip there and run in the environment ``.ci/run`` makes for verl.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch


def test_import_geko_core_does_not_import_verl():
    code = "import sys, geko_core, geko_core.integrations; print('verl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


try:
    from verl.experimental.dataset.sampler import AbstractCurriculumSampler
except ModuleNotFoundError:
    AbstractCurriculumSampler = None

needs_verl = pytest.mark.skipif(
    AbstractCurriculumSampler is None,
    reason="verl with its curriculum-sampler hook (0.5.0-0.7.1) is not installed; .ci/run runs this file in a verl environment",
)
pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning"),  # torchdata 0.11 on torch 2.13
    pytest.mark.filterwarnings("ignore:Ray state API is no longer experimental:DeprecationWarning"),  # verl 0.7.1's import
]

N, BATCH, G, T = 24, 4, 4, 6
STEPS = 16  # trainer.total_training_steps


# -- data shaped as verl's RLHFDataset yields it --------------------------------------------------
def key_of(row: int) -> int:
    """A data index that is not the row number (as after filtering rows)."""
    return 1000 + (row * 7) % N


class Prompts(torch.utils.data.Dataset):
    """Items as ``RLHFDataset.__getitem__`` returns them; with ``frame=True`` it also has the
    ``dataframe`` (an HF dataset with ``extra_info``) the sampler maps data indices through."""

    def __init__(self, frame: bool) -> None:
        self.keys = [key_of(r) if frame else r for r in range(N)]
        if frame:
            import datasets

            self.dataframe = datasets.Dataset.from_dict({"extra_info": [{"index": k, "split": "train"} for k in self.keys]})

    def __len__(self) -> int:
        return N

    def __getitem__(self, row: int) -> dict:
        ids = torch.full((3,), row, dtype=torch.long)
        key = self.keys[row]
        return {
            "input_ids": ids, "attention_mask": torch.ones(3, dtype=torch.long), "index": key,
            "data_source": "toy", "extra_info": {"index": key, "split": "train"},
        }


def reward(row: int, j: int) -> float:
    """Rows 0 mod 3 always right, 1 mod 3 always wrong, the rest half right."""
    return 1.0 if row % 3 == 0 else 0.0 if row % 3 == 1 else float(j % 2)


def grpo_batch(batch_dict: dict, rows_of_keys: dict, step: int):
    """The DataProto verl's trainer hands to ``sampler.update``: uids, repeat(n, interleave),
    responses with their mask, the score on each response's last token, rows shuffled; on odd
    steps without ``index``."""
    from verl import DataProto

    batch = DataProto.from_single_dict(batch_dict)
    batch.non_tensor_batch["uid"] = np.array([f"s{step}-p{i}" for i in range(len(batch))], dtype=object)
    batch = batch.repeat(repeat_times=G, interleave=True)
    rows = np.array([rows_of_keys[k] for k in batch.non_tensor_batch["index"]])
    j = np.tile(np.arange(G), len(rows) // G)
    length = torch.as_tensor(1 + (rows + j) % T)
    mask = (torch.arange(T)[None, :] < length[:, None]).long()
    scores = torch.zeros(len(rows), T)
    scores[torch.arange(len(rows)), length - 1] = torch.tensor([reward(r, jj) for r, jj in zip(rows, j)])
    batch.batch["responses"] = torch.zeros(len(rows), T, dtype=torch.long)
    batch.batch["response_mask"] = mask
    batch.batch["attention_mask"] = torch.cat([batch.batch["attention_mask"], mask], dim=1)
    batch.batch["token_level_scores"] = scores
    batch.reorder(torch.randperm(len(rows), generator=torch.Generator().manual_seed(step)))
    if step % 2:  # verl 0.7.1 loses "index" when its reward-loop workers score; extra_info stays
        batch.non_tensor_batch.pop("index")
    return batch


def data_config(**sampler):
    """verl's ``config.data`` with the lines docs/verl.md gives (the run's length by interpolation)."""
    from omegaconf import OmegaConf

    options = {
        "class_path": "pkg://geko_core.integrations.verl", "class_name": "GekoCurriculumSampler",
        "total_steps": "${trainer.total_training_steps}", **sampler,
    }
    options = {k: v for k, v in options.items() if v is not None}
    data = {"train_batch_size": BATCH, "gen_batch_size": None, "dataloader_num_workers": 0, "shuffle": True, "seed": 3, "sampler": options}
    trainer = {"total_epochs": 100, "total_training_steps": STEPS}
    return OmegaConf.create({"trainer": trainer, "data": data}).data


def make_sampler(dataset, **options):
    from verl.trainer.main_ppo import create_rl_sampler

    return create_rl_sampler(data_config(**options), dataset)


def spy(sampler) -> list:
    """Record every observe_rewards call of the sampler's Selector."""
    calls: list = []
    real = sampler.selector.observe_rewards

    def observe(idx, rewards, lengths=None):
        calls.append((np.array(idx), np.array(rewards), None if lengths is None else np.array(lengths)))
        return real(idx, rewards, lengths)

    sampler.selector.observe_rewards = observe
    return calls


def loader_for(dataset, sampler):
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.utils.dataset.rl_dataset import collate_fn

    return StatefulDataLoader(dataset, batch_size=BATCH, num_workers=0, drop_last=True, collate_fn=collate_fn, sampler=sampler)


def fit(sampler, loader, dataset, *, start_step=0, stop_at=None, save="before", total_epochs=100):
    """verl 0.7.1's ``RayPPOTrainer.fit`` loop around the sampler (its epoch count from
    ``global_steps // len(train_dataloader)``, its end at ``total_training_steps``): returns the
    drawn batches (dataset rows) and, with ``stop_at``, the loader state saved at that step
    (before ``update``, where verl saves, or after it)."""
    rows_of_keys = {k: r for r, k in enumerate(dataset.keys)}
    drawn, step, saved = [], start_step, None
    for _ in range(step // len(loader), total_epochs):
        for batch_dict in loader:
            step += 1
            drawn.append(sorted(rows_of_keys[k] for k in batch_dict["index"]))
            batch = grpo_batch(batch_dict, rows_of_keys, step)
            if step == stop_at and save == "before":
                saved = roundtrip(loader.state_dict())
            if isinstance(loader.sampler, AbstractCurriculumSampler):
                loader.sampler.update(batch=batch)
            if step == stop_at:
                if save == "after":
                    saved = roundtrip(loader.state_dict())
                return drawn, saved
            if step >= STEPS:
                return drawn, saved
    return drawn, saved


def roundtrip(state):
    """What verl's data.pt holds after torch.save/torch.load (weights_only: plain data only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- tests ------------------------------------------------------------------------------------------
@needs_verl
def test_verl_builds_it_from_the_config_lines():
    from geko_core.integrations.verl import VERL_HOOK, GekoCurriculumSampler

    sampler = make_sampler(Prompts(frame=True), policy="uniform")
    assert VERL_HOOK and isinstance(sampler, GekoCurriculumSampler) and isinstance(sampler, AbstractCurriculumSampler)
    selector = sampler.selector
    assert selector.batch_size == BATCH and selector.drop_last and selector.seed == 3 and selector.total_steps == STEPS
    by_epochs = make_sampler(Prompts(frame=True), total_steps=None, epochs="${trainer.total_epochs}")
    assert by_epochs.selector.epochs == 100 and by_epochs.selector.total_steps is None
    assert len(sampler) == N
    loader = loader_for(Prompts(frame=True), sampler)
    assert len(loader) == N // BATCH


@needs_verl
@pytest.mark.parametrize("frame", [True, False], ids=["rlhf_dataset", "row_numbers"])
def test_update_reads_indices_rewards_and_lengths_from_the_batch(frame):
    dataset = Prompts(frame=frame)
    sampler = make_sampler(dataset, policy="uniform")
    calls = spy(sampler)
    drawn, _ = fit(sampler, loader_for(dataset, sampler), dataset, total_epochs=1)
    assert len(calls) == len(drawn) == N // BATCH
    for (idx, rewards, lengths), rows in zip(calls, drawn):
        assert sorted(idx.tolist()) == rows and rewards.shape == (BATCH, G) and lengths.shape == (BATCH, G)
        for b, row in enumerate(idx.tolist()):  # each group's rewards and lengths are its own prompt's
            assert sorted(rewards[b].tolist()) == sorted(reward(row, j) for j in range(G))
            assert sorted(lengths[b].tolist()) == sorted(float(1 + (row + j) % T) for j in range(G))
    assert sorted(np.concatenate([c[0] for c in calls]).tolist()) == list(range(N))  # one epoch, every prompt once
    assert sampler.selector.step_count == N // BATCH
    assert sampler._pending == []
    metrics = sampler.metrics()
    assert metrics["geko/prompts"] == N and metrics["geko/rollouts"] == N * G
    assert metrics["geko/rollout_tokens"] == sum(int(c[2].sum()) for c in calls)


@needs_verl
def test_wrong_batches_are_refused_and_change_nothing():
    dataset = Prompts(frame=True)
    sampler = make_sampler(dataset, policy="uniform")
    rows_of_keys = {k: r for r, k in enumerate(dataset.keys)}
    loader = loader_for(dataset, sampler)
    batch_dict = next(iter(loader))
    batch = grpo_batch(batch_dict, rows_of_keys, 2)
    pending, step = list(sampler._pending), sampler.selector.step_count

    other = grpo_batch(next(iter(loader_for(dataset, make_sampler(dataset, policy="uniform", seed=99)))), rows_of_keys, 2)
    if sorted(other.non_tensor_batch["index"].tolist()) != sorted(batch.non_tensor_batch["index"].tolist()):
        with pytest.raises(ValueError, match="no prompt with index"):
            sampler.update(other)
    with pytest.raises(ValueError, match="same number of rollouts"):
        sampler.update(batch.select_idxs(np.arange(len(batch) - 1)))
    no_uid = batch.select_idxs(np.arange(len(batch)))
    no_uid.non_tensor_batch.pop("uid")
    with pytest.raises(KeyError, match="uid"):
        sampler.update(no_uid)
    with pytest.raises(TypeError, match="DataProto"):
        sampler.update({"uid": 1})
    assert sampler._pending == pending and sampler.selector.step_count == step
    sampler.update(batch)  # the right batch still goes through
    assert sampler._pending == [] and sampler.selector.step_count == step + 1
    with pytest.raises(ValueError, match="yielded 0"):
        sampler.update(batch)  # reported twice


@needs_verl
def test_config_errors_are_clear():
    dataset = Prompts(frame=True)
    with pytest.raises(ValueError, match="exactly one of data.sampler.epochs"):
        make_sampler(dataset, total_steps=None)
    with pytest.raises(ValueError, match="unknown data.sampler option"):
        make_sampler(dataset, polcy="geko")
    sampler = make_sampler(dataset, policy="geko", rollout_config={"right_at": 0.5})
    assert sampler.selector.config.right_at == 0.5
    with pytest.raises(TypeError):
        make_sampler(dataset, rollout_config={"right": 0.5})
    with pytest.raises(ValueError, match="draws more prompts"):
        make_sampler(dataset, policy="dynamic")
    from geko_core.integrations.verl import GekoCurriculumSampler

    with pytest.raises(TypeError, match="data_config"):
        GekoCurriculumSampler(dataset, 3)


@needs_verl
@pytest.mark.parametrize("stop", [8, 9])  # the end of epoch 1 under geko and greso, and inside a later one
@pytest.mark.parametrize("save", ["after", "before"])
@pytest.mark.parametrize("policy", ["uniform", "geko", "greso"])
def test_resume_through_the_loader_state(policy, save, stop):
    """Saved after the step's update, the resumed run is the uninterrupted one: same prompts,
    same table. verl saves data.pt *before* it reports the step: the resumed run finishes that
    epoch's plan exactly and only that step's visits are missing from the table."""
    dataset = Prompts(frame=True)
    sampler = make_sampler(dataset, policy=policy)
    full, _ = fit(sampler, loader_for(dataset, sampler), dataset)
    reference = sampler.selector
    assert len(full) == STEPS
    ends = np.cumsum([h["epoch_forwarded"] // BATCH for h in reference.history])
    epoch_end = int(ends[ends >= stop][0]) if (ends >= stop).any() else STEPS

    sampler = make_sampler(dataset, policy=policy)
    first, saved = fit(sampler, loader_for(dataset, sampler), dataset, stop_at=stop, save=save)
    assert len(first) == stop and saved is not None

    sampler = make_sampler(dataset, policy=policy)
    loader = loader_for(dataset, sampler)
    loader.load_state_dict(saved)
    rest, _ = fit(sampler, loader, dataset, start_step=stop)
    resumed = first + rest
    assert len(resumed) == STEPS and sampler.selector.step_count == reference.step_count
    table, expected = sampler.selector.table, reference.table
    if save == "after":
        assert resumed == full
        for name in ("visits", "last_step", "pass_ema", "flat_run"):
            np.testing.assert_array_equal(table.field(name), expected.field(name), err_msg=name)
    else:
        assert resumed[:epoch_end] == full[:epoch_end]
        if resumed == full:  # later plans may differ: they read the table
            missing = np.bincount(first[-1], minlength=N)
            np.testing.assert_array_equal(expected.field("visits").astype(np.int64) - table.field("visits"), missing)


@needs_verl
def test_state_is_checked():
    dataset = Prompts(frame=True)
    sampler = make_sampler(dataset, policy="uniform")
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="missing"):
        sampler.load_state_dict({"format": 1})
    with pytest.raises(ValueError, match="format"):
        sampler.load_state_dict({**state, "format": 7})
    with pytest.raises(ValueError, match="no started epoch"):
        sampler.load_state_dict({**state, "pending": [1, 2]})
    sampler.load_state_dict(state)
