"""Learning-rate schedule and progressive training phases, both as functions of consumed samples.

Everything here is keyed by samples, not steps: the global batch size may change between runs
(or on resume with a different layout) and the schedule must not move when it does. The LR and
the active phase are pure functions of the sample count, so resuming needs no scheduler state
beyond the consumed samples that the trainer checkpoints anyway.

megatron's OptimizerParamScheduler is not used: it ignores a group's `lr_mult`, starts the
first step at LR 0 during warmup, and has no pure function a test or a plot can call. We keep
its per-group conventions, so groups built by `get_megatron_optimizer` behave as in megatron:
`max_lr`/`min_lr` set the group's schedule, `lr_mult` scales it, and `wd_mult` scales weight
decay (megatron applies `wd_mult`, 0 where train/optim.py:takes_weight_decay says so, only in
the scheduler; a replacement must do the same or those parameters decay).
"""

import bisect
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Optional

from finevit.config import ConfigError, DataConfig, OptimizerConfig, ScheduleConfig

logger = logging.getLogger(__name__)


def lr_at(consumed_samples: float, optim: OptimizerConfig, sched: ScheduleConfig,
          max_lr: Optional[float] = None, min_lr: Optional[float] = None) -> float:
    """The learning rate once `consumed_samples` samples have been consumed.

    Linear warmup from 0 to max_lr over warmup_samples, then the decay style down to min_lr at
    train_samples (min_lr beyond it). `max_lr`/`min_lr` default to the optimizer config's; a
    parameter group may carry its own.
    """
    hi = optim.lr if max_lr is None else max_lr
    lo = optim.min_lr if min_lr is None else min_lr
    s, total, warmup = float(consumed_samples), sched.train_samples, sched.warmup_samples
    if s < 0:
        raise ValueError(f"consumed_samples={consumed_samples} must not be negative")
    if warmup > 0 and s < warmup:
        return hi * s / warmup
    style = sched.decay_style
    if style == "constant":
        return hi
    if s >= total:
        return lo
    if style == "wsd":
        # Stable at max_lr, then linear to min_lr over the final fraction (never inside warmup).
        start = max(warmup, total - sched.wsd_decay_fraction * total)
        if s <= start:
            return hi
        return lo + (hi - lo) * (1.0 - (s - start) / (total - start))
    progress = (s - warmup) / (total - warmup)
    if style == "cosine":
        return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "linear":
        return lo + (hi - lo) * (1.0 - progress)
    raise ValueError(f"unknown decay_style '{style}' (cosine | linear | constant | wsd)")


class LRScheduler:
    """Sets `lr` and `weight_decay` on every parameter group of a (megatron) optimizer.

    Call `apply(consumed_before, batch_samples)` before each optimizer step. The LR is evaluated
    at the end of the step's batch (a step's image count varies with token-budget packing, so the
    caller passes it): the first step then already trains (warmup from 0 would waste it) and the
    step that completes train_samples runs at min_lr.
    """

    def __init__(self, optimizer, optim: OptimizerConfig, sched: ScheduleConfig):
        self.optimizer, self.optim, self.sched = optimizer, optim, sched
        self.samples = 0  # where the LR was last evaluated
        self.last_lr = 0.0

    def group_lr(self, group: dict, samples: float) -> float:
        lr = lr_at(samples, self.optim, self.sched, group.get("max_lr"), group.get("min_lr"))
        return lr * group.get("lr_mult", 1.0)

    def apply(self, consumed_before: int, batch_samples: int = 0) -> float:
        """Set this step's LR on all groups; returns the base LR (multiplier 1) for logging."""
        self.samples = min(consumed_before + batch_samples, self.sched.train_samples)
        for group in self.optimizer.param_groups:
            lr = self.group_lr(group, self.samples)
            if hasattr(group.get("lr"), "fill_"):  # a tensor LR (CUDA-graph capturable Adam)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            group["weight_decay"] = self.optim.weight_decay * group.get("wd_mult", 1.0)
        self.last_lr = lr_at(self.samples, self.optim, self.sched)
        return self.last_lr

    def state_dict(self) -> dict:
        """The schedule is a pure function of samples; this records what produced the last LR."""
        return {"samples": self.samples, "last_lr": self.last_lr,
                "lr": self.optim.lr, "min_lr": self.optim.min_lr,
                "train_samples": self.sched.train_samples,
                "warmup_samples": self.sched.warmup_samples,
                "decay_style": self.sched.decay_style}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; a changed schedule (e.g. an extended run) is allowed, logged."""
        changed = {k: (state[k], v) for k, v in self.state_dict().items()
                   if k in state and k not in ("samples", "last_lr") and state[k] != v}
        if changed:
            logger.warning("LR schedule differs from the checkpoint's (saved, now): %s", changed)
        self.apply(int(state["samples"]))


@dataclass(frozen=True)
class ResolvedPhase:
    """One progressive phase with every setting filled in."""

    index: int
    name: str
    start_samples: int
    min_pixels: int
    max_pixels: int
    max_text_len: int
    freeze: tuple = ()  # frozen towers


INHERITED = ("min_pixels", "max_pixels", "max_text_len", "freeze")


def resolve_phases(sched: ScheduleConfig, data: DataConfig, towers: Optional[tuple] = None) -> list[ResolvedPhase]:
    """Fill unset phase fields from the previous phase (the first from `data`) and validate
    (frozen towers against `towers`, the task's, when given).

    Phases must be listed in order: inheritance follows the listed order, so sorting them here
    would silently change what an unset field means. No phases: one phase with the data settings.
    """
    prev = {"min_pixels": data.min_pixels, "max_pixels": data.max_pixels,
            "max_text_len": data.max_text_len, "freeze": ()}
    configs = sched.phases or [None]
    resolved, problems = [], []
    for i, phase in enumerate(configs):
        values = dict(prev)
        start, name = 0, "main"
        if phase is not None:
            values.update({k: getattr(phase, k) for k in INHERITED
                           if getattr(phase, k) is not None})
            values["freeze"] = tuple(values["freeze"])
            start, name = phase.start_samples, phase.name or f"phase{i}"
        where = f"schedule.phases[{i}] ('{name}')"
        problems += _phase_problems(where, i, start, values, resolved, sched, towers)
        resolved.append(ResolvedPhase(index=i, name=name, start_samples=start, **values))
        prev = values
    if problems:
        raise ConfigError(problems)
    return resolved


def _phase_problems(where: str, i: int, start: int, values: dict,
                    earlier: list[ResolvedPhase], sched: ScheduleConfig, towers: Optional[tuple]) -> list[str]:
    out = []
    if i == 0 and start != 0:
        out.append(f"{where}.start_samples={start} must be 0: the first phase starts training")
    if earlier and start <= earlier[-1].start_samples:
        out.append(f"{where}.start_samples={start} must exceed the previous phase's "
                   f"{earlier[-1].start_samples} (list phases in order, strictly increasing)")
    if i > 0 and start >= sched.train_samples:
        out.append(f"{where}.start_samples={start} is not below schedule.train_samples="
                   f"{sched.train_samples}, so the phase would never run")
    if not 0 < values["min_pixels"] <= values["max_pixels"]:
        out.append(f"{where}: min_pixels={values['min_pixels']} and max_pixels="
                   f"{values['max_pixels']} must satisfy 0 < min_pixels <= max_pixels")
    if values["max_text_len"] < 1:
        out.append(f"{where}.max_text_len={values['max_text_len']} must be a positive integer")
    if towers is not None:
        unknown = [t for t in values["freeze"] if t not in towers]
        if unknown:
            out.append(f"{where}.freeze names {', '.join(unknown)}, not a tower of this task "
                       f"({', '.join(towers)})")
        elif set(towers) <= set(values["freeze"]):
            out.append(f"{where} freezes every tower ({', '.join(towers)}): nothing would train")
    return out


def phase_at(phases: list[ResolvedPhase], consumed_samples: int) -> tuple[int, ResolvedPhase]:
    """(index, phase) in force once `consumed_samples` samples have been consumed."""
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples} must not be negative")
    if not phases:
        raise ValueError("no phases: call resolve_phases first")
    i = bisect.bisect_right([p.start_samples for p in phases], consumed_samples) - 1
    return i, phases[i]


def phase_summary(phase: ResolvedPhase) -> dict:
    """A plain dict for logs and checkpoints."""
    return dataclasses.asdict(phase)
