"""Typed configuration: dataclasses per component, YAML + dotted overrides, one validation pass."""

from finevit.config.data import DataConfig
from finevit.config.errors import ConfigError
from finevit.config.load import load_config, parse_overrides, to_yaml
from finevit.config.model import ContrastiveConfig, ModelConfig, TextConfig, VisionConfig
from finevit.config.parallel import ParallelConfig
from finevit.config.schema import Config
from finevit.config.train import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    PhaseConfig,
    PrecisionConfig,
    ScheduleConfig,
)
from finevit.config.validate import validate

__all__ = [
    "CheckpointConfig", "Config", "ContrastiveConfig", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "PhaseConfig", "PrecisionConfig", "ScheduleConfig", "TextConfig", "VisionConfig",
    "load_config", "parse_overrides", "to_yaml", "validate",
]
