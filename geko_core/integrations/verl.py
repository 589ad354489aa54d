"""verl integration: :class:`GekoCurriculumSampler`, prompt selection for verl's PPO/GRPO trainer
through its curriculum-sampler hook, backed by a :class:`~geko_core.Selector` in rewards mode.

verl builds the sampler itself from two configuration lines, then calls ``update(batch)`` after
every training step with the step's rolled-out, scored batch::

    data.sampler.class_path=pkg://geko_core.integrations.verl
    data.sampler.class_name=GekoCurriculumSampler
    data.dataloader_num_workers=0                 # verl requires it for a curriculum sampler
    trainer.total_training_steps=2000             # end by steps: skipping shortens epochs
    trainer.total_epochs=1000
    +data.sampler.policy=greso                    # any rewards-mode policy name
    +data.sampler.total_steps='${trainer.total_training_steps}'

The hook (``verl.experimental.dataset.sampler.AbstractCurriculumSampler`` and
``data.sampler.class_path``) exists in verl 0.5.0 to 0.7.1; verl 0.8.0 removed both (its v1
trainer's ``trainer.v1.sampler.custom_sampler`` is a replay buffer over rolled-out
trajectories, not a prompt sampler). With verl 0.8 or later, or without verl, the class is a
plain ``torch.utils.data.Sampler`` with the same methods: a loop of one's own (or a trainer
given ``train_sampler=``) draws from it and calls :meth:`GekoCurriculumSampler.update` itself.
No GPU run of verl was possible where this was written: it is tested on CPU against verl's own
classes with hand-made ``DataProto`` batches (``tests/test_verl.py``, ``docs/verl.md``).

What ``update(batch)`` reads
----------------------------
verl's trainer repeats each prompt ``actor_rollout_ref.rollout.n`` times, gives the G rollouts
of a prompt one ``uid`` (``non_tensor_batch["uid"]``), and may reorder the rows to balance the
ranks' tokens. The sampler groups the rows by ``uid``, takes each group's dataset index from
``non_tensor_batch[index_key]`` (``"index"``: verl's ``RLHFDataset`` copies each row's
``extra_info["index"]`` there; when the trainer has dropped ``index``, from ``extra_info``), its rewards from ``batch.batch[reward_key].sum(-1)``
(``"token_level_scores"``: the reward function's score, before any KL penalty) and its
completion lengths from ``response_mask`` (or the response part of ``attention_mask``), puts
the groups in the order it yielded the prompts and calls ``selector.observe_rewards``. With an
``RLHFDataset`` the index values are mapped to dataset rows through its ``extra_info`` column,
so rows dropped by ``filter_overlong_prompts`` or ``train_max_samples`` are handled; any other
dataset must put the row number itself under ``index_key``. A batch whose prompts are not the
ones the sampler yielded since the last update is refused (ValueError) and changes nothing.

Resume
------
verl checkpoints the sampler with its ``StatefulDataLoader`` (``data.pt``): the state holds the
Selector's whole state, the sampler's iteration and the prompts drawn but not yet reported.
verl saves a step's checkpoint *before* it calls ``update`` for that step, so a state saved by
verl holds that step's prompts as drawn and unreported; loading it counts them as trained
without statistics (the plan's position and the step count move past them), so the resumed run
finishes the epoch's plan as an uninterrupted one does; only that one step's rewards are
missing from the table (and from later plans that read it). A state saved after ``update`` (by
a loop of one's own) resumes exactly.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ._common import flat_metrics, from_storable, to_storable

try:  # verl 0.5.0-0.7.1; importing it imports verl (DataProto), never done by `import geko_core`
    from verl.experimental.dataset.sampler import AbstractCurriculumSampler as _SamplerBase

    VERL_HOOK = True
except ModuleNotFoundError:  # no verl, or verl >= 0.8.0 (no curriculum hook)
    from torch.utils.data import Sampler as _SamplerBase

    VERL_HOOK = False

__all__ = ["GekoCurriculumSampler", "VERL_HOOK"]

#: Version of :meth:`GekoCurriculumSampler.state_dict`'s layout.
STATE_FORMAT = 1

#: The ``data.sampler`` keys the sampler reads besides verl's own ``class_path``/``class_name``.
_OPTIONS = {
    "class_path", "class_name", "policy", "policy_options", "seed", "epochs", "total_steps",
    "reward_key", "index_key", "rollout_config", "selector_options",
}


def _plain(value: Any) -> Any:
    """An OmegaConf node (verl's config) as plain Python containers; anything else as is."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ModuleNotFoundError:
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _row_keys(data_source: Any, index_key: str) -> np.ndarray | None:
    """The ``index_key`` value verl's ``RLHFDataset`` puts in the batch for each dataset row,
    or None for another dataset (whose rows must carry their own row number)."""
    frame = getattr(data_source, "dataframe", None)
    if frame is None or not hasattr(frame, "column_names"):
        return None
    if index_key == "index":
        if "extra_info" not in frame.column_names:
            raise ValueError(
                "the dataset's rows have no extra_info column: verl puts extra_info['index'] in the batch as "
                "'index', which the sampler needs to know each prompt's row; give every row a distinct "
                "extra_info.index (verl's example preprocessors write the row number)"
            )
        values = [(info or {}).get("index", 0) for info in frame["extra_info"]]
    elif index_key in frame.column_names:
        values = list(frame[index_key])
    else:
        raise ValueError(f"the dataset has no column {index_key!r} (data.sampler.index_key)")
    keys = np.asarray(values)
    if keys.ndim != 1 or len(np.unique(keys)) != len(keys):
        raise ValueError(
            f"the dataset's {index_key!r} values are not distinct, so a batch's prompts cannot be told apart: "
            "give every row a distinct extra_info.index"
        )
    return keys


class GekoCurriculumSampler(_SamplerBase):
    """verl's curriculum sampler backed by a rewards-mode :class:`~geko_core.Selector`.

    Built by verl as ``cls(data_source=dataset, data_config=config.data)``. Options are read
    from ``data_config.sampler`` (add them with ``+data.sampler.<key>=...`` on verl's command
    line, or in its YAML):

    ``policy`` (``"geko"``), ``policy_options`` (dict), ``seed`` (``data.seed``, else 0),
    ``epochs`` or ``total_steps`` (exactly one; ``'${trainer.total_epochs}'`` or
    ``'${trainer.total_training_steps}'``), ``reward_key`` (``"token_level_scores"``),
    ``index_key`` (``"index"``), ``rollout_config`` (dict of
    :class:`~geko_core.rollouts.RolloutConfig` fields, e.g. ``right_at`` for graded rewards),
    ``selector_options`` (dict of further :class:`~geko_core.Selector` keyword arguments).

    Epochs are planned in whole batches of ``data.gen_batch_size`` (else
    ``data.train_batch_size``) prompts, as verl's loader drops an incomplete last batch. The
    sampler runs in verl's driver process (one replica: verl shards the rolled-out batch, not
    the prompts). Policies that need the trainer to draw again after filtering groups
    (``dynamic``) are refused: verl's trainer draws one batch per step (its DAPO recipe does
    dynamic sampling itself).

    Args:
        data_source: the training dataset (its length is the number of prompts).
        data_config: verl's ``config.data`` (an OmegaConf ``DictConfig`` or a plain mapping).
    """

    def __init__(self, data_source: Any, data_config: Any) -> None:
        from ..selector import Selector

        data = _plain(data_config)
        if not isinstance(data, Mapping):
            raise TypeError(f"data_config must be verl's data config (a mapping), got {type(data_config).__name__}")
        options = _plain(data.get("sampler") or {})
        if not isinstance(options, Mapping):
            raise TypeError(f"data_config.sampler must be a mapping, got {type(options).__name__}")
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown data.sampler option(s) {unknown}; known: {sorted(_OPTIONS - {'class_path', 'class_name'})}")
        epochs, total_steps = options.get("epochs"), options.get("total_steps")
        if (epochs is None) == (total_steps is None):
            raise ValueError(
                "give exactly one of data.sampler.epochs or data.sampler.total_steps, e.g. "
                "+data.sampler.epochs='${trainer.total_epochs}'"
            )
        batch_size = data.get("gen_batch_size") or data.get("train_batch_size")
        if batch_size is None:
            raise ValueError("data_config has neither gen_batch_size nor train_batch_size")
        seed = options.get("seed")
        if seed is None:
            seed = data.get("seed")
        self.reward_key = str(options.get("reward_key") or "token_level_scores")
        self.index_key = str(options.get("index_key") or "index")
        self.num_samples = len(data_source)
        extra = dict(options.get("selector_options") or {})
        if options.get("rollout_config"):
            from ..rollouts import RolloutConfig

            if "config" in extra:
                raise ValueError("give data.sampler.rollout_config or selector_options.config, not both")
            extra["config"] = RolloutConfig(**dict(options["rollout_config"]))
        self.selector = Selector(
            self.num_samples,
            options.get("policy") or "geko",
            signal="rewards",
            epochs=epochs,
            total_steps=total_steps,
            seed=0 if seed is None else seed,
            policy_options=dict(options.get("policy_options") or {}),
            num_replicas=1,
            rank=0,
            batch_size=batch_size,
            drop_last=True,
            **extra,
        )
        if getattr(self.selector.policy, "filter_groups", False):
            raise ValueError(
                f"policy {self.selector.policy.name!r} needs a trainer that draws more prompts after dropping "
                "zero-variance groups; verl's trainer draws one batch per step (its DAPO recipe filters groups itself)"
            )
        self._keys = _row_keys(data_source, self.index_key)
        self._pending: list[int] = []  # prompts yielded since the last update, in order

    # -- sampling -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.selector.sampler)

    def __iter__(self) -> Iterator[int]:
        for index in self.selector.sampler:
            self._pending.append(int(index))  # update() replaces the list: look it up each time
            yield index

    # -- rewards ------------------------------------------------------------------------------
    def update(self, batch: Any) -> Any:
        """Report a trained step's batch (a verl ``DataProto``) to the Selector.

        Returns the per-prompt :class:`~geko_core.rollouts.RolloutStats` in the order the
        prompts were yielded (verl ignores it). Raises ValueError/TypeError/KeyError, changing
        nothing, when the batch is malformed or does not hold exactly the prompts yielded since
        the last update.
        """
        indices, rewards, lengths = self._extract(batch)
        stats = self.selector.observe_rewards(indices, rewards, lengths)
        self._pending = []
        return stats

    def _extract(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(indices [B], rewards [B, G], lengths [B, G] or None)`` of a batch, in yield order."""
        tensors, extra = getattr(batch, "batch", None), getattr(batch, "non_tensor_batch", None)
        if tensors is None or not isinstance(extra, Mapping):
            raise TypeError(f"update() takes verl's DataProto (with .batch and .non_tensor_batch), got {type(batch).__name__}")
        for key, where in (("uid", extra), (self.reward_key, tensors)):
            if key not in where.keys():
                raise KeyError(f"the batch has no {key!r} field (have {sorted(where.keys())})")
        uids = np.asarray(extra["uid"])
        keys = self._batch_keys(extra)
        scores = tensors[self.reward_key]
        if not isinstance(scores, torch.Tensor) or scores.ndim not in (1, 2):
            raise ValueError(f"batch[{self.reward_key!r}] must be a [R] or [R, T] tensor")
        rows = len(uids)
        if len(keys) != rows or scores.shape[0] != rows:
            raise ValueError(f"the batch's uid ({rows}), {self.index_key} ({len(keys)}) and rewards ({scores.shape[0]}) rows differ")
        rewards = (scores.sum(-1) if scores.ndim == 2 else scores).detach().to("cpu", torch.float32).numpy()
        lengths = self._lengths(tensors, rows)

        _, first, group_of = np.unique(uids, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # groups in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        group_of = rank[group_of.reshape(-1)]
        sizes = np.bincount(group_of)
        if len(sizes) == 0 or sizes.min() != sizes.max():
            raise ValueError(f"every uid must have the same number of rollouts (rollout.n); got group sizes {sorted(set(sizes.tolist()))}")
        size = int(sizes[0])
        members = np.argsort(group_of, kind="stable").reshape(len(sizes), size)  # rows of each group, batch order
        group_keys = keys[members[:, 0]]
        if np.any(keys[members] != group_keys[:, None]):
            raise ValueError(f"the rollouts of one uid carry different {self.index_key!r} values")

        pending = np.asarray(self._pending, dtype=np.int64)
        if len(pending) != len(sizes):
            raise ValueError(
                f"the batch holds {len(sizes)} prompts but the sampler yielded {len(pending)} since the last update: "
                "update() must be called once per drawn batch with all of its prompts"
            )
        expected = pending if self._keys is None else self._keys[pending]
        by_key: dict[Any, list[int]] = {}
        for group, key in enumerate(group_keys.tolist()):
            by_key.setdefault(key, []).append(group)
        picked = np.empty(len(pending), dtype=np.int64)
        for slot, key in enumerate(expected.tolist()):
            groups = by_key.get(key)
            if not groups:
                raise ValueError(
                    f"the batch has no prompt with {self.index_key}={key!r}, which the sampler yielded (dataset row "
                    f"{int(pending[slot])}); the batch's {self.index_key} values must identify the dataset rows"
                )
            picked[slot] = groups.pop(0)
        rows_of = members[picked]
        return pending, rewards[rows_of], None if lengths is None else lengths[rows_of]

    def _batch_keys(self, extra: Mapping) -> np.ndarray:
        """Each row's ``index_key`` value. verl 0.7.1 moves ``index`` into the generation batch
        and gets it back only when the rewards are not computed by its reward-loop workers;
        ``extra_info`` (where ``RLHFDataset`` takes ``index`` from) always stays."""
        if self.index_key in extra.keys():
            return np.asarray(extra[self.index_key])
        if self.index_key == "index" and "extra_info" in extra.keys():
            return np.array([(info or {}).get("index", 0) for info in extra["extra_info"]], dtype=object)
        raise KeyError(f"the batch has no {self.index_key!r} field (have {sorted(extra.keys())})")

    @staticmethod
    def _lengths(tensors: Any, rows: int) -> np.ndarray | None:
        """Completion tokens of each rollout: ``response_mask``'s sum, else the response part of
        ``attention_mask``; None when the batch has neither."""
        keys = tensors.keys()
        if "response_mask" in keys:
            mask = tensors["response_mask"]
        elif "responses" in keys and "attention_mask" in keys:
            mask = tensors["attention_mask"][:, -tensors["responses"].shape[-1] :]
        else:
            return None
        if mask.shape[0] != rows:
            raise ValueError("the batch's response mask and rewards have different row counts")
        return mask.sum(-1).detach().to("cpu", torch.float32).numpy()

    # -- reporting ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """``selector.metrics()`` as flat ``geko/...`` numbers, for a logger."""
        return flat_metrics(self.selector.metrics(), numeric_only=True)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The Selector's state (tensors and numbers: ``torch.load(weights_only=True)`` reads
        it), the sampler's iteration and the prompts yielded but not yet reported."""
        return {
            "format": STATE_FORMAT,
            "selector": to_storable(self.selector.state_dict()),
            "iteration": self.selector.sampler.state_dict(),
            "pending": list(self._pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; prompts it holds as drawn but unreported (verl saves
        before it reports a step) count as trained without statistics. Refuses a malformed or
        mismatched state and then changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"sampler state must be a dict, got {type(state).__name__}")
        try:
            fmt, selector_state, iteration, pending = state["format"], state["selector"], state["iteration"], state["pending"]
        except KeyError as exc:
            raise ValueError(f"sampler state is missing {exc}") from None
        if fmt != STATE_FORMAT:
            raise ValueError(f"sampler state has format {fmt!r}; this version reads {STATE_FORMAT}")
        selector_state = copy.deepcopy(from_storable(selector_state))
        pending = [int(i) for i in pending]
        if pending:
            self._skip_unreported(selector_state, pending)
        before = self.selector.state_dict()
        self.selector.load_state_dict(selector_state)
        try:
            self.selector.sampler.load_state_dict(iteration)
        except Exception:
            self.selector.load_state_dict(before)
            raise
        self._pending = []

    @staticmethod
    def _skip_unreported(state: dict[str, Any], pending: list[int]) -> None:
        """Move a Selector state's trained position and step past the prompts drawn at its
        save and never reported (checked to be the plan's next entries)."""
        plan = state.get("epoch_plan")
        if not isinstance(plan, dict):
            raise ValueError("sampler state holds unreported prompts but its Selector state has no started epoch")
        at = int(plan["position"])
        planned = np.asarray(plan["indices"])[at : at + len(pending)]
        if not np.array_equal(planned, np.asarray(pending, dtype=planned.dtype)):
            raise ValueError("sampler state's unreported prompts are not the plan's next entries")
        plan["position"] = at + len(pending)
        if not state.get("explicit_steps", False):
            state["step"] = int(state["step"]) + 1
