"""TRL integration: :class:`GekoSFTTrainer`, TRL's ``SFTTrainer`` with the epochs, statistics,
importance weights, metrics and checkpointed state of a geko Selector.

    from trl import SFTConfig
    from geko_core.integrations.trl import GekoSFTTrainer

    trainer = GekoSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                             processing_class=tokenizer, geko_policy="geko")
    trainer.train()                      # resume_from_checkpoint=... continues exactly

RL with GRPO is :class:`~geko_core.integrations.trl_grpo.GekoGRPOTrainer` (documented in its
module, importable from here too).

It is :class:`~geko_core.integrations.hf.GekoTrainerMixin` on ``trl.SFTTrainer``: everything
the mixin documents for ``GekoTrainer`` (sampler, shorter epochs, learning-rate schedule
stretched over the shorter run, optimizer-step counting, ``geko/...`` metrics, one Selector
state file per checkpoint, exact resume, DDP through the Trainer's launcher) holds here
unchanged; this module only adds what SFT needs (DDP is tested through ``GekoTrainer``, not
here). Written against TRL 1.16 (``SFTTrainer._prepare_dataset`` and its ``_metrics``);
``pip install 'geko_core[trl]'``.

What is supported
-----------------
Datasets
    Everything ``SFTTrainer`` prepares itself from a map-style ``datasets.Dataset``: language
    modelling, prompt-completion and conversational data, or pre-tokenized ``input_ids``
    (with optional ``labels``). The Selector indexes the *prepared* training set,
    ``trainer.train_dataset`` (tokenized, truncated to ``max_length``, with the examples that
    truncation left without any counted token dropped, shuffled if ``shuffle_dataset``):
    index ``i`` is its ``i``-th row. Streaming (``IterableDataset``) training sets are refused:
    a Selector plans epochs over a dataset of known size.
Completion-only and assistant-only loss
    TRL turns ``completion_only_loss`` / ``assistant_only_loss`` into labels that are -100 on
    the prompt (and on everything that is not an assistant turn), so the per-sample statistics
    count exactly the tokens the loss counts. A batch that still carries a
    ``completion_mask`` or ``assistant_masks`` field (a custom collator) has it folded into
    the labels the same way TRL folds it (``completion_mask`` only with completion-only loss).
Packing (``packing=True``, strategy ``"bfd"``) and ``padding_free=True``
    TRL packs before training: best-fit-decreasing bins of whole examples, fixed once, and
    the packed rows keep no trace of which example they hold (``pack_dataset`` keeps only
    ``input_ids``, ``labels`` and the lengths). A Selector that skips samples cannot use fixed
    bins, and per-row statistics would score several examples as one. So here packing
    happens *after* selection: the training set is prepared unpacked (each example
    truncated to ``max_length``, as ``"bfd"`` truncates it), the Selector draws the epoch's
    samples, and TRL's padding-free collator concatenates each batch's samples into one row
    whose ``position_ids`` restart at every sample (block-diagonal attention: no sample sees
    another). The collator wrapper (:class:`GekoSFTCollator`) carries a per-token sample
    position, ``"geko_segment"``, through the batch; the loss and the statistics of the packed
    row come from :func:`geko_core.cross_entropy_with_stats` with ``segments=``, which scores
    each original sample as if it were alone (its dataset index is known), and each sample's
    importance weight scales the loss and gradient of its own tokens. Differences from TRL's packing:
    ``per_device_train_batch_size`` counts *samples* packed into one row (not rows of
    ``max_length`` tokens), so a row holds exactly the planned samples and its length varies;
    choose the batch size for the tokens per step you want (about ``max_length`` divided by
    the mean example length reproduces TRL's row size). ``eval_packing`` is untouched:
    evaluation sets are packed by TRL as usual.
Loss
    The model runs its ordinary forward (full logits) and the loss is geko's fused
    cross-entropy with importance weights, from the same pass as the statistics: with the
    ``uniform`` policy it is TRL's ``"nll"`` loss (same ``num_items_in_batch`` scaling under
    gradient accumulation and DDP). TRL's fused LM head (which never materialises the logits)
    is used only for evaluation: the statistics need the logits.
Metrics
    TRL's training metrics are those SFTTrainer logs, computed from the same statistics:
    ``entropy`` (the mean over the counted target tokens of the entropy, in nats, of the
    model's next-token distribution), ``mean_token_accuracy`` (the share of those tokens whose
    argmax is the target), both as token means over all ranks per micro-batch averaged over
    the logging interval, and ``num_tokens``. They stay on the device during training and are
    read, and summed over the ranks, only when the Trainer logs: no host synchronisation per
    step (the batch's dataset indices travel as a host array, ``"geko_index_host"``). Under
    DDP the ``geko/...`` counts and saved fractions are the run's (summed over the ranks). ``overhead_seconds`` counts the Selector's ``weights``/``observe_stats`` calls,
    not the fused loss, which replaces TRL's own. The Selector is given each example's
    counted target tokens (``sample_tokens``), so token budgets work and the metrics report
    ``saved_token_fraction``.
PEFT, precision, checkpointing
    ``peft_config=...`` or a ``PeftModel``, as with ``SFTTrainer``; ``SFTConfig``'s defaults
    ``bf16=True`` (autocast) and gradient checkpointing.

What is refused (``ValueError``: at construction where the configuration tells, else at the first batch)
----------------------------------------------------------------------------------------------------------
- ``packing_strategy="bfd_split"`` (an example longer than ``max_length`` would become several
  training rows, each scored as if it were the whole example) and ``"wrapped"`` (cuts examples
  anywhere and lets them attend to each other): use ``"bfd"``, which truncates.
- A training set that is already packed (a ``seq_lengths`` column, e.g. with
  ``skip_prepare_dataset``): pass the unpacked examples with ``packing=True``.
- A collator that puts several samples in one row without ``position_ids`` restarting at each
  one, or with an ``attention_mask`` (the samples would attend to each other), or in more than
  one row.
- ``loss_type="dft"``, ``label_smoothing_factor > 0``, ``compute_loss_func``, a mixture-of-experts
  router auxiliary loss (set ``router_aux_loss_coef=0.0``), context or sequence parallelism
  (the sequence is sharded, so no rank holds a sample's tokens).

Not tested: vision-language datasets, Liger kernels, DeepSpeed/FSDP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("geko_core.integrations.trl needs trl: pip install 'geko_core[trl]'") from error

from ..cross_entropy import cross_entropy_with_stats
from ..types import SampleStats
from .hf import GEKO_INDEX_KEY, GekoIndexCollator, GekoTrainerMixin
from .trl_grpo import GekoGRPOTrainer, GekoGroupSampler  # GRPO (RL): prompts chosen before their rollouts

__all__ = ["GEKO_SEGMENT_KEY", "GekoGRPOTrainer", "GekoGroupSampler", "GekoSFTCollator", "GekoSFTTrainer"]

#: Batch field of a packed row: for every token, the position in the batch (0..B-1) of the
#: sample it belongs to, -1 for padding. int64 ``[1, T]``.
GEKO_SEGMENT_KEY = "geko_segment"
# The batch's dataset indices as a numpy array: the data loader moves tensors to the device,
# and the Selector's weights and observe_stats would read a device index back every step.
_HOST_INDEX_KEY = "geko_index_host"
_MASK_FIELDS = ("completion_mask", "assistant_masks")


# -- packed rows ------------------------------------------------------------------------------
class GekoSFTCollator(GekoIndexCollator):
    """:class:`~geko_core.integrations.hf.GekoIndexCollator` that also says which sample each
    token of a packed row belongs to.

    Every batch also carries its indices as an int64 numpy array (``"geko_index_host"``),
    which the data loader leaves on the host. When the wrapped collator puts the batch's samples into a single padding-free row (TRL's
    collator with ``padding_free=True``, which packing uses), the batch gets
    ``"geko_segment"``: int64 ``[1, T]``, the sample's position in the batch for each of its
    tokens, in feature order, and -1 on trailing padding. One sample per row needs nothing.

    Raises:
        ValueError: features that are already packed rows (``seq_lengths`` of more than one
            example), or several samples in a row that the model would not keep apart (no
            ``position_ids`` restarting at each sample, an ``attention_mask``, more than one row).
    """

    def __call__(self, features: list) -> Any:
        batch = super().__call__(features)
        if not features or not isinstance(features[0], Mapping) or GEKO_INDEX_KEY not in features[0]:
            return batch
        batch[_HOST_INDEX_KEY] = batch[GEKO_INDEX_KEY].numpy().copy()
        seq_lengths = features[0].get("seq_lengths")
        if seq_lengths is not None and any(len(f["seq_lengths"]) > 1 for f in features):
            raise ValueError(
                "the training rows are already packed (seq_lengths holds several examples): GEKO selects examples, "
                "so it packs after selection; give the unpacked examples with packing=True"
            )
        input_ids = batch["input_ids"]
        if input_ids.shape[0] == len(features):
            return batch
        batch[GEKO_SEGMENT_KEY] = _segments(features, batch)
        return batch


def _segments(features: list, batch: Mapping[str, Any]) -> torch.Tensor:
    rows, width = batch["input_ids"].shape
    count = len(features)
    if rows != 1:
        raise ValueError(
            f"the collator put {count} samples into {rows} rows: GEKO reads one sample per row, or every sample of "
            "the batch in one padding-free row"
        )
    lengths = torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.int64)
    total = int(lengths.sum())
    if total > width:
        raise ValueError(f"a packed row of {width} tokens cannot hold the batch's {total} tokens (truncated by the collator?)")
    starts = torch.cumsum(lengths, 0) - lengths
    positions = batch.get("position_ids")
    if "attention_mask" in batch or positions is None or bool((positions[0, starts] != 0).any()):
        raise ValueError(
            "the collator packed several samples into one row without position_ids restarting at each sample (or with "
            "an attention_mask): the samples would attend to each other. Use TRL's collator with padding_free=True "
            "or packing=True"
        )
    segment = torch.full((1, width), -1, dtype=torch.int64)
    segment[0, :total] = torch.repeat_interleave(torch.arange(count, dtype=torch.int64), lengths)
    return segment


def _target_tokens(dataset: Any, *, shift: bool) -> np.ndarray | None:
    """Counted target tokens of every example of a prepared ``datasets.Dataset`` (labels other
    than -100, the first one excluded with the causal shift); None without a labels column."""
    if "labels" not in (getattr(dataset, "column_names", None) or []):
        return None
    counts = []
    for table in dataset.select_columns(["labels"]).with_format("arrow").iter(batch_size=65536):
        column = table.column("labels").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        counted = np.concatenate(([0], np.cumsum(values != -100)))
        starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
        if shift:  # the first token of an example is no target
            starts = np.minimum(starts + 1, ends)
        counts.append(counted[ends] - counted[starts])
    return np.concatenate(counts).astype(np.int64) if counts else None


# -- trainer ------------------------------------------------------------------------------------
class GekoSFTTrainer(GekoTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose training epochs are planned by a geko Selector.

    Takes every argument of ``trl.SFTTrainer`` plus those of
    :class:`~geko_core.integrations.hf.GekoTrainer` (``selector``, ``geko_policy``,
    ``geko_options``, ``geko_config``, ``geko_shift``). What is supported and refused is in
    the module's documentation.

    A ``selector=`` passed in must be built for the *prepared* training set (its length is
    known once SFTTrainer has tokenized and filtered it); the default Selector is built at
    the start of training and needs no such care.

    Attributes:
        selector: the Selector over ``len(trainer.train_dataset)`` prepared examples.
    """

    _geko_batch_keys = (GEKO_INDEX_KEY, GEKO_SEGMENT_KEY, _HOST_INDEX_KEY)
    _geko_collator_class = GekoSFTCollator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._geko_refuse_unsupported()
        # Per micro-batch since the last log: valid tokens, entropy and correct tokens summed
        # over them (on the device), and the batch's tokens (its attention mask's sum on the
        # device, or a padding-free row's width as a host int).
        self._geko_sft_sums: list[torch.Tensor] = []
        self._geko_batch_tokens: list[torch.Tensor | int] = []

    def _geko_refuse_unsupported(self) -> None:
        args = self.args
        if getattr(args, "loss_type", "nll") != "nll":
            raise ValueError(f"{type(self).__name__} trains with the 'nll' loss; loss_type={args.loss_type!r} is not supported")
        if args.label_smoothing_factor > 0:
            raise ValueError(f"{type(self).__name__} does not support label smoothing (label_smoothing_factor={args.label_smoothing_factor})")
        if self.compute_loss_func is not None:
            raise ValueError(f"{type(self).__name__} computes the loss itself (with the statistics); compute_loss_func is not supported")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{type(self).__name__} does not add a mixture-of-experts router auxiliary loss; set router_aux_loss_coef=0.0"
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "sp_enabled", False)):
            raise ValueError(
                f"{type(self).__name__} does not support context or sequence parallelism: the sequence is sharded across "
                "ranks, so no rank holds a sample's tokens"
            )
        columns = getattr(getattr(self.train_dataset, "dataset", None), "column_names", None) or []
        if "seq_lengths" in columns:
            raise ValueError(
                "train_dataset is already packed (it has a 'seq_lengths' column): GEKO selects examples, so it packs after "
                "selection; give the unpacked examples with packing=True"
            )

    def _geko_selector_options(self) -> dict[str, Any]:
        # Each example's cost in tokens (its counted targets), for token budgets and the share
        # of tokens saved in the metrics.
        tokens = _target_tokens(getattr(self.train_dataset, "dataset", None), shift=self._shift())
        return {} if tokens is None else {"sample_tokens": tokens}

    # -- data -----------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if dataset_name != "train" or not packing:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if args.packing_strategy != "bfd":
            raise ValueError(
                f"{type(self).__name__} packs whole examples after selection (as packing_strategy='bfd' does, truncating "
                f"each to max_length); packing_strategy={args.packing_strategy!r} would split examples across rows"
            )
        # Prepared unpacked (truncated to max_length); the padding-free collator packs each batch.
        return super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)

    # -- loss -----------------------------------------------------------------------------------
    def _geko_labels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        labels = inputs["labels"]
        for field in _MASK_FIELDS:
            if field in inputs and (field != "completion_mask" or self.completion_only_loss):
                labels = labels.masked_fill(inputs[field] == 0, -100)
        # In a packed row, a sample's first token (predicted by the previous sample's last one)
        # is never a target: cross_entropy_with_stats(segments=...) applies that rule itself.
        return labels

    def _geko_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        model_inputs = {k: v for k, v in super()._geko_model_inputs(inputs).items() if k not in _MASK_FIELDS}
        model_inputs["use_cache"] = False  # as SFTTrainer: no cache in training (and none with checkpointing)
        return model_inputs

    def _geko_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, inputs: Mapping[str, Any], *, reduction: str
    ) -> torch.Tensor:
        selector = self.selector
        host_idx = inputs[_HOST_INDEX_KEY]
        weights = selector.weights(host_idx).to(logits.device, non_blocking=True)
        segments = inputs.get(GEKO_SEGMENT_KEY)
        # A packed row: one statistics entry, weight and loss share per sample of the batch.
        packing = {} if segments is None else {"segments": segments.to(logits.device), "num_segments": weights.shape[0]}
        loss, stats = cross_entropy_with_stats(
            logits, labels, shift=self._shift(), sample_weight=weights, reduction=reduction,
            config=selector.config, backend=selector.backend, **packing,
        )
        selector.observe_stats(host_idx, stats)
        self._geko_record_sft_metrics(inputs, stats)
        return loss

    # -- metrics --------------------------------------------------------------------------------
    def _geko_record_sft_metrics(self, inputs: Mapping[str, Any], stats: SampleStats) -> None:
        """SFTTrainer's training metrics (entropy, mean_token_accuracy, num_tokens), from the
        statistics instead of its fused LM head's outputs. Kept on the device: read (and
        summed over the ranks) when the Trainer logs, not at every step."""
        valid = stats.valid
        tokens = torch.where(valid, stats.valid_tokens, 0).to(torch.float64)
        entropy = torch.where(valid, stats.entropy.double(), 0.0).mul(tokens).sum()
        correct = torch.where(valid, stats.correct.double(), 0.0).mul(tokens).sum()
        self._geko_sft_sums.append(torch.stack([tokens.sum(), entropy, correct]))
        if "attention_mask" in inputs:
            self._geko_batch_tokens.append(inputs["attention_mask"].sum())
        else:  # padding-free: every position of the row is a token
            self._geko_batch_tokens.append(int(inputs["input_ids"].shape[1]))

    def _geko_flush_sft_metrics(self) -> None:
        """Put the micro-batches' figures since the last log into SFTTrainer's ``_metrics``, as
        SFTTrainer would have put them at each step: per micro-batch, the token mean over all
        ranks (0 without tokens); ``num_tokens`` the running total of every rank's tokens."""
        metrics = self._metrics["train"]
        if self._geko_sft_sums:
            sums = self._geko_sum_over_ranks(torch.stack(self._geko_sft_sums)).cpu().tolist()
            self._geko_sft_sums.clear()
            for valid, entropy, correct in sums:
                metrics["entropy"].append(entropy / valid if valid > 0 else 0.0)
                metrics["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        if self._geko_batch_tokens:
            entries, self._geko_batch_tokens = self._geko_batch_tokens, []
            on_device = [e for e in entries if isinstance(e, torch.Tensor)]
            read = iter(torch.stack(on_device).double().cpu().tolist() if on_device else [])
            local = torch.tensor([next(read) if isinstance(e, torch.Tensor) else float(e) for e in entries], dtype=torch.float64)
            counts = self._geko_sum_over_ranks(local).cpu().tolist()
            self._total_train_tokens += sum(int(c) // self._tp_size for c in counts)
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank logs at the same points (the Trainer gathers the loss there), so the
        # collective in the flush lines up.
        if self._geko_sft_sums or self._geko_batch_tokens:
            self._geko_flush_sft_metrics()
        super().log(logs, start_time)
