import math

import numpy as np
import pytest

from geko_core.curriculum import DEFAULT_PHASES, CurriculumPhase, MountainCurriculum, progress

# docs/design.md §3, typed here on purpose: the test checks the compiled defaults against the design.
DESIGN_PHASES = [
    ("WARMUP", 0.15, (1, 2, 3)),
    ("ASCENT", 0.35, (2, 3, 1)),
    ("PEAK", 0.65, (5, 2, 0)),
    ("DESCENT", 0.85, (2, 3, 1)),
    ("CONSOLIDATE", 1.0, (1, 2, 3)),
]
FREEZE, LIGHT, FOCUS, HARD, UNSEEN = range(5)


def test_defaults_are_the_design_phases():
    assert [(p.name, p.end, (p.hard, p.focus, p.light)) for p in DEFAULT_PHASES] == DESIGN_PHASES
    assert all(p.lr_multiplier == 1.0 for p in DEFAULT_PHASES)
    c = MountainCurriculum()
    assert c.phases == DEFAULT_PHASES and not c.smooth
    assert (c.max_rate, c.min_rate, c.freeze_revisit) == (5.0, 0.5, 0.05)


@pytest.mark.parametrize(
    "p, name",
    [(0.0, "WARMUP"), (0.1499, "WARMUP"), (0.15, "ASCENT"), (0.5, "PEAK"), (0.65, "DESCENT"),
     (0.8499, "DESCENT"), (0.85, "CONSOLIDATE"), (1.0, "CONSOLIDATE")],
)
def test_piecewise_phase_and_weights(p, name):
    c = MountainCurriculum()
    info = c.phase(p)
    assert info.name == name and DEFAULT_PHASES[info.index].name == name
    ph = DEFAULT_PHASES[info.index]
    assert tuple(c.weights(p)) == (ph.hard, ph.focus, ph.light)


def test_rates_mapping():
    c = MountainCurriculum()
    # PEAK (5, 2, 0): HARD 5/2, FOCUS 1, LIGHT 0 -> thinned to min_rate, UNSEEN 1, FREEZE = revisit.
    assert c.rates(0.5) == (0.05, 0.5, 1.0, 2.5, 1.0)
    # WARMUP (1, 2, 3): LIGHT 1.5, HARD 0.5.
    assert c.rates(0.0) == (0.05, 1.5, 1.0, 0.5, 1.0)
    r = c.rates(0.2)  # ASCENT (2, 3, 1): LIGHT 1/3 floored at min_rate 0.5
    assert r[HARD] == pytest.approx(2 / 3) and r[LIGHT] == 0.5 and r[FOCUS] == 1.0
    r = MountainCurriculum(min_rate=0.1).rates(0.2)
    assert r[LIGHT] == pytest.approx(1 / 3)


def test_rates_cap_floor_and_zero_focus():
    c = MountainCurriculum(
        [("A", 0.5, 10.0, 1.0, 0.01), ("B", 1.0, 3.0, 0.0, 1.0)], max_rate=4.0, min_rate=0.2, freeze_revisit=0.0
    )
    assert c.rates(0.1) == (0.0, 0.2, 1.0, 4.0, 1.0)  # HARD capped at max_rate, LIGHT floored
    # FOCUS weight 0: the largest other weight (HARD, 3) is the reference; FOCUS gets the floor.
    assert c.rates(0.9) == pytest.approx((0.0, 1 / 3, 0.2, 1.0, 1.0))


def test_tiny_rates_stay_representable():
    c = MountainCurriculum([("A", 1.0, 1e-12, 1.0, 0.0)], min_rate=0.0)
    assert c.rates(0.5)[HARD] == 1e-6 and c.rates(0.5)[LIGHT] == 0.0


def test_smooth_interpolates_between_midpoints():
    c = MountainCurriculum(smooth=True)
    mids = [0.075, 0.25, 0.5, 0.75, 0.925]
    for mid, (_, _, w) in zip(mids, DESIGN_PHASES):
        assert tuple(c.weights(mid)) == pytest.approx(w)
    assert tuple(c.weights(0.0)) == (1, 2, 3) and tuple(c.weights(1.0)) == (1, 2, 3)
    # a quarter of the way from WARMUP's midpoint to ASCENT's
    p = 0.075 + 0.25 * (0.25 - 0.075)
    assert tuple(c.weights(p)) == pytest.approx((1.25, 2.25, 2.5))
    # continuous: no jump larger than the steepest slope allows on a fine grid
    grid = np.linspace(0, 1, 2001)
    w = np.array([tuple(c.weights(float(x))) for x in grid])
    assert np.abs(np.diff(w, axis=0)).max() < 3 / 0.175 * (grid[1] - grid[0]) + 1e-9
    # the piecewise curriculum jumps at phase ends
    piecewise = MountainCurriculum()
    assert piecewise.weights(0.1499) != piecewise.weights(0.15)


def test_lr_multiplier_reported_piecewise_and_smooth():
    phases = [CurriculumPhase("A", 0.5, 1, 1, 1, 2.0), CurriculumPhase("B", 1.0, 1, 1, 1, 0.5)]
    assert MountainCurriculum(phases).lr_multiplier(0.25) == 2.0
    assert MountainCurriculum(phases).lr_multiplier(0.5) == 0.5
    smooth = MountainCurriculum(phases, smooth=True)
    assert smooth.lr_multiplier(0.5) == pytest.approx(1.25)  # halfway between midpoints 0.25 and 0.75
    assert smooth.lr_multiplier(0.1) == 2.0 and smooth.lr_multiplier(0.9) == 0.5


def test_progress():
    assert progress(0, 10) == 0.0 and progress(5, 10) == 0.5 and progress(10, 10) == 1.0
    assert progress(np.int64(3), 4) == 0.75
    with pytest.raises(ValueError, match="total_steps"):
        progress(0, 0)
    with pytest.raises(ValueError, match="step"):
        progress(11, 10)
    with pytest.raises(ValueError, match="step"):
        progress(-1, 10)
    with pytest.raises(TypeError, match="step"):
        progress(0.5, 10)


@pytest.mark.parametrize("p", [-0.01, 1.01, math.nan, math.inf])
def test_progress_outside_unit_interval_refused(p):
    c = MountainCurriculum()
    for method in (c.weights, c.phase, c.lr_multiplier, c.rates):
        with pytest.raises(ValueError, match="progress must be in"):
            method(p)


def test_progress_type_refused():
    with pytest.raises(TypeError, match="p must be a real number"):
        MountainCurriculum().weights("0.5")


@pytest.mark.parametrize(
    "phases, kwargs, message",
    [
        ([], {}, "at least one phase"),
        ([("A", 0.5, 1, 1, 1), ("B", 0.5, 1, 1, 1), ("C", 1.0, 1, 1, 1)], {}, r"phase 1 \(B\): end"),
        ([("A", 0.6, 1, 1, 1), ("B", 0.4, 1, 1, 1)], {}, r"phase 1 \(B\): end"),
        ([("A", 0.5, 1, 1, 1)], {}, "last phase must end at 1.0"),
        ([("A", 1.0, -1, 1, 1)], {}, "weight hard"),
        ([("A", 1.0, 1, math.nan, 1)], {}, "weight focus"),
        ([("A", 1.0, 1, 1, math.inf)], {}, "weight light"),
        ([("A", 1.0, 0, 0, 0)], {}, "all zero"),
        ([("A", 1.0, 1, 1, 1, -0.5)], {}, "lr_multiplier"),
        (None, {"max_rate": 6.0}, "max_rate"),
        (None, {"max_rate": 0.5}, "max_rate"),
        (None, {"min_rate": -0.1}, "min_rate"),
        (None, {"min_rate": 1.5}, "min_rate"),
        (None, {"min_rate": 1e-9}, "min_rate"),
        (None, {"freeze_revisit": 1.5}, "freeze_revisit"),
        (None, {"freeze_revisit": math.nan}, "freeze_revisit"),
    ],
)
def test_bad_configurations_refused(phases, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MountainCurriculum(phases, **kwargs)


def test_bad_phase_types_refused():
    with pytest.raises(TypeError, match=r"phases\[0\]"):
        MountainCurriculum([("A", 1.0)])
    with pytest.raises(TypeError, match=r"phases\[0\].name"):
        MountainCurriculum([(3, 1.0, 1, 1, 1)])
    with pytest.raises(TypeError, match=r"phases\[0\].hard"):
        MountainCurriculum([("A", 1.0, "1", 1, 1)])
    with pytest.raises(TypeError, match="smooth"):
        MountainCurriculum(smooth=1)
