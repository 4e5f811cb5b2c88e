"""LR schedule values at key points, per-group multipliers, and progressive phase resolution."""

import math

import pytest

from finevit.config import ConfigError, DataConfig, OptimizerConfig, PhaseConfig, ScheduleConfig
from finevit.train.schedules import LRScheduler, lr_at, phase_at, resolve_phases

OPT = OptimizerConfig(lr=1.0, min_lr=0.1, weight_decay=0.05)


def sched(style: str, **kw) -> ScheduleConfig:
    return ScheduleConfig(train_samples=1000, warmup_samples=100,
                          decay_style=style, **kw)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_from_zero(style):
    s = sched(style)
    assert lr_at(0, OPT, s) == 0.0
    assert lr_at(50, OPT, s) == pytest.approx(0.5)
    assert lr_at(100, OPT, s) == pytest.approx(1.0)


def test_cosine():
    s = sched("cosine")
    assert lr_at(550, OPT, s) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: mean of max and min
    assert lr_at(325, OPT, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1000, OPT, s) == pytest.approx(0.1)
    assert lr_at(5000, OPT, s) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(550, OPT, sched("linear")) == pytest.approx(0.55)
    assert lr_at(1000, OPT, sched("linear")) == pytest.approx(0.1)
    assert lr_at(999, OPT, sched("constant")) == 1.0
    assert lr_at(2000, OPT, sched("constant")) == 1.0


def test_wsd_is_stable_then_decays_linearly_over_the_final_fraction():
    s = sched("wsd", wsd_decay_fraction=0.2)
    assert lr_at(500, OPT, s) == 1.0
    assert lr_at(800, OPT, s) == 1.0  # decay starts at 1000 - 0.2 * 1000
    assert lr_at(900, OPT, s) == pytest.approx(0.55)
    assert lr_at(1000, OPT, s) == pytest.approx(0.1)


def test_no_warmup_and_group_bounds():
    s = ScheduleConfig(train_samples=100, warmup_samples=0, decay_style="linear")
    assert lr_at(0, OPT, s) == 1.0
    assert lr_at(50, OPT, s, max_lr=2.0, min_lr=0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="negative"):
        lr_at(-1, OPT, s)


class FakeOptimizer:
    def __init__(self, groups):
        self.param_groups = groups


def test_scheduler_applies_multipliers_and_weight_decay():
    s = sched("linear")
    groups = [{"lr_mult": 1.0, "wd_mult": 1.0, "max_lr": 1.0, "min_lr": 0.1},
              {"lr_mult": 0.1, "wd_mult": 0.0, "max_lr": 1.0, "min_lr": 0.1},
              {"max_lr": 2.0, "min_lr": 0.2}]  # a megatron-style decoupled LR group
    scheduler = LRScheduler(FakeOptimizer(groups), OPT, s)
    # Evaluated at the end of the step's batch: step 1 (0 consumed) already has a warmup LR.
    assert scheduler.apply(0, 10) == pytest.approx(0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.01, 0.2])
    assert [g["weight_decay"] for g in groups] == pytest.approx([0.05, 0.0, 0.05])
    assert scheduler.apply(990, 25) == pytest.approx(0.1)  # the last step runs at min_lr
    assert groups[2]["lr"] == pytest.approx(0.2)
    scheduler.apply(530, 10)
    state = scheduler.state_dict()
    fresh = LRScheduler(FakeOptimizer([dict(g) for g in groups]), OPT, s)
    fresh.load_state_dict(state)
    assert fresh.last_lr == scheduler.last_lr and fresh.samples == 540
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in groups]


DATA = DataConfig(min_pixels=100, max_pixels=400, max_text_len=64)


def test_no_phases_gives_one_phase_from_the_data_config():
    (only,) = resolve_phases(ScheduleConfig(), DATA)
    assert only.start_samples == 0
    assert (only.min_pixels, only.max_pixels, only.max_text_len) == (100, 400, 64)
    assert only.freeze == ()
    assert phase_at([only], 10**9) == (0, only)


def test_phases_inherit_the_previous_phase():
    s = ScheduleConfig(train_samples=1000, phases=[
        PhaseConfig(start_samples=0, name="low", max_pixels=200, freeze=["text"]),
        PhaseConfig(start_samples=300, max_text_len=128),
        PhaseConfig(start_samples=600, name="high", max_pixels=800, freeze=[]),
    ])
    p = resolve_phases(s, DATA)
    assert [x.name for x in p] == ["low", "phase1", "high"]
    assert [x.max_pixels for x in p] == [200, 200, 800]
    assert [x.min_pixels for x in p] == [100, 100, 100]
    assert [x.max_text_len for x in p] == [64, 128, 128]
    assert [x.freeze for x in p] == [("text",), ("text",), ()]
    assert [x.index for x in p] == [0, 1, 2]


def test_phase_at_boundaries():
    s = ScheduleConfig(train_samples=1000, phases=[PhaseConfig(start_samples=0),
                                                    PhaseConfig(start_samples=300)])
    p = resolve_phases(s, DATA)
    assert phase_at(p, 0)[0] == 0
    assert phase_at(p, 299)[0] == 0
    assert phase_at(p, 300)[0] == 1
    assert phase_at(p, 5000)[0] == 1
    with pytest.raises(ValueError):
        phase_at(p, -1)


@pytest.mark.parametrize("phases,message", [
    ([PhaseConfig(start_samples=5)], "must be 0"),
    ([PhaseConfig(start_samples=0), PhaseConfig(start_samples=0)], "strictly increasing"),
    ([PhaseConfig(start_samples=0), PhaseConfig(start_samples=500), PhaseConfig(start_samples=200)],
     "must exceed the previous phase's 500"),
    ([PhaseConfig(start_samples=0), PhaseConfig(start_samples=1000)], "would never run"),
    ([PhaseConfig(start_samples=0, min_pixels=500)], "min_pixels <= max_pixels"),
    ([PhaseConfig(start_samples=0, max_text_len=0)], "max_text_len=0"),
    ([PhaseConfig(start_samples=0, freeze=["text", "vision"])], r"freezes every tower \(vision, text\)"),
    ([PhaseConfig(start_samples=0, freeze=["txt"])], r"\.freeze names txt, not a tower of this task"),
])
def test_phase_validation_errors(phases, message):
    with pytest.raises(ConfigError, match=message):
        resolve_phases(ScheduleConfig(train_samples=1000, phases=phases), DATA, towers=("vision", "text"))


def test_every_problem_is_reported_with_its_phase():
    s = ScheduleConfig(train_samples=1000, phases=[PhaseConfig(start_samples=3, name="a"),
                                                    PhaseConfig(start_samples=2, max_text_len=-1)])
    with pytest.raises(ConfigError) as err:
        resolve_phases(s, DATA)
    assert len(err.value.problems) == 3
    assert "schedule.phases[0] ('a')" in err.value.problems[0]
    assert "schedule.phases[1] ('phase1')" in err.value.problems[1]
