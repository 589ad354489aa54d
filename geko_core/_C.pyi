# Stub of the compiled core, generated from the bindings with pybind11-stubgen (regenerate
# after changing python/*.cpp: pybind11-stubgen geko_core._C -o <dir>); tests/test_package.py
# checks that it names every binding.
"""
geko_core compiled core: sample table, rollout table, CPU statistics kernels, curriculum and planner.
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['BUCKET_FOCUS', 'BUCKET_FREEZE', 'BUCKET_HARD', 'BUCKET_INVALID', 'BUCKET_LIGHT', 'BUCKET_UNSEEN', 'Config', 'DEFAULT_FREEZE_REVISIT', 'DEFAULT_MIN_RATE', 'EpochPlanner', 'FLAG_SUSPECTED_NOISY', 'MAX_RATE', 'MAX_STEP', 'MAX_VOCAB', 'MountainCurriculum', 'NUM_BUCKETS', 'ROLLOUT_FORMAT_VERSION', 'RolloutConfig', 'RolloutTable', 'SAMPLE_RECORD_SIZE', 'SampleTable', 'TABLE_FORMAT_VERSION', 'angle_concentration', 'bf16_round', 'build_info', 'count_visits', 'cross_entropy_backward', 'curriculum_progress', 'default_curriculum_phases', 'first_bad_label', 'fp16_round', 'freeze_revisit_count', 'gainrl_update_mu', 'gaussian_window_plan', 'infobatch_plan', 'loss_forward', 'random_permutation', 'rollout_group_stats', 'shard_plan', 'stats_forward', 'weighted_sample']
class Config:
    """
    C++ mirror of geko_core.GekoConfig (defaults live here).
    """
    def __init__(self) -> None:
        ...
    def validate(self) -> None:
        ...
    @property
    def correct_margin(self) -> float:
        ...
    @correct_margin.setter
    def correct_margin(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def correct_threshold(self) -> float:
        ...
    @correct_threshold.setter
    def correct_threshold(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def freeze_confidence(self) -> float:
        ...
    @freeze_confidence.setter
    def freeze_confidence(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def freeze_q(self) -> float:
        ...
    @freeze_q.setter
    def freeze_q(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def hard_confidence(self) -> float:
        ...
    @hard_confidence.setter
    def hard_confidence(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def loss_diff_ema_beta(self) -> float:
        ...
    @loss_diff_ema_beta.setter
    def loss_diff_ema_beta(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def loss_ema_beta(self) -> float:
        ...
    @loss_ema_beta.setter
    def loss_ema_beta(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def loss_scale(self) -> float:
        ...
    @loss_scale.setter
    def loss_scale(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def noise_guard_visits(self) -> int:
        ...
    @noise_guard_visits.setter
    def noise_guard_visits(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def q_alpha(self) -> float:
        ...
    @q_alpha.setter
    def q_alpha(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def q_init(self) -> float:
        ...
    @q_init.setter
    def q_init(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
class SampleTable:
    """
    Per-sample state, one 32-byte record per sample (use geko_core.SampleTable).
    """
    @staticmethod
    def layout() -> list:
        """
        [(name, numpy dtype str, byte offset)] of the record fields.
        """
    def __init__(self, num_samples: typing.SupportsInt | typing.SupportsIndex, config: Config, num_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def bucket_counts(self) -> numpy.typing.NDArray[numpy.int64]:
        """
        int64[5]: number of samples in FREEZE, LIGHT, FOCUS, HARD, UNSEEN.
        """
    def buckets(self, indices: numpy.ndarray) -> numpy.typing.NDArray[numpy.int8]:
        """
        Bucket code (int8) of each index.
        """
    def copy_field(self, name: str) -> numpy.ndarray:
        """
        A copy of one field of every record.
        """
    def load(self, records: numpy.ndarray, config: Config, updates: typing.SupportsInt | typing.SupportsIndex, nonfinite_skipped: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Replace config, counters and records (uint8, num_samples * 32 bytes) after validating them.
        """
    def records_view(self) -> numpy.ndarray:
        """
        Read-only [num_samples, 32] uint8 view of the records.
        """
    def update(self, indices: numpy.ndarray, loss: numpy.ndarray, confidence: numpy.ndarray, correct: numpy.ndarray, step: typing.SupportsInt | typing.SupportsIndex, before: typing.Any = None, after: typing.Any = None) -> None:
        """
        Apply one batch: indices int32/int64, loss/confidence/correct float32, all 1-D contiguous, same length.
        before/after: None or writable int8 arrays of the batch's length, filled with each row's bucket
        before and after the batch.
        """
    @property
    def config(self) -> Config:
        ...
    @property
    def nbytes(self) -> int:
        ...
    @property
    def nonfinite_skipped(self) -> int:
        ...
    @property
    def num_samples(self) -> int:
        ...
    @property
    def num_threads(self) -> int:
        """
        OpenMP threads of updates and scans (0: OpenMP's default).
        """
    @num_threads.setter
    def num_threads(self, arg1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def updates(self) -> int:
        ...
class MountainCurriculum:
    def __init__(self, phases: collections.abc.Sequence[tuple[str, typing.SupportsFloat | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex]], smooth: bool, max_rate: typing.SupportsFloat | typing.SupportsIndex, min_rate: typing.SupportsFloat | typing.SupportsIndex, freeze_revisit: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    def lr_multiplier(self, p: typing.SupportsFloat | typing.SupportsIndex) -> float:
        ...
    def phase_index(self, p: typing.SupportsFloat | typing.SupportsIndex) -> int:
        ...
    def rates(self, p: typing.SupportsFloat | typing.SupportsIndex) -> list[float]:
        ...
    def weights(self, p: typing.SupportsFloat | typing.SupportsIndex) -> tuple[float, float, float]:
        ...
    @property
    def freeze_revisit(self) -> float:
        ...
    @property
    def max_rate(self) -> float:
        ...
    @property
    def min_rate(self) -> float:
        ...
    @property
    def phases(self) -> list[tuple[str, float, float, float, float, float]]:
        ...
    @property
    def smooth(self) -> bool:
        ...
class EpochPlanner:
    def __init__(self, num_samples: typing.SupportsInt | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex, num_replicas: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex, shuffle: bool, drop_last: bool) -> None:
        ...
    def plan(self, buckets: numpy.ndarray, rates: typing.Annotated[collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex], "FixedSize(5)"], epoch: typing.SupportsInt | typing.SupportsIndex, last_visit_step: typing.Any, chunk_size: typing.SupportsInt | typing.SupportsIndex = -1) -> dict:
        ...
    @property
    def num_samples(self) -> int:
        ...
class RolloutConfig:
    """
    C++ mirror of geko_core.RolloutConfig (defaults live here).
    """
    def __init__(self) -> None:
        ...
    def validate(self) -> None:
        ...
    @property
    def alpha(self) -> float:
        ...
    @alpha.setter
    def alpha(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def flat_tol(self) -> float:
        ...
    @flat_tol.setter
    def flat_tol(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def light_above(self) -> float:
        ...
    @light_above.setter
    def light_above(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def right_at(self) -> float:
        ...
    @right_at.setter
    def right_at(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def wrong_at(self) -> float:
        ...
    @wrong_at.setter
    def wrong_at(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
class RolloutTable:
    """
    Per-prompt reward history, one 32-byte record per prompt (use geko_core.RolloutTable).
    """
    @staticmethod
    def layout() -> list:
        """
        [(name, numpy dtype str, byte offset)] of the record fields.
        """
    def __init__(self, num_samples: typing.SupportsInt | typing.SupportsIndex, config: RolloutConfig, num_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def bucket_counts(self) -> numpy.typing.NDArray[numpy.int64]:
        """
        int64[5]: number of prompts in FREEZE, LIGHT, FOCUS, HARD, UNSEEN.
        """
    def buckets(self, indices: numpy.ndarray) -> numpy.typing.NDArray[numpy.int8]:
        """
        Bucket code (int8) of each index.
        """
    def copy_field(self, name: str) -> numpy.ndarray:
        """
        A copy of one field of every record.
        """
    def load(self, records: numpy.ndarray, config: RolloutConfig, updates: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Replace config, counters and records (uint8, num_samples * 32 bytes) after validating them.
        """
    def records_view(self) -> numpy.ndarray:
        """
        Read-only [num_samples, 32] uint8 view of the records.
        """
    def update(self, indices: numpy.ndarray, rewards: numpy.ndarray, lengths: typing.Any, step: typing.SupportsInt | typing.SupportsIndex, before: typing.Any = None, after: typing.Any = None) -> tuple:
        """
        Apply one rollout batch: indices int32/int64 [B], rewards float32 [B, G], lengths None or float32
        [B, G]. Returns the groups' statistics as rollout_group_stats.
        """
    def update_stats(self, indices: numpy.ndarray, pass_rate: numpy.ndarray, spread: numpy.ndarray, zero_variance: numpy.ndarray, all_right: numpy.ndarray, all_wrong: numpy.ndarray, mean_length: numpy.ndarray, step: typing.SupportsInt | typing.SupportsIndex, before: typing.Any = None, after: typing.Any = None) -> None:
        """
        Apply precomputed statistics (float32 / bool [B]) by the same rule.
        """
    @property
    def config(self) -> RolloutConfig:
        ...
    @property
    def nbytes(self) -> int:
        ...
    @property
    def num_samples(self) -> int:
        ...
    @property
    def num_threads(self) -> int:
        """
        OpenMP threads of updates and scans (0: OpenMP's default).
        """
    @num_threads.setter
    def num_threads(self, arg1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def updates(self) -> int:
        ...
def angle_concentration(hidden: typing.Any, mask: typing.Any, prefix_len: typing.Any, concentration: typing.Any, valid_tokens: typing.Any, cross: typing.Any) -> None:
    """
    Angle concentration of [B, T, d] hidden states (DLPack capsules of CPU tensors).
    
    hidden: float32/bfloat16/float16, last dimension contiguous; mask: bool [B, T] any strides
    or None; prefix_len: contiguous int64 [B] in [0, T] or None (no cross term). Writes
    concentration float32 [B], valid_tokens int32 [B] and, with a prefix, cross float32 [B].
    Releases the GIL.
    """
def bf16_round(arg0: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    float -> bfloat16 -> float (tests).
    """
def build_info() -> dict:
    """
    Compiler, flags, OpenMP and CPU features of this build.
    """
def count_visits(indices: numpy.ndarray, loss: numpy.ndarray, confidence: numpy.ndarray, correct: numpy.ndarray, before: numpy.ndarray, after: numpy.ndarray, epoch: typing.SupportsInt | typing.SupportsIndex, seen_epoch: typing.Any, streak: typing.Any, stall: typing.Any, ref_loss: typing.Any, freeze_streak: typing.SupportsInt | typing.SupportsIndex, freeze_confidence: typing.SupportsFloat | typing.SupportsIndex, stall_drop: typing.SupportsFloat | typing.SupportsIndex) -> tuple:
    """
    GEKO's visit counters and revisit count for one batch the table applied (before/after: each row's
    bucket around SampleTable.update). The counter arrays (one entry per sample, owned by the policy)
    are written in place; returns the batch's FREEZE revisits as (revisits, failed). Everything is
    checked before anything is written.
    """
def cross_entropy_backward(logits: typing.Any, labels: typing.Any, lse: typing.Any, token_scale: typing.Any, grad: typing.Any, ignore_index: typing.SupportsInt | typing.SupportsIndex, scale_factor: typing.SupportsFloat | typing.SupportsIndex = 1.0, *, temperature: typing.SupportsFloat | typing.SupportsIndex = 1.0, softcap: typing.SupportsFloat | typing.SupportsIndex = 0.0, label_smoothing: typing.SupportsFloat | typing.SupportsIndex = 0.0, z_loss: typing.SupportsFloat | typing.SupportsIndex = 0.0, class_weight: typing.Any = None) -> None:
    """
    grad = (softmax(logits) - onehot(labels)) * token_scale[..., None] * scale_factor, 0 for non-valid
    tokens; lse is the forward's float64 [S, T]; token_scale is float32 [S, T] or [S] (one scale per sample).
    
    grad=None writes the gradient into the logits storage. Under the loss options (as stats_forward's;
    lse is then the forward's logsumexp(z)) grad is d l / d logits * token_scale * scale_factor, the
    options' token loss l differentiated through z. Releases the GIL.
    """
def curriculum_progress(step: typing.SupportsInt | typing.SupportsIndex, total_steps: typing.SupportsInt | typing.SupportsIndex) -> float:
    ...
def default_curriculum_phases() -> list[tuple[str, float, float, float, float, float]]:
    """
    The five phases of docs/design.md §3 as (name, end, hard, focus, light, lr_multiplier).
    """
def first_bad_label(labels: typing.Any, vocab: typing.SupportsInt | typing.SupportsIndex, ignore_index: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Flat index s * T + t of the first [S, T] int64 label that is neither ignore_index nor in [0, vocab), or -1.
    """
def fp16_round(arg0: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    float -> float16 -> float (tests).
    """
def freeze_revisit_count(fraction: typing.SupportsFloat | typing.SupportsIndex, n_freeze: typing.SupportsInt | typing.SupportsIndex) -> int:
    ...
def gainrl_update_mu(mu: typing.SupportsFloat | typing.SupportsIndex, accuracy: typing.SupportsFloat | typing.SupportsIndex, angle: typing.SupportsFloat | typing.SupportsIndex, n: typing.SupportsFloat | typing.SupportsIndex, alpha: typing.SupportsFloat | typing.SupportsIndex, beta: typing.SupportsFloat | typing.SupportsIndex, acc_scale: typing.SupportsFloat | typing.SupportsIndex, adj_min: typing.SupportsFloat | typing.SupportsIndex, adj_max: typing.SupportsFloat | typing.SupportsIndex, num_positions: typing.SupportsInt | typing.SupportsIndex) -> float:
    ...
def gaussian_window_plan(order: numpy.ndarray, mu: typing.SupportsFloat | typing.SupportsIndex, sigma: typing.SupportsFloat | typing.SupportsIndex, k: typing.SupportsInt | typing.SupportsIndex, epoch: typing.SupportsInt | typing.SupportsIndex, method: str, seed: typing.SupportsInt | typing.SupportsIndex, num_replicas: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex, shuffle: bool, drop_last: bool) -> dict:
    ...
def infobatch_plan(scores: numpy.ndarray, epoch: typing.SupportsInt | typing.SupportsIndex, num_epochs: typing.SupportsInt | typing.SupportsIndex, prune_ratio: typing.SupportsFloat | typing.SupportsIndex, delta: typing.SupportsFloat | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex, num_replicas: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex, shuffle: bool, drop_last: bool) -> dict:
    ...
def loss_forward(logits: typing.Any, labels: typing.Any, ignore_index: typing.SupportsInt | typing.SupportsIndex, config: Config, weight: typing.Any, reduction: str, values_out: typing.Any, valid_out: typing.Any, bucket_out: typing.Any, lse_out: typing.Any = None, grad_out: typing.Any = None, *, temperature: typing.SupportsFloat | typing.SupportsIndex = 1.0, softcap: typing.SupportsFloat | typing.SupportsIndex = 0.0, label_smoothing: typing.SupportsFloat | typing.SupportsIndex = 0.0, z_loss: typing.SupportsFloat | typing.SupportsIndex = 0.0, class_weight: typing.Any = None, return_totals: bool = False) -> tuple:
    """
    The fused loss's CPU forward in one call: label check, statistics (float32 [6, S] block, int32
    valid_tokens, int8 bucket), the reduction ('sum' or 'mean') of the token losses weighted per
    sample (float32 [S] or None), and either the loss's gradient (grad_out: the logits' dtype and
    shape) or the per-token log-sum-exp a later cross_entropy_backward reads (lse_out: float64
    [S, T]); each may be None.
    
    Returns (bad, loss, valid_total), with return_totals (bad, loss, valid_total, weight_total,
    z_loss): bad is the flat s * T + t of the first label neither ignore_index nor in [0, V) (then
    nothing is written and the rest is 0), else -1. Under the loss options (as stats_forward's) the
    token losses are the options' l; 'mean' divides by weight_total, the sum of the valid tokens'
    class weights w_y (float(valid_total) without class_weight; NaN loss when it is 0); z_loss is
    the part of loss the z-loss adds (reduced and divided the same way). Releases the GIL.
    """
def random_permutation(n: typing.SupportsInt | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex, epoch: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.int64]:
    """
    A uniformly random permutation of range(n), O(n), deterministic for (seed, epoch).
    """
def rollout_group_stats(rewards: numpy.ndarray, lengths: typing.Any, config: RolloutConfig, num_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> tuple:
    """
    Per-group statistics of rewards float32 [B, G] (lengths None or float32 [B, G]): (pass_rate, spread,
    zero_variance, all_right, all_wrong, mean_length), each [B].
    """
def shard_plan(indices: numpy.ndarray, weights: numpy.ndarray, num_replicas: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex, drop_last: bool) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.float32], int, int]:
    """
    This rank's share of a global plan: (indices, weights, total_size, real entries).
    """
def stats_forward(logits: typing.Any, labels: typing.Any, ignore_index: typing.SupportsInt | typing.SupportsIndex, config: Config, sample_out: collections.abc.Sequence, token_out: typing.Any = None, lse_out: typing.Any = None, *, loss_out: typing.Any = None, temperature: typing.SupportsFloat | typing.SupportsIndex = 1.0, softcap: typing.SupportsFloat | typing.SupportsIndex = 0.0, label_smoothing: typing.SupportsFloat | typing.SupportsIndex = 0.0, z_loss: typing.SupportsFloat | typing.SupportsIndex = 0.0, class_weight: typing.Any = None) -> None:
    """
    Fused statistics of [S, T, V] logits and [S, T] int64 labels (DLPack capsules of CPU tensors).
    
    Writes the 8 per-sample outputs (float32 x6, int32 valid_tokens, int8 bucket; each [S]; or 3:
    a float32 [6, S] block of the six floats, valid_tokens, bucket), optionally the per-token
    outputs (7: float32 x6, bool valid; [S, T], entries may be None; or 2: a float32 [K, S, T]
    block of the first K fields, valid or None) and the per-token log-sum-exp (float64 [S, T]).
    
    The loss options (geko_core/loss_options.py): temperature (> 0), softcap (0: off), label_smoothing
    (in [0, 1]), z_loss (>= 0), class_weight (float32 [V] or None). Under options the statistics
    (and their token loss -logp_y) describe softmax(z) and lse is logsumexp(z); loss_out (float32
    [S, T] or None) receives the token loss a reduction sums (the options' l; -logp_y without
    options), 0 on tokens that are not valid. Releases the GIL.
    """
def weighted_sample(weights: numpy.ndarray, k: typing.SupportsInt | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex, epoch: typing.SupportsInt | typing.SupportsIndex, method: str) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.float64]]:
    ...
BUCKET_FOCUS: int = 2
BUCKET_FREEZE: int = 0
BUCKET_HARD: int = 3
BUCKET_INVALID: int = -1
BUCKET_LIGHT: int = 1
BUCKET_UNSEEN: int = 4
DEFAULT_FREEZE_REVISIT: float = 0.05
DEFAULT_MIN_RATE: float = 0.5
FLAG_SUSPECTED_NOISY: int = 1
MAX_RATE: float = 5.0
MAX_STEP: int = 2147483647
MAX_VOCAB: int = 262144
NUM_BUCKETS: int = 5
ROLLOUT_FORMAT_VERSION: int = 1
SAMPLE_RECORD_SIZE: int = 32
TABLE_FORMAT_VERSION: int = 1
