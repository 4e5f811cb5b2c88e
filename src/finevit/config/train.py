"""Optimizer, LR schedule, precision, checkpoint and logging configuration."""

from dataclasses import dataclass, field
from typing import Optional

from finevit.config.data import CorpusConfig


@dataclass
class OptimizerConfig:
    name: str = "adam"  # AdamW-style decoupled weight decay ("adam" in megatron's naming)
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    # LR multiplier per tower, by the task's tower names (stage 1: vision, text, loss; stage 2:
    # vision, projector, llm); towers not named keep 1.0. E.g. {text: 0.1} for a SigLIP2 import.
    lr_mult: dict[str, float] = field(default_factory=dict)
    # Only linear layers' matrices decay (big_vision's SigLIP rule): norms, biases, embedding
    # tables, the pooling probe and the loss's temperature/bias do not. False: everything decays.
    decay_matrices_only: bool = True


@dataclass
class PhaseConfig:
    """One stage of the progressive schedule, in force from `start_samples` consumed on.

    Unset (null) fields keep the previous phase's value (the first phase's fall back to `data`).
    """

    start_samples: int = 0
    name: str = ""
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_text_len: Optional[int] = None
    # Towers frozen in this phase, by the task's tower names ([] unfreezes all); null keeps the
    # previous phase's. A frozen tower gets no update (LR 0, no gradient) and can be unfrozen later.
    freeze: Optional[list[str]] = None


@dataclass
class ScheduleConfig:
    train_samples: int = 1_000_000
    # Packed micro-batches per data-parallel rank per optimizer step (gradient accumulation; with
    # pipeline parallelism also the pipeline's micro-batches). An image count per step cannot be
    # fixed with token-budget packing: a step holds micro_batches_per_step x data-parallel size
    # packed sequences of data.max_tokens tokens, and train_samples counts the images consumed.
    # With a contrastive loss each micro-batch (across the data-parallel ranks) is its own
    # contrastive group: 4 micro-batches are not one 4x larger batch (see docs/training.md).
    micro_batches_per_step: int = 1
    warmup_samples: int = 10_000
    decay_style: str = "cosine"  # cosine | linear | constant | wsd
    wsd_decay_fraction: float = 0.1  # with decay_style=wsd: final fraction of training that decays
    # The progressive schedule (FineViT stage 1: 336^2 -> 448^2 pixels, 64 -> 256 text tokens,
    # text tower frozen then unfrozen). Empty: one phase with the data settings throughout.
    phases: list[PhaseConfig] = field(default_factory=list)
    # Loss guard: a step with a non-finite loss or gradient norm is skipped (and counted); this
    # many in a row stop the run with a checkpoint and a clear message.
    max_bad_steps_in_a_row: int = 10
    # Stop (with a checkpoint) after this many steps in this process, e.g. to fit a job's time
    # box; the next launch resumes. Null: run to train_samples.
    stop_after_steps: Optional[int] = None


@dataclass
class PrecisionConfig:
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (parameters of the forward/backward)
    seed: int = 1234


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    save_interval: int = 1000  # steps
    keep_last: int = 3
    # A checkpoint to start this run from. The run's own latest checkpoint wins once there is one,
    # so a requeued or relaunched job resumes where it stopped (`finevit eval` evaluates `load`).
    load: Optional[str] = None
    # With `load`: take the model weights alone; optimizer, LR schedule and data start afresh.
    load_weights_only: bool = False
    # Distributed-optimizer state on disk: "fully_reshardable" loads into any TP / PP layout but
    # all-gathers each model shard's state over DP while saving; "dp_reshardable" saves each
    # rank's slice with no communication and loads only into the same TP / PP layout.
    optimizer_format: str = "fully_reshardable"
    # A run directory has one owner (RUN_DIR/owner.lock, see train/run_lock.py). A lock left by a
    # job on another machine is taken over once its heartbeat has not moved for this long.
    owner_stale_s: float = 60.0


@dataclass
class EvalConfig:
    """Held-out evaluation. Stage 1: zero-shot image<->text recall@1/5 on captioned corpora (long
    captions), top-1/5 classification accuracy on labelled ones (schema classify). Stage 2:
    answer-token loss and greedy generated answers on finecap corpora (grounding IoU, exact match
    and token F1)."""

    corpora: list[CorpusConfig] = field(default_factory=list)  # read once per evaluation
    # Prompts for a classify corpus whose manifest brings none; "{}" is the class name.
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    interval: int = 0  # steps between evaluations during training (0: only at the end)
    at_start: bool = False  # also evaluate the untrained (or just resumed) model first
    max_samples: Optional[int] = None  # cap per evaluation (default: the whole held-out split)
    # Stage 2: tokens a generated answer may take (greedy; 0: teacher-forced answer loss only).
    max_new_tokens: int = 48


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    tensorboard: bool = True
