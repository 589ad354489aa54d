"""Mountain curriculum (docs/design.md §3): training progress -> bucket weights -> sampling rates.

Progress ``p`` is counted in optimizer steps (``progress(step, total_steps)``), never in
epochs, because GEKO's epochs shrink. Each phase covers ``[previous end, end)`` of the
progress (``p == 1`` belongs to the last phase) and gives relative weights to the HARD,
FOCUS and LIGHT buckets, plus a learning-rate multiplier that is only *reported*: nothing
here touches an optimizer.

Rates are what the planner needs: the expected number of copies of one sample of a bucket
in the next epoch. ``rates(p)`` maps the weights as follows (bucket-code order FREEZE,
LIGHT, FOCUS, HARD, UNSEEN)::

    reference = focus weight if it is > 0, else max(hard weight, light weight)
    rate(b)   = clamp(weight(b) / reference, min_rate, max_rate)   for b in LIGHT, FOCUS, HARD
    rate(UNSEEN) = 1                 (a sample must be seen once to be scored)
    rate(FREEZE) = freeze_revisit    (the fraction of frozen samples revisited per epoch)

So FOCUS is sampled once per epoch, HARD ``hard/focus`` times (2.5 in PEAK, never above
``max_rate <= 5``), LIGHT ``light/focus`` times but never below ``min_rate``, which keeps
every inclusion probability positive and so every importance weight finite (``<= 1/min_rate``).
When a phase gives FOCUS weight 0, its largest other bucket is sampled once per epoch.

Smooth mode interpolates weights and LR multipliers linearly between phase midpoints
(constant before the first midpoint and after the last one); ``phase(p)`` always names the
phase whose interval holds ``p``.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from ._backend import load_compiled_core
from ._checks import check_bool, check_int, check_real

_C = load_compiled_core()

__all__ = [
    "DEFAULT_PHASES",
    "BucketWeights",
    "CurriculumPhase",
    "MountainCurriculum",
    "PhaseInfo",
    "progress",
]


class CurriculumPhase(NamedTuple):
    """One phase of the curriculum: progress ``[previous end, end)``.

    Attributes:
        name: label for logs.
        end: progress at which the phase ends; ends strictly increase and the last is 1.0.
        hard, focus, light: relative bucket weights, finite and >= 0, not all zero.
        lr_multiplier: reported by ``MountainCurriculum.lr_multiplier``; never applied here.
    """

    name: str
    end: float
    hard: float
    focus: float
    light: float
    lr_multiplier: float = 1.0


class BucketWeights(NamedTuple):
    hard: float
    focus: float
    light: float


class PhaseInfo(NamedTuple):
    index: int
    name: str


#: The five phases of docs/design.md §3 (defined once, in csrc/curriculum.cpp).
DEFAULT_PHASES: tuple[CurriculumPhase, ...] = tuple(CurriculumPhase(*p) for p in _C.default_curriculum_phases())


def progress(step: int, total_steps: int) -> float:
    """Training progress ``step / total_steps`` in [0, 1], counted in optimizer steps.

    Raises:
        TypeError: a non-integer argument.
        ValueError: ``total_steps <= 0`` or ``step`` outside ``[0, total_steps]``.
    """
    step = check_int(step, "step")
    total_steps = check_int(total_steps, "total_steps")
    return _C.curriculum_progress(step, total_steps)


def _as_phase(item: object, position: int) -> CurriculumPhase:
    if isinstance(item, CurriculumPhase):
        phase = item
    elif isinstance(item, (tuple, list)) and len(item) in (5, 6):
        phase = CurriculumPhase(*item)
    else:
        raise TypeError(
            f"phases[{position}] must be a CurriculumPhase or a (name, end, hard, focus, light[, lr_multiplier]) "
            f"tuple, got {item!r}"
        )
    if not isinstance(phase.name, str):
        raise TypeError(f"phases[{position}].name must be a str, got {type(phase.name).__name__}")
    for field in ("end", "hard", "focus", "light", "lr_multiplier"):
        check_real(getattr(phase, field), f"phases[{position}].{field}")
    return phase


class MountainCurriculum:
    """Training progress -> bucket weights, sampling rates and an LR multiplier.

    Args:
        phases: the phases in order (``CurriculumPhase`` or plain tuples); default
            ``DEFAULT_PHASES`` (WARMUP, ASCENT, PEAK, DESCENT, CONSOLIDATE).
        smooth: interpolate linearly between phase midpoints instead of switching at ends.
        max_rate: the most copies of one sample per epoch, in [1, 5].
        min_rate: the least expected copies of a LIGHT/FOCUS/HARD sample, 0 or in [1e-6, 1]
            (0 lets a bucket vanish, which makes importance weights undefined for it; a
            positive rate is never below 1e-6, so weights stay <= 1e6).
        freeze_revisit: fraction of FREEZE samples revisited per epoch, in [0, 1].

    Raises:
        ValueError: ends not strictly increasing or the last not 1.0, a negative or
            non-finite weight, all weights of a phase zero, an option out of range.
        TypeError: a phase of the wrong shape or type.
    """

    def __init__(
        self,
        phases: Iterable[CurriculumPhase | Sequence] | None = None,
        *,
        smooth: bool = False,
        max_rate: float = _C.MAX_RATE,
        min_rate: float = _C.DEFAULT_MIN_RATE,
        freeze_revisit: float = _C.DEFAULT_FREEZE_REVISIT,
    ) -> None:
        phase_list = list(DEFAULT_PHASES if phases is None else phases)
        checked = [_as_phase(p, i) for i, p in enumerate(phase_list)]
        self._impl = _C.MountainCurriculum(
            [tuple(p) for p in checked],
            check_bool(smooth, "smooth"),
            check_real(max_rate, "max_rate"),
            check_real(min_rate, "min_rate"),
            check_real(freeze_revisit, "freeze_revisit"),
        )
        self._phases = tuple(CurriculumPhase(*p) for p in self._impl.phases)

    @property
    def phases(self) -> tuple[CurriculumPhase, ...]:
        return self._phases

    @property
    def smooth(self) -> bool:
        return self._impl.smooth

    @property
    def max_rate(self) -> float:
        return self._impl.max_rate

    @property
    def min_rate(self) -> float:
        return self._impl.min_rate

    @property
    def freeze_revisit(self) -> float:
        return self._impl.freeze_revisit

    def weights(self, p: float) -> BucketWeights:
        """Relative (hard, focus, light) weights at progress ``p`` in [0, 1]."""
        return BucketWeights(*self._impl.weights(check_real(p, "p")))

    def phase(self, p: float) -> PhaseInfo:
        """Index and name of the phase whose interval holds ``p``."""
        index = self._impl.phase_index(check_real(p, "p"))
        return PhaseInfo(index, self._phases[index].name)

    def lr_multiplier(self, p: float) -> float:
        """The phase's learning-rate multiplier at ``p``; apply it yourself if you want it."""
        return self._impl.lr_multiplier(check_real(p, "p"))

    def rates(self, p: float) -> tuple[float, float, float, float, float]:
        """Expected copies per epoch of one sample of each bucket, in bucket-code order
        (FREEZE, LIGHT, FOCUS, HARD, UNSEEN); see the module docstring for the mapping.
        Pass it to ``EpochPlanner.plan``."""
        return tuple(self._impl.rates(check_real(p, "p")))  # type: ignore[return-value]

    def __repr__(self) -> str:
        names = ", ".join(f"{p.name}<{p.end:g}" for p in self._phases)
        return (
            f"MountainCurriculum([{names}], smooth={self.smooth}, max_rate={self.max_rate:g}, "
            f"min_rate={self.min_rate:g}, freeze_revisit={self.freeze_revisit:g})"
        )

