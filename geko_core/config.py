"""GekoConfig: every GEKO threshold and rate in one place.

The defaults are read from the C++ struct ``geko::Config`` (csrc/include/geko/config.h)
through ``_C.Config``, so the compiled core, the kernels and the torch reference all
see the same numbers and none of them is typed twice.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, TypeVar

from ._backend import load_compiled_core
from ._checks import check_int, check_real

_C = load_compiled_core()
_DEFAULTS = _C.Config()

#: Bucket codes (docs/design.md §3). INVALID only appears in statistics, UNSEEN only in the table.
BUCKET_INVALID: int = _C.BUCKET_INVALID
BUCKET_FREEZE: int = _C.BUCKET_FREEZE
BUCKET_LIGHT: int = _C.BUCKET_LIGHT
BUCKET_FOCUS: int = _C.BUCKET_FOCUS
BUCKET_HARD: int = _C.BUCKET_HARD
BUCKET_UNSEEN: int = _C.BUCKET_UNSEEN
NUM_BUCKETS: int = _C.NUM_BUCKETS
BUCKET_NAMES: tuple[str, ...] = ("FREEZE", "LIGHT", "FOCUS", "HARD", "UNSEEN")


_Config = TypeVar("_Config", bound="CompiledConfig")


class CompiledConfig:
    """Base of the frozen config dataclasses mirrored by a C++ struct (``_CPP``): fields are
    checked as plain Python numbers, then by the struct's validator, the one rule."""

    _CPP: type

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check = check_int if field.type in ("int", int) else check_real
            # Plain Python numbers from here on (a numpy scalar would not survive to_dict -> JSON).
            value = check(getattr(self, field.name), f"{type(self).__name__}.{field.name}")
            object.__setattr__(self, field.name, value)
        self.to_cpp()  # the C++ validator is the one rule; it raises ValueError

    def to_cpp(self) -> Any:
        """The equivalent validated C++ struct (a new object, the caller's to keep)."""
        cfg = self._CPP()
        for field in dataclasses.fields(self):
            setattr(cfg, field.name, getattr(self, field.name))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], values: dict) -> _Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class GekoConfig(CompiledConfig):
    """Thresholds and rates of the GEKO rules (docs/design.md §3).

    Attributes:
        freeze_confidence: a correct sample above this confidence is FREEZE-eligible.
        freeze_q: FREEZE also needs the sample's Q-value at or above this (table only).
        hard_confidence: a wrong sample above this confidence is HARD, else FOCUS.
            Must be below ``freeze_confidence``.
        correct_threshold: a sequence is correct when its token accuracy reaches this.
        q_alpha: Q-value step, ``q <- (1 - a) q + a r``.
        q_init: Q-value of a never-seen sample.
        loss_scale: reward ``r = 1 - min(loss / loss_scale, 1)``.
        loss_ema_beta: EMA factor of the loss (ES's beta1).
        loss_diff_ema_beta: EMA factor of the loss difference (ES's beta2).
        noise_guard_visits: consecutive HARD visits after which a sample is treated as
            FOCUS (suspected label noise); 0 disables the guard.
        correct_margin: the margin rule of "correct", in ``[0, 1]``: with a value above 0
            a sample is correct only when, besides reaching ``correct_threshold``, the
            lowest label probability over its valid tokens is at least this (e.g. 0.9:
            every response token predicted with probability >= 0.9). 0 (the default)
            applies no margin.
    """

    freeze_confidence: float = _DEFAULTS.freeze_confidence
    freeze_q: float = _DEFAULTS.freeze_q
    hard_confidence: float = _DEFAULTS.hard_confidence
    correct_threshold: float = _DEFAULTS.correct_threshold
    q_alpha: float = _DEFAULTS.q_alpha
    q_init: float = _DEFAULTS.q_init
    loss_scale: float = _DEFAULTS.loss_scale
    loss_ema_beta: float = _DEFAULTS.loss_ema_beta
    loss_diff_ema_beta: float = _DEFAULTS.loss_diff_ema_beta
    noise_guard_visits: int = _DEFAULTS.noise_guard_visits
    correct_margin: float = _DEFAULTS.correct_margin

    _CPP = _C.Config


# Frozen, so one shared instance is safe (building and validating one costs ~0.1 ms, and a
# constant is what torch.compile can trace).
_DEFAULT_CONFIG = GekoConfig()


def resolve_config(config: GekoConfig | None) -> GekoConfig:
    """``config`` or the defaults; refuses anything that is not a GekoConfig."""
    if config is None:
        return _DEFAULT_CONFIG
    if not isinstance(config, GekoConfig):
        raise TypeError(f"config must be a geko_core.GekoConfig, got {type(config).__name__}")
    return config


@functools.lru_cache(maxsize=64)
def _kernel_config_of(config: GekoConfig) -> "_C.Config":
    return config.to_cpp()


# By object identity first: hashing a GekoConfig's fields costs microseconds, and the
# statistics ask on every step. Each entry holds its config, so its id is not reused.
_KERNEL_CONFIGS: dict[int, tuple[GekoConfig, "_C.Config"]] = {}


def cpp_config_for_kernels(config: GekoConfig) -> "_C.Config":
    """A shared ``_C.Config`` made once per distinct configuration, for the kernels, which only
    read it (the statistics ask for one on every step). Never modify it: use ``to_cpp()``."""
    entry = _KERNEL_CONFIGS.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    kernel = _kernel_config_of(config)
    if len(_KERNEL_CONFIGS) >= 64:
        _KERNEL_CONFIGS.clear()
    _KERNEL_CONFIGS[id(config)] = (config, kernel)
    return kernel
