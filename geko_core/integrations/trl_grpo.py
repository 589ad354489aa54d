"""TRL GRPO integration: :class:`GekoGRPOTrainer`, TRL's ``GRPOTrainer`` whose prompts come
from a geko Selector in rewards mode, so that prompts the Selector skips are never rolled out.

    from trl import GRPOConfig
    from geko_core.integrations.trl_grpo import GekoGRPOTrainer

    trainer = GekoGRPOTrainer(model=model, reward_funcs=[exact_match], args=GRPOConfig(...),
                              train_dataset=prompts, processing_class=tokenizer, geko_policy="greso")
    trainer.train()                      # resume_from_checkpoint=... continues exactly
    print(trainer.selector.metrics()["rollout_tokens"])

It is :class:`~geko_core.integrations.hf.GekoTrainerMixin` on ``trl.GRPOTrainer``: the mixin's
shorter epochs, learning-rate schedule stretched over the shorter run, optimizer-step
counting, ``geko/...`` log entries and exact resume hold here; this module adds what GRPO
needs. Written against TRL 1.16 (``GRPOTrainer._generate``, ``_calculate_rewards``,
``_generate_and_score_completions`` and its ``_metrics``); ``pip install 'geko_core[trl]'``.

How it works
------------
Prompts
    The Selector (``signal="rewards"``) indexes ``train_dataset``'s rows (prompts). Its epoch
    plan replaces TRL's shuffled ``RepeatSampler``: :class:`GekoGroupSampler` takes the plan in
    chunks of ``P = generation_batch_size // num_generations`` prompts and yields each chunk
    exactly as ``RepeatSampler`` yields its batches (each prompt ``num_generations`` times in a
    row, the chunk ``num_iterations * steps_per_generation`` times), so TRL's groups of G
    completions, its buffered generation batch and its reuse over several optimisation
    passes are unchanged. A prompt the policy planned away is never yielded, so it is never
    tokenized, generated or scored. The Selector plans in whole chunks (``batch_size=P``,
    ``drop_last=True``): a tail of fewer than ``P`` prompts is left out of the epoch, as
    ``RepeatSampler`` leaves it out.
Rewards
    After TRL scores a generation batch, the rewards of each group go to
    ``selector.observe_rewards(prompt_indices [P], rewards [P, G], lengths [P, G])``. The
    reward is TRL's own ``reward`` (the weighted sum of the reward functions, gathered over
    the processes), the lengths are the completions' tokens as TRL counts them (model
    tokens, EOS included). A completion that every reward function left unscored (``None``)
    counts as its group's mean scored reward (a group with none scored: 0). Pass rates come
    from the Selector's rollout configuration (a reward >= ``right_at`` is right): give it
    thresholds that fit the reward's scale when the reward is not 0/1.
Training length
    As in :class:`~geko_core.integrations.hf.GekoTrainer`: ``num_train_epochs`` whole epochs
    of the Selector's (shorter) plans, or ``max_steps`` optimizer steps over as many epochs as
    needed. An epoch of ``n`` planned prompts is ``(n // P) * num_iterations *
    steps_per_generation`` micro-batches on every process.
Processes (DDP)
    TRL's sampler is global (every process draws the same prompts; accelerate gives each
    process its slice of every generation batch, and rewards are gathered over the
    processes before groups are formed). So is this one: every process holds a Selector
    with ``num_replicas=1`` and the same seed, and calls ``observe_rewards`` with the whole
    generation batch (its prompt indices gathered with the rewards), so every process plans
    the same epochs from the same table. The Selector's state is written once per node (by
    the processes that write checkpoints). Not tested with several processes here (the
    tests run one CPU process); the single-process path is the same code.
Metrics
    Training logs carry ``selector.metrics()`` as ``geko/...`` entries (rollouts, rollout
    tokens, prompts, zero-variance prompts and share, skipped prompts, bucket counts, epoch,
    ...), cumulative over the run, and ``geko/batch_zero_variance_share`` (the share of the
    generation batch's groups with no reward spread) averaged over the logging interval
    like TRL's ``frac_reward_zero_std``.
Log-probabilities
    TRL 1.16 computes the per-token log-probabilities of the completions (for the loss, the old
    policy's for the importance ratio, the reference model's for the KL term) by calling the
    model with ``fused_lm_head=True``: a forward that TRL's ``add_fused_lm_head`` installs,
    which runs the backbone and then its own chunked head function. This trainer replaces that
    head, on the policy (its base model under PEFT) and on the reference model, by
    :func:`geko_core.linear_logprobs`: the backbone's last hidden states, shifted, and
    ``model.get_output_embeddings()``'s weight and bias, at TRL's ``temperature``, only at the
    completion positions TRL scores (the others hold 0, as in TRL), with the per-token entropy
    for the policy (TRL's ``entropy`` metric, ``top_entropy_quantile`` mask and entropy bonus
    read it). The ``[B*G, T, V]`` logits never exist, on either path; ours keeps at most a fixed
    buffer budget of ``[chunk, V]`` rows (docs/linear_loss.md) where TRL's path forms
    ``[4096, V]`` tiles (on the CPU, several temporaries of that size). Everything TRL does with the
    values (masking, the importance ratio with the old log-probabilities, clipping, the loss's
    normalisation, its metrics, DDP) is TRL's own code, unchanged. The head's matmul runs in
    TRL's dtype: float32 with ``cast_lm_head_to_fp32``, else autocast's, else the hidden
    states'. TRL's path is kept, and ``trainer.geko_logprob_path`` says why, for what
    ``linear_logprobs`` does not compute: a config that transforms the logits
    (``final_logit_softcapping``, ``logit_scale``, ``output_multiplier``,
    ``lm_head_multiplier``, ``logits_scaling``), a mixture-of-experts model whose forward adds
    the load-balancing loss, a multimodal model, and, call by call, a head sharded by FSDP2 or
    DeepSpeed ZeRO-3 (TRL gathers it, in its backward too). ``trainer.geko_logprob_path`` is
    ``"linear_logprobs"`` otherwise (``geko_core/integrations/_trl_logprobs.py``).
Checkpoints and resume
    The Selector's state is written to ``geko_selector.pt`` in the checkpoint folder
    (atomically, with a checksum) before TRL writes its own, and restored at
    ``train(resume_from_checkpoint=...)``. The Trainer does not skip batches: the Selector
    resumes at the prompt its table last observed. Resume is exact when checkpoints fall on
    generation boundaries, which they always do with TRL's default
    (``steps_per_generation == gradient_accumulation_steps``, ``num_iterations == 1``: one
    generation per optimizer step). A checkpoint inside a generation window (several
    optimizer steps per generation) cannot hold TRL's buffered completions: resuming from it
    starts with the next chunk of prompts (a warning says so when such a checkpoint is written).

What is refused
---------------
- A Selector whose policy filters groups after rollout and draws again (``dynamic``, DAPO's
  dynamic sampling: ``policy.filter_groups``): TRL's generation batch has a fixed size and
  is split into equal per-step slices, so it cannot be refilled with more groups. TRL already
  gives zero-variance groups zero advantage; use ``full`` for the same prompts without the
  refill.
- No ``train_dataset`` (an environment that owns the prompts), or an ``IterableDataset``:
  the Selector plans epochs over a dataset of known size.
- ``geko_shift``, ``geko_fused_head``, ``geko_inplace_backward`` (options of the supervised
  loss; GRPO computes its own).

Tested (``tests/test_trl_grpo.py``, one CPU process, a tiny LLaMA, a rule-based reward): the
per-token log-probabilities, entropies and parameter gradients equal TRL's own and the plain
``log_softmax(logits / temperature)`` ones (temperatures 1 and 0.7), a soft-capped model keeps
TRL's path, groups kept as ``RepeatSampler`` keeps them, the observed rewards and lengths in the
table and the counts, skipped prompts never generated, ``geko/...`` metrics, unscored
completions, ``num_iterations > 1``, ``max_steps``, resume bit for bit (prompts, rewards, table,
model) from inside and at the end of an epoch. Not tested: several processes, vLLM generation,
tools, environments and ``rollout_func`` (the rewards and lengths are read where TRL computes
them for every one of these paths), PEFT, DeepSpeed/FSDP.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("geko_core.integrations.trl_grpo needs trl: pip install 'geko_core[trl]'") from error

from ..selector import Selector
from ._hf_data import GEKO_INDEX_KEY, GekoIndexCollator, save_selector_state, selector_state_file
from ._hf_selector import whole_epochs
from ._trl_logprobs import use_linear_logprobs
from .hf import GekoTrainerMixin

__all__ = ["GekoGRPOTrainer", "GekoGroupSampler"]


class GekoGroupSampler(torch.utils.data.Sampler[int]):
    """The Selector's planned prompts in TRL's ``RepeatSampler`` order.

    The plan is taken in chunks of ``prompts_per_generation`` prompts; each chunk is yielded
    ``repeat_count`` times, each of its prompts ``num_generations`` times in a row (an
    incomplete last chunk is not yielded). ``len()`` answers from the Selector's current (or
    previewed) epoch and changes nothing.

    Args:
        sampler: the Selector's :class:`~geko_core.GekoSampler`.
        prompts_per_generation: distinct prompts per generation batch (``P``).
        num_generations: completions per prompt (``G``).
        repeat_count: ``num_iterations * steps_per_generation``.
    """

    def __init__(self, sampler: Any, *, prompts_per_generation: int, num_generations: int, repeat_count: int) -> None:
        for name, value in (
            ("prompts_per_generation", prompts_per_generation), ("num_generations", num_generations),
            ("repeat_count", repeat_count),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.sampler = sampler
        self.prompts_per_generation = prompts_per_generation
        self.num_generations = num_generations
        self.repeat_count = repeat_count

    def __len__(self) -> int:
        chunks = len(self.sampler) // self.prompts_per_generation
        return chunks * self.prompts_per_generation * self.num_generations * self.repeat_count

    def __iter__(self) -> Iterator[int]:
        chunk: list[int] = []
        for index in self.sampler:
            chunk.append(index)
            if len(chunk) == self.prompts_per_generation:
                for _ in range(self.repeat_count):
                    for prompt in chunk:
                        for _ in range(self.num_generations):
                            yield prompt
                chunk = []

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class _PassthroughCollator(GekoIndexCollator):
    """GRPO's collator hands the rows on as a list of dicts; each keeps its ``"geko_index"``,
    which :class:`GekoGRPOTrainer` takes out before TRL reads the rows."""

    def __call__(self, features: list) -> Any:
        return self.collator(features)


class GekoGRPOTrainer(GekoTrainerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose prompts are chosen by a geko Selector in rewards mode.

    Takes every argument of ``trl.GRPOTrainer`` plus:

    Args:
        selector: a ready :class:`~geko_core.Selector` built with ``signal="rewards"`` for
            ``len(train_dataset)`` prompts, ``batch_size=generation_batch_size //
            num_generations``, ``drop_last=True``, ``num_replicas=1`` and the run's length
            (``epochs=num_train_epochs`` or ``total_steps=max_steps``); by default one is
            built at the start of training from the options below and the training arguments
            (seed: ``data_seed`` or ``seed``).
        geko_policy: policy name or object of the Selector built by default (``"geko"``,
            ``"greso"``, ``"random_subset"``, ``"full"``, ``"gainrl"``, ...; ``"dynamic"`` is
            refused). GAIN-RL orders prompts by the angle concentration of the policy model's
            hidden states: give it (``geko_options={"angles": ...}``, from
            :func:`geko_core.angle_concentration`); this trainer does not run that pre-pass.
        geko_options: ``policy_options`` of that Selector.
        geko_config: its ``config`` (the rollout thresholds in rewards mode).

    Attributes:
        selector: the Selector (built on first access).
        geko_logprob_path: how the policy's per-token log-probabilities are computed:
            ``"linear_logprobs"``, or ``"trl: <why>"`` where TRL's own fused head is kept
            (the module's documentation, "Log-probabilities").

    What is supported and refused is in the module's documentation.
    """

    _geko_collator_class = _PassthroughCollator

    def __init__(
        self,
        *args: Any,
        selector: Selector | None = None,
        geko_policy: Any = "geko",
        geko_options: dict[str, Any] | None = None,
        geko_config: Any = None,
        **kwargs: Any,
    ) -> None:
        from ._hf_model import bound_argument

        for option in ("geko_shift", "geko_fused_head", "geko_inplace_backward"):
            if option in kwargs:  # the supervised loss's options: GRPO computes its own loss
                raise TypeError(f"{type(self).__name__} does not take {option} (GRPO computes its own loss)")
        if bound_argument(GRPOTrainer.__init__, (self, *args), kwargs, "train_dataset") is None:
            raise ValueError(
                f"{type(self).__name__} needs a train_dataset of prompts: the Selector plans epochs over a dataset of known size"
            )
        super().__init__(
            *args, selector=selector, geko_policy=geko_policy, geko_options=geko_options, geko_config=geko_config, **kwargs
        )
        # Filled while TRL generates and scores a training batch: this process's completion
        # lengths and the run's rewards, read back once the batch is scored.
        self._geko_capture: dict[str, torch.Tensor] | None = None
        # A checkpoint whose random state the first generation after a mid-epoch resume restores.
        self._geko_rng_checkpoint: str | None = None
        # The policy's (and the reference model's) per-token log-probabilities through linear_logprobs.
        fp32_head = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.geko_logprob_path = use_linear_logprobs(policy, self.temperature, fp32_head, entropy=True)
        if getattr(self, "ref_model", None) is not None:
            use_linear_logprobs(self.ref_model, self.temperature, fp32_head, entropy=False)

    # -- the Selector ---------------------------------------------------------------------------
    @property
    def _geko_prompts_per_generation(self) -> int:
        return self.args.generation_batch_size // self.num_generations

    @property
    def _geko_repeat_count(self) -> int:
        return self.num_iterations * self.args.steps_per_generation

    def _build_selector(self) -> Selector:
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        length = {"total_steps": int(args.max_steps)} if args.max_steps > 0 else {"epochs": whole_epochs(args, type(self).__name__)}
        return Selector(
            len(self.train_dataset), self._geko_policy, signal="rewards", seed=int(seed), config=self._geko_config,
            policy_options=self._geko_options, num_replicas=1, rank=0, batch_size=self._geko_prompts_per_generation,
            drop_last=True, **length,
        )

    def _adopt(self, selector: Selector) -> None:
        name = type(self).__name__
        args = self.args
        if getattr(selector, "signal", None) != "rewards":
            raise ValueError(f"{name} needs a Selector built with signal='rewards', got signal={getattr(selector, 'signal', None)!r}")
        if getattr(selector.policy, "filter_groups", False):
            raise ValueError(
                f"policy {selector.policy.name!r} filters zero-variance groups after rollout and draws more prompts, which "
                f"{name} cannot do (TRL's generation batch has a fixed size); TRL already gives those groups zero "
                "advantage: use 'full' for the same prompts without the refill"
            )
        if self.train_dataset is not None and selector.num_samples != len(self.train_dataset):
            raise ValueError(f"the Selector has {selector.num_samples} prompts but train_dataset has {len(self.train_dataset)}")
        if args.max_steps > 0:
            if selector.total_steps != args.max_steps:
                raise ValueError(f"with max_steps={args.max_steps} build the Selector with total_steps={args.max_steps}")
        elif selector.epochs != whole_epochs(args, name):
            raise ValueError(f"the Selector plans epochs={selector.epochs} but num_train_epochs={args.num_train_epochs}")
        prompts = self._geko_prompts_per_generation
        if selector.batch_size != prompts or not selector.drop_last or selector.num_replicas != 1:
            raise ValueError(
                f"{name} needs a Selector built with batch_size={prompts} (generation_batch_size // num_generations), "
                f"drop_last=True and num_replicas=1 (every process draws the same prompts, as TRL's sampler does); got "
                f"batch_size={selector.batch_size}, drop_last={selector.drop_last}, num_replicas={selector.num_replicas}"
            )
        if selector.step_count == 0:
            selector.count_steps_explicitly()  # optimizer steps, counted by the step callback

    # -- data -----------------------------------------------------------------------------------
    def _get_train_sampler(self, dataset: Any = None) -> torch.utils.data.Sampler:
        return GekoGroupSampler(
            self.selector.sampler, prompts_per_generation=self._geko_prompts_per_generation,
            num_generations=self.num_generations, repeat_count=self._geko_repeat_count,
        )

    def _epoch_batches(self, samples: int) -> int:
        # Each chunk of P planned prompts is one generation batch, which every process's data
        # loader hands out num_iterations * steps_per_generation times.
        return (samples // self._geko_prompts_per_generation) * self._geko_repeat_count

    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, **kwargs):
        checkpoint = kwargs.get("resume_from_checkpoint")
        if checkpoint is not None and epoch == kwargs.get("epochs_trained") and self.selector.position > 0:
            # The Trainer restores the checkpoint's random state when the resumed epoch starts,
            # and iterating the data loader then draws from it (its base seed), which the
            # uninterrupted run did at the epoch's start, before the checkpoint. Restored again
            # right before the first generation, the sampling continues as it would have.
            self._geko_rng_checkpoint = checkpoint
        return super()._run_epoch(model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, **kwargs)

    # -- generation and rewards -------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not inputs or not isinstance(inputs[0], Mapping) or GEKO_INDEX_KEY not in inputs[0]:
            return super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluating on the training set: no bookkeeping
            return super()._generate_and_score_completions([_without_index(x) for x in inputs])
        if self._geko_rng_checkpoint is not None:
            checkpoint, self._geko_rng_checkpoint = self._geko_rng_checkpoint, None
            self._load_rng_state(checkpoint)
        device = self.accelerator.device
        local_idx = torch.tensor([int(x[GEKO_INDEX_KEY]) for x in inputs], dtype=torch.int64, device=device)
        self._geko_capture = {}
        try:
            output = super()._generate_and_score_completions([_without_index(x) for x in inputs])
            capture = self._geko_capture
        finally:
            self._geko_capture = None
        indices = self.accelerator.gather(local_idx).cpu()
        lengths = self.accelerator.gather(capture["lengths"].to(device)).cpu()
        self._geko_observe(indices, capture["rewards"].cpu(), lengths)
        return output

    def _generate(self, prompts: list) -> tuple:
        result = super()._generate(prompts)
        if self._geko_capture is not None:
            completion_ids, tool_mask = result[1], result[2]
            # As TRL counts completion lengths: the model's tokens (tool output excluded).
            counts = [sum(mask) for mask in tool_mask] if tool_mask is not None else [len(ids) for ids in completion_ids]
            self._geko_capture["lengths"] = torch.tensor(counts, dtype=torch.int64)
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._geko_capture is not None:
            # TRL's logged "reward": the weighted sum over the reward functions, NaN where no
            # function scored the completion. Already gathered over the processes.
            weighted = rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
            reward = weighted.nansum(dim=1)
            reward[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
            self._geko_capture["rewards"] = reward.detach()
        return rewards_per_func

    def _geko_observe(self, indices: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor) -> None:
        """Give the Selector one generation batch: the prompt of each group, its rewards and
        its completion lengths, ``[P]``, ``[P, G]``, ``[P, G]``."""
        group = self.num_generations
        if indices.numel() % group or rewards.numel() != indices.numel() or lengths.numel() != indices.numel():
            raise RuntimeError(
                f"a generation batch of {indices.numel()} rows, {rewards.numel()} rewards and {lengths.numel()} lengths "
                f"does not form groups of num_generations={group}"
            )
        groups = indices.view(-1, group)
        if not bool((groups == groups[:, :1]).all()):
            raise RuntimeError(
                "the generation batch does not hold each prompt's num_generations completions together; "
                f"{type(self).__name__}'s sampler must not be replaced"
            )
        rewards = rewards.to(torch.float32).view(-1, group)
        missing = torch.isnan(rewards)
        if bool(missing.any()):
            # Unscored completions count as their group's mean scored reward (0 when none is).
            mean = torch.nan_to_num(torch.nanmean(rewards, dim=1, keepdim=True), nan=0.0)
            rewards = torch.where(missing, mean.expand_as(rewards), rewards)
        stats = self.selector.observe_rewards(groups[:, 0].numpy(), rewards, lengths.view(-1, group))
        self._metrics["train"]["geko/batch_zero_variance_share"].append(float(stats.zero_variance.float().mean()))

    # -- TRL's own paths ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # GRPO's loss on the buffered completions (the mixin's supervised loss does not apply).
        return GRPOTrainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return GRPOTrainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self._selector is not None and self.args.should_save:
            # Every process holds the same Selector (num_replicas=1): one file per checkpoint.
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_selector_state(self._selector, selector_state_file(folder))
            generate_every = self.args.steps_per_generation * self.num_iterations
            if self._step % generate_every:
                warnings.warn(
                    f"checkpoint {folder} falls inside a generation window (steps_per_generation * num_iterations = "
                    f"{generate_every} micro-batches per generation): a resume from it starts with the next chunk of "
                    "prompts instead of the rest of this window",
                    stacklevel=2,
                )
        GRPOTrainer._save_checkpoint(self, model, trial)


def _without_index(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != GEKO_INDEX_KEY}
