"""Optimizer, LR schedule, precision, checkpoint and logging configuration."""

from dataclasses import dataclass
from typing import Optional


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


@dataclass
class ScheduleConfig:
    train_samples: int = 1_000_000
    global_batch_size: int = 1024  # images per optimizer step
    micro_batch_size: int = 1  # packed sequences per micro-batch (native-resolution packing uses 1)
    warmup_samples: int = 10_000
    decay_style: str = "cosine"  # cosine | linear | constant | wsd
    wsd_decay_fraction: float = 0.1  # with decay_style=wsd: final fraction of training that decays


@dataclass
class PrecisionConfig:
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (parameters of the forward/backward)
    seed: int = 1234


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    save_interval: int = 1000  # steps
    keep_last: int = 3
    load: Optional[str] = None  # explicit checkpoint to start from (else resume from dir if present)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    tensorboard: bool = True
