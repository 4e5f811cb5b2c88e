"""The root configuration: one typed dataclass per component."""

from dataclasses import dataclass, field

from finevit.config.data import DataConfig
from finevit.config.model import ModelConfig
from finevit.config.parallel import ParallelConfig
from finevit.config.train import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    PrecisionConfig,
    ScheduleConfig,
)


@dataclass
class Config:
    # What the run trains: a task registered in finevit/train/tasks.py (stage1, ...); `finevit
    # train --task NAME` overrides it.
    task: str = "stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
