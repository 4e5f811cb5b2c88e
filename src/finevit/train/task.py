"""The contract between the one training loop and a stage: what a task supplies, and nothing else.

The loop (train/trainer.py) owns process groups, the optimizer and LR schedule, reading batches
from the task's loader and the phase schedule's data settings (pixel budget, text length), per-tower LR multipliers and
freezing (`optimizer.lr_mult`, `schedule.phases[].freeze`, keyed by the task's tower names),
checkpoints and resume, the loss guard, logging. A task supplies the model, how a micro-batch
feeds it and what the loss is, the FLOPs and counts of a batch, what a phase changes in the model,
its loader, its evaluation and its own checkpointed state. Adding a stage is a new class registered in TASKS.
"""

import importlib
from dataclasses import dataclass
from typing import Any, Optional, Protocol


@dataclass(frozen=True)
class Registered:
    """A task as the registry knows it without importing it (checking a config must not pay for
    megatron): where its class is, its towers, and the light module that checks its own config
    sections (`problems(cfg) -> list[str]`, `notes(cfg) -> list[str]`)."""

    cls: str  # "module:Class"
    towers: tuple[str, ...]
    config: Optional[str] = None  # "package.module"


TASKS = {
    "stage1": Registered("finevit.train.stage1:Stage1Task", ("vision", "text", "loss"), "finevit.config.stage1"),
    "stage2": Registered("finevit.train.stage2:Stage2Task", ("vision", "projector", "llm"), "finevit.config.stage2"),
}


class Task(Protocol):
    name: str
    towers: tuple[str, ...]  # parameter groups by tower (parameters carry `finevit_tower`)
    step_metrics: dict[str, str]  # value the loss function logs per micro-batch -> step metric
    step_rates: tuple[str, ...]  # step metrics that are counts: also logged per second (<name>_per_s)

    def preflight(self) -> list[str]:
        """Problems of the task's inputs (init_from directories, its data), before anything starts."""

    def build(self, pg, parallel=None) -> list:
        """This rank's model chunks; `parallel` overrides cfg.parallel (a canonical TP=1, PP=1 copy)."""

    def init_weights(self, chunks: list, state) -> bool:
        """Start a run from scratch (e.g. a tower from a Hugging Face directory); whether weights
        were loaded. May set its entries of `state.task`."""

    def batch_note(self, dp_size: int) -> str:
        """One line at the start of a run: what a step's batch is."""

    def build_loader(self, dp_rank: int, dp_size: int):
        """This data-parallel rank's resumable loader of packed micro-batches (data/loader.py)."""

    @property
    def seq_length(self) -> int:
        """Rows of the tensors sent between pipeline stages (a micro-batch's padded length)."""

    def start_step(self, batches: list) -> None:
        """The step's micro-batches, before any forward (e.g. a per-token loss counts its tokens
        over the data-parallel step here). Collective: every rank calls it."""

    def inputs(self, batch) -> dict:
        """A micro-batch from the loader -> what `forward` takes."""

    def forward(self, chunk, micro_batch: dict, collect: Optional[list] = None) -> tuple[Any, Any]:
        """megatron's forward_step: (output, loss_func(output) -> (loss, logs))."""

    def counts(self, batch) -> tuple[int, int, int, float]:
        """(samples, useful tokens, token slots, model FLOPs) of a micro-batch."""

    def enter_phase(self, phase, chunks: list, optimizer, state) -> None:
        """What a phase changes in the model (the loop has applied its data settings and freezing)."""

    def evaluate(self, chunks: list, pg, phase, step: Optional[int] = None) -> Optional[dict]:
        """Held-out metrics (on the reporting ranks; None elsewhere) at training step `step`. Collective."""

    def extra_metrics(self, chunks: list) -> dict:
        """Values logged with each training report (e.g. a loss temperature)."""


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def task_class(name: str) -> type:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (one of {', '.join(TASKS)})")
    return _resolve(TASKS[name].cls)


def task_problems(cfg) -> list[str]:
    """Config problems of the task (tower names, its phases, its own sections), after
    config.validate's own, or the unknown task name. Imports no model code."""
    if cfg.task not in TASKS:
        return [f"task='{cfg.task}' is not one of {', '.join(TASKS)}"]
    entry = TASKS[cfg.task]
    out = [f"optimizer.lr_mult names {t}, not a tower of {cfg.task} ({', '.join(entry.towers)})"
           for t in cfg.optimizer.lr_mult if t not in entry.towers]
    out += [f"optimizer.lr_mult.{t}={m} must be positive (freeze a tower with schedule.phases[].freeze)"
            for t, m in cfg.optimizer.lr_mult.items() if not m > 0]
    from finevit.config import ConfigError
    from finevit.train.schedules import resolve_phases

    try:
        resolve_phases(cfg.schedule, cfg.data, entry.towers)
    except ConfigError as e:
        out += e.problems
    return out + (importlib.import_module(entry.config).problems(cfg) if entry.config else [])


def task_notes(cfg) -> list[str]:
    """Valid but consequential choices of the task's config, logged once at the start of a run."""
    entry = TASKS.get(cfg.task)
    return importlib.import_module(entry.config).notes(cfg) if entry and entry.config else []


def check_config(cfg, world_size=None) -> None:
    """ConfigError with every problem: the shared sections first, then (when those are sound) the
    task's. What `finevit config show`, `train` and `eval` run."""
    from finevit.config import ConfigError
    from finevit.config.validate import problems

    found = problems(cfg, world_size)
    found += task_problems(cfg) if not found else []
    if found:
        raise ConfigError(found)
