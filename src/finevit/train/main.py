"""`finevit train` / `finevit eval`: load and validate the config, then run the task.

Launch with torchrun or srun (one process per GPU; see launch/); a single process also works.
"""

import logging
import os
import sys
from typing import Optional

from finevit.config import Config, ConfigError, load_config
from finevit.train.task import check_config, task_class

log = logging.getLogger("finevit.train")


def _setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every parameter at INFO


def load(config: str, overrides: list[str], task: Optional[str] = None) -> Optional[Config]:
    """The validated config (checked against the launcher's world size and by its task; `task`
    overrides the config's), or None after logging one line per problem."""
    _setup_logging()
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg = load_config(config, overrides + ([f"task={task}"] if task else []))
        check_config(cfg, world)
        return cfg
    except ConfigError as e:
        for problem in e.problems:
            log.error("config: %s", problem)
        return None


def _setup(trainer, evaluating: bool = False):
    """The trainer set up, or None after one line saying which input cannot be used."""
    from finevit.checkpointing.files import CheckpointError
    from finevit.convert.qwen2_5_vl import ConversionError
    from finevit.data.corpus import CorpusError
    from finevit.train.preflight import InputError
    from finevit.train.trainer import TrainingError

    try:
        return trainer.setup(evaluating)
    except InputError as e:
        for problem in e.problems:
            log.error("%s", problem)
    except CorpusError as e:
        log.error("data: %s", e)
    except ConversionError as e:
        log.error("model: %s", e)
    except CheckpointError as e:
        log.error("checkpoint: %s", e)
    except TrainingError as e:
        log.error("%s", e)
    return None

def train(config: str, overrides: list[str], task: Optional[str] = None) -> int:
    cfg = load(config, overrides, task)
    if cfg is None:
        return 2
    from finevit.train.trainer import Trainer, TrainingError

    trainer = _setup(Trainer(cfg, task_class(cfg.task)(cfg)))
    if trainer is None:
        return 2
    try:
        state = trainer.train()
    except TrainingError as e:
        log.error("%s", e)
        return 1
    finally:
        trainer.close()
    log.info("done: step %d, %d samples, %d skipped steps", state.step, state.consumed_samples,
             state.skipped_steps)
    return 0


def evaluate(config: str, overrides: list[str], task: Optional[str] = None) -> int:
    """Evaluate the latest checkpoint of the run (or checkpoint.load) on eval.corpora."""
    cfg = load(config, overrides, task)
    if cfg is None:
        return 2
    if not cfg.eval.corpora:
        log.error("config: eval.corpora is empty: name the held-out corpora to evaluate on")
        return 2
    from finevit.train.trainer import Trainer

    trainer = _setup(Trainer(cfg, task_class(cfg.task)(cfg)), evaluating=True)
    if trainer is None:
        return 2
    try:
        result = trainer.evaluate()
    finally:
        trainer.close()
    if result is not None and trainer.reporting:
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0
