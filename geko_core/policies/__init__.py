"""Selection policies on the shared core (docs/design.md §3-4, docs/policies.md)."""

from __future__ import annotations

from .base import SIGNALS, Plan, Policy, PolicyContext, RolloutBatch, StatsBatch, TableView
from .baselines import FullPolicy, RandomSubsetPolicy, UniformPolicy
from .es import ESPolicy, ESWPPolicy
from .gainrl import GainRLPolicy, GainRLRolloutPolicy
from .geko import GekoPolicy
from .geko_rl import GekoRolloutPolicy
from .grace import GracePolicy
from .infobatch import InfoBatchPolicy
from .rl import DynamicSamplingPolicy, GresoPolicy

#: Policies of a supervised loop (``signal="logits"``), by name.
POLICIES: dict[str, type[Policy]] = {
    "geko": GekoPolicy,
    "infobatch": InfoBatchPolicy,
    "es": ESPolicy,
    "eswp": ESWPPolicy,
    "gainrl": GainRLPolicy,
    "grace": GracePolicy,
    "uniform": UniformPolicy,
    "full": FullPolicy,
    "random_subset": RandomSubsetPolicy,
}

#: Policies of an RL loop (``signal="rewards"``), by name: ``"geko"`` and ``"gainrl"`` name
#: the method in the setting of the signal.
RL_POLICIES: dict[str, type[Policy]] = {
    "full": FullPolicy,
    "uniform": UniformPolicy,
    "random_subset": RandomSubsetPolicy,
    "dynamic": DynamicSamplingPolicy,
    "greso": GresoPolicy,
    "geko": GekoRolloutPolicy,
    "gainrl": GainRLRolloutPolicy,
}

_REGISTRIES = {"logits": POLICIES, "rewards": RL_POLICIES}


def _check_signal(signal: str | None) -> None:
    if signal is not None and signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS} or None, got {signal!r}")


def make_policy(policy: str | Policy, *, signal: str | None = None, **options) -> Policy:
    """A policy object from its name (with constructor options) or the object itself.

    Args:
        policy: a name or a :class:`Policy`.
        signal: ``"logits"`` or ``"rewards"``: the name is looked up among that signal's
            policies (``"geko"`` and ``"gainrl"`` exist in both, as the method in each
            setting); a policy object must suit it (its ``signal``, or ``"any"``). None: a
            name is looked up among the supervised policies first, then the RL ones.
    """
    _check_signal(signal)
    if isinstance(policy, Policy):
        if options:
            raise ValueError("policy options are only accepted with a policy name")
        if signal is not None and policy.signal not in (signal, "any"):
            raise ValueError(f"policy {policy.name!r} learns from {policy.signal}, not {signal}")
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a geko_core.policies.Policy, got {type(policy).__name__}")
    registries = [_REGISTRIES[signal]] if signal is not None else [POLICIES, RL_POLICIES]
    for registry in registries:
        if policy in registry:
            return registry[policy](**options)
    names = sorted(set().union(*registries))
    where = f" with signal={signal!r}" if signal is not None else ""
    raise ValueError(f"unknown policy {policy!r}{where}; choose one of {names} or pass a Policy object")


def resolve_signal(policy: Policy, signal: str | None) -> str:
    """The signal a Selector runs with: ``signal`` when given (the policy must suit it), else
    the policy's own (``"any"`` defaults to logits)."""
    _check_signal(signal)
    if signal is None:
        return "logits" if policy.signal == "any" else policy.signal
    if policy.signal not in (signal, "any"):
        raise ValueError(f"policy {policy.name!r} learns from {policy.signal}, not {signal}")
    return signal


__all__ = [
    "DynamicSamplingPolicy",
    "ESPolicy",
    "ESWPPolicy",
    "FullPolicy",
    "GainRLPolicy",
    "GainRLRolloutPolicy",
    "GekoPolicy",
    "GekoRolloutPolicy",
    "GracePolicy",
    "GresoPolicy",
    "InfoBatchPolicy",
    "POLICIES",
    "Plan",
    "Policy",
    "PolicyContext",
    "RL_POLICIES",
    "RandomSubsetPolicy",
    "RolloutBatch",
    "SIGNALS",
    "StatsBatch",
    "TableView",
    "UniformPolicy",
    "make_policy",
    "resolve_signal",
]
