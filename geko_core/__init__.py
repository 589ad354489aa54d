"""geko_core: a sample-selection engine for PyTorch training.

Scores every sample from the logits of the step that already ran, keeps each sample's
history in a compiled table, and plans which samples deserve compute next.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._backend import CompiledCoreError, backend_status, compiled_core_error

__all__ = [
    "AngleStats",
    "BUCKET_FOCUS",
    "BUCKET_FREEZE",
    "BUCKET_HARD",
    "BUCKET_INVALID",
    "BUCKET_LIGHT",
    "BUCKET_NAMES",
    "BUCKET_UNSEEN",
    "CheckpointError",
    "CompiledCoreError",
    "CurriculumPhase",
    "DEFAULT_PHASES",
    "EpochPlan",
    "EpochPlanner",
    "MountainCurriculum",
    "GekoConfig",
    "RolloutConfig",
    "RolloutStats",
    "RolloutTable",
    "GekoSampler",
    "SampleStats",
    "SampleTable",
    "Selector",
    "TokenStats",
    "WithIndex",
    "angle_concentration",
    "angle_concentration_reference",
    "backend_status",
    "capture_hidden_states",
    "gainrl_update_mu",
    "gaussian_window_plan",
    "infobatch_plan",
    "weighted_sample",
    "compiled_core_error",
    "cross_entropy_with_stats",
    "linear_cross_entropy_with_stats",
    "linear_logprobs",
    "linear_policy_loss",
    "rollout_stats",
    "sample_stats",
    "__version__",
]

if compiled_core_error() is None:
    from .config import (
        BUCKET_FOCUS,
        BUCKET_FREEZE,
        BUCKET_HARD,
        BUCKET_INVALID,
        BUCKET_LIGHT,
        BUCKET_NAMES,
        BUCKET_UNSEEN,
        GekoConfig,
    )
    from .curriculum import DEFAULT_PHASES, CurriculumPhase, MountainCurriculum
    from .planner import EpochPlan, EpochPlanner, gainrl_update_mu, gaussian_window_plan, infobatch_plan, weighted_sample
    from . import policies
    from .angle import AngleStats, angle_concentration, angle_concentration_reference
    from .integrations.hidden import capture_hidden_states
    # The operation modules register the torch.ops.geko operators as they are imported.
    from .stats import sample_stats
    from .cross_entropy import cross_entropy_with_stats
    from .linear_cross_entropy import linear_cross_entropy_with_stats
    from .linear_logprobs import linear_logprobs
    from .linear_policy_loss import linear_policy_loss
    from .selector import GekoSampler, Selector, WithIndex
    from .table import CheckpointError, SampleTable
    from .rollouts import RolloutConfig, RolloutStats, RolloutTable, rollout_stats
    from .types import SampleStats, TokenStats
else:
    # `import geko_core` still works (so `python -m geko_core.info` can report the
    # problem); touching anything that needs the compiled core says how to build it.
    def __getattr__(name: str):
        if name in __all__:
            raise CompiledCoreError(compiled_core_error())
        raise AttributeError(f"module 'geko_core' has no attribute {name!r}")
