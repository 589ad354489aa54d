"""TRL integration: :class:`GekoSFTTrainer`, TRL's ``SFTTrainer`` with the epochs, statistics,
importance weights, metrics and checkpointed state of a geko Selector.

    from trl import SFTConfig
    from geko_core.integrations.trl import GekoSFTTrainer

    trainer = GekoSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                             processing_class=tokenizer, geko_policy="geko")
    trainer.train()                      # resume_from_checkpoint=... continues exactly

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
    position, ``"geko_segment"``, through the batch; the loss is computed over the packed row
    with per-token statistics, which :func:`segment_sample_stats` reduces to one set of
    statistics per original sample (its dataset index is known), and each sample's importance
    weight scales the gradient of its own tokens. Differences from TRL's packing:
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
    is used only for evaluation: the statistics need the logits. TRL's training metrics
    ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are computed from the same
    statistics. ``overhead_seconds`` counts the Selector's ``weights``/``observe_stats`` calls,
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

from ..config import GekoConfig, resolve_config
from ..loss import cross_entropy_with_stats
from ..reference import instant_bucket
from ..types import SampleStats, TokenStats
from .hf import GEKO_INDEX_KEY, GekoIndexCollator, GekoTrainerMixin

__all__ = ["GEKO_SEGMENT_KEY", "GekoSFTCollator", "GekoSFTTrainer", "segment_sample_stats"]

#: Batch field of a packed row: for every token, the position in the batch (0..B-1) of the
#: sample it belongs to, -1 for padding. int64 ``[1, T]``.
GEKO_SEGMENT_KEY = "geko_segment"
_MASK_FIELDS = ("completion_mask", "assistant_masks")


# -- packed rows ------------------------------------------------------------------------------
class GekoSFTCollator(GekoIndexCollator):
    """:class:`~geko_core.integrations.hf.GekoIndexCollator` that also says which sample each
    token of a packed row belongs to.

    When the wrapped collator puts the batch's samples into a single padding-free row (TRL's
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


def segment_sample_stats(
    tokens: TokenStats, segments: torch.Tensor, num_samples: int, config: GekoConfig | None = None
) -> SampleStats:
    """Per-sample statistics of samples packed into rows, from token-level statistics.

    The same reduction as :func:`geko_core.sample_stats` applies to one sample's tokens: the
    mean of each value over the sample's valid tokens (accumulated in float64, as the
    reference does), ``valid_tokens`` their number, the instant bucket from the mean
    confidence and correct fraction; a sample without a valid token, or with a non-finite
    value in one, is invalid (NaN floats, bucket -1).

    Args:
        tokens: ``SampleStats.tokens`` of the packed rows (``per_token=True``), each ``[R, T]``
            (already shifted, for a causal LM).
        segments: int ``[R, T]``: for each token, the sample (``0..num_samples-1``) it belongs
            to, negative for tokens of no sample.
        num_samples: number of samples ``S``.
        config: thresholds of the instant bucket.

    Returns:
        SampleStats with ``S`` entries, on the tokens' device.

    Raises:
        TypeError, ValueError: ``tokens`` that are not a TokenStats, segments of another shape
            or not integer, a segment ``>= num_samples``.
    """
    if not isinstance(tokens, TokenStats):
        raise TypeError(f"tokens must be a geko_core TokenStats (SampleStats.tokens with per_token=True), got {type(tokens).__name__}")
    if not isinstance(segments, torch.Tensor) or segments.dtype.is_floating_point or segments.dtype == torch.bool:
        raise TypeError(f"segments must be an integer tensor, got {getattr(segments, 'dtype', type(segments).__name__)}")
    if segments.shape != tokens.valid.shape:
        raise ValueError(f"segments shape {tuple(segments.shape)} does not match the token statistics {tuple(tokens.valid.shape)}")
    if segments.numel() and int(segments.max()) >= num_samples:
        raise ValueError(f"segment {int(segments.max())} is out of range for {num_samples} samples")
    return _segment_sample_stats(tokens, segments, num_samples, resolve_config(config))


def _segment_sample_stats(tokens: TokenStats, segments: torch.Tensor, num_samples: int, config: GekoConfig) -> SampleStats:
    """:func:`segment_sample_stats` on trusted inputs (no host synchronisation)."""
    device = tokens.loss.device
    segments = segments.to(device=device, dtype=torch.int64)
    counted = tokens.valid & (segments >= 0)
    owner = segments[counted]
    valid_tokens = torch.bincount(owner, minlength=num_samples)
    finite = torch.isfinite(tokens.loss) & torch.isfinite(tokens.confidence)
    nonfinite = torch.bincount(segments[counted & ~finite], minlength=num_samples) > 0
    bad = nonfinite | (valid_tokens == 0)
    denom = valid_tokens.clamp(min=1).to(torch.float64)

    def mean(value: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(num_samples, dtype=torch.float64, device=device)
        total.index_add_(0, owner, value[counted].to(torch.float64))
        out = (total / denom).to(torch.float32)
        return torch.where(bad, torch.full_like(out, float("nan")), out)

    confidence = mean(tokens.confidence)
    correct = mean(tokens.correct)
    return SampleStats(
        loss=mean(tokens.loss),
        confidence=confidence,
        label_prob=mean(tokens.label_prob),
        correct=correct,
        entropy=mean(tokens.entropy),
        el2n=mean(tokens.el2n),
        valid_tokens=valid_tokens.to(torch.int32),
        bucket=instant_bucket(confidence, correct, config),
    )


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (broadcast)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def _packed_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    weights: torch.Tensor,
    *,
    uniform: bool,
    shift: bool,
    reduction: str,
    config: GekoConfig,
    backend: str | None,
) -> tuple[torch.Tensor, SampleStats]:
    """Weighted loss ``sum_s w_s sum_{t in s} loss_t`` (or its mean over valid tokens) of
    samples packed into rows, and their per-sample statistics, from one fused pass.

    The fused kernel weighs whole rows; a per-sample weight inside a row is applied to the
    gradient of the logits of that sample's tokens, and the loss value is the weighted sum of
    the token losses of the same pass.
    """
    token_segments = segments[:, 1:] if shift else segments  # the sample of each scored (label) token
    token_weight = None
    if not uniform:
        token_weight = torch.where(token_segments >= 0, weights[token_segments.clamp(min=0)], torch.zeros((), device=weights.device))
        position_weight = torch.nn.functional.pad(token_weight, (0, 1)) if shift else token_weight
        logits = _ScaleGradient.apply(logits, position_weight.unsqueeze(-1).to(logits.dtype))
    loss, row_stats = cross_entropy_with_stats(
        logits, labels, shift=shift, reduction="sum", per_token=True, config=config, backend=backend
    )
    stats = _segment_sample_stats(row_stats.tokens, token_segments, weights.shape[0], config)
    if token_weight is not None:
        weighted = (row_stats.tokens.loss * token_weight).sum()
        loss = loss + (weighted - loss.detach())  # value: the weighted sum; gradient: through the scaled logits
    if reduction == "mean":
        loss = loss / stats.valid_tokens.sum().to(loss.dtype)
    return loss, stats


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

    _geko_batch_keys = (GEKO_INDEX_KEY, GEKO_SEGMENT_KEY)
    _geko_collator_class = GekoSFTCollator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._geko_refuse_unsupported()

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
        segments = inputs.get(GEKO_SEGMENT_KEY)
        if segments is not None and self._shift() and segments.shape[1] > 1:
            # A sample's first token is predicted by the previous sample's last one: never a target.
            boundary = torch.nn.functional.pad(segments[:, 1:] != segments[:, :-1], (1, 0))
            labels = labels.masked_fill(boundary, -100)
        return labels

    def _geko_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        model_inputs = {k: v for k, v in super()._geko_model_inputs(inputs).items() if k not in _MASK_FIELDS}
        model_inputs["use_cache"] = False  # as SFTTrainer: no cache in training (and none with checkpointing)
        return model_inputs

    def _geko_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, inputs: Mapping[str, Any], *, reduction: str
    ) -> torch.Tensor:
        selector = self.selector
        shift = self._shift()
        host_weights = selector.weights(idx.detach().cpu())
        weights = host_weights.to(logits.device)
        segments = inputs.get(GEKO_SEGMENT_KEY)
        if segments is None:
            loss, stats = cross_entropy_with_stats(
                logits, labels, shift=shift, sample_weight=weights, reduction=reduction,
                config=selector.config, backend=selector.backend,
            )
        else:
            loss, stats = _packed_loss(
                logits, labels, segments.to(logits.device), weights, uniform=bool((host_weights == 1).all()),
                shift=shift, reduction=reduction, config=selector.config, backend=selector.backend,
            )
        selector.observe_stats(idx, stats)
        self._geko_record_sft_metrics(inputs, stats)
        return loss

    def _geko_record_sft_metrics(self, inputs: Mapping[str, Any], stats: SampleStats) -> None:
        """SFTTrainer's training metrics (entropy, mean_token_accuracy, num_tokens), from the
        statistics instead of its fused LM head's outputs."""
        metrics = self._metrics["train"]
        gather = self.accelerator.gather_for_metrics
        valid = stats.valid
        tokens = torch.where(valid, stats.valid_tokens, 0).to(torch.float64)
        num_valid = gather(tokens.sum()).sum()
        entropy_sum = gather(torch.where(valid, stats.entropy.double(), 0.0).mul(tokens).sum()).sum()
        correct_sum = gather(torch.where(valid, stats.correct.double(), 0.0).mul(tokens).sum()).sum()
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct_sum / num_valid).item() if num_valid > 0 else 0.0)
        if "attention_mask" in inputs:
            batch_tokens = gather(inputs["attention_mask"].sum()).sum().item()
        else:
            ids = inputs["input_ids"]
            batch_tokens = gather(torch.tensor(ids.shape[1], device=ids.device)).sum().item()
        self._total_train_tokens += batch_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
