"""Selection policies on the shared core (docs/design.md §3-4)."""

from __future__ import annotations

from .base import Plan, Policy, PolicyContext, StatsBatch, TableView
from .baselines import RandomSubsetPolicy, UniformPolicy
from .es import ESPolicy, ESWPPolicy
from .gainrl import GainRLPolicy
from .geko import GekoPolicy
from .grace import GracePolicy
from .infobatch import InfoBatchPolicy

POLICIES: dict[str, type[Policy]] = {
    "geko": GekoPolicy,
    "infobatch": InfoBatchPolicy,
    "es": ESPolicy,
    "eswp": ESWPPolicy,
    "gainrl": GainRLPolicy,
    "grace": GracePolicy,
    "uniform": UniformPolicy,
    "random_subset": RandomSubsetPolicy,
}


def make_policy(policy: str | Policy, **options) -> Policy:
    """A policy object from its name (with constructor options) or the object itself."""
    if isinstance(policy, Policy):
        if options:
            raise ValueError("policy options are only accepted with a policy name")
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a geko_core.policies.Policy, got {type(policy).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)} or pass a Policy object")
    return POLICIES[policy](**options)


__all__ = [
    "ESPolicy",
    "ESWPPolicy",
    "GainRLPolicy",
    "GekoPolicy",
    "GracePolicy",
    "InfoBatchPolicy",
    "POLICIES",
    "Plan",
    "Policy",
    "PolicyContext",
    "RandomSubsetPolicy",
    "StatsBatch",
    "TableView",
    "UniformPolicy",
    "make_policy",
]
