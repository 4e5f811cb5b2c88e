"""What the tiny training runs of every stage share: small images, a run directory that logs every
step, and readers of what a run logged or holds."""

import json


def run_settings(run_dir) -> dict:
    """56^2..112^2 images in 256-patch micro-batches read in-process; every step logged, no
    periodic checkpoint, no TensorBoard."""
    return {"data.min_pixels": 3136, "data.max_pixels": 12544, "data.max_tokens": 256, "data.num_workers": 0,
            "data.pack_lookahead": 8, "eval.at_start": False, "schedule.warmup_samples": 8,
            "checkpoint.save_interval": 1000, "logging.run_dir": str(run_dir), "logging.log_interval": 1,
            "logging.tensorboard": False}


def losses(run_dir) -> dict:
    """step -> (loss, phase, samples) of a run's training log."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: (r["loss"], r["phase"], r["samples"]) for r in rows if r["kind"] == "train"}


def tower_params(trainer, tower: str) -> dict:
    """Copies of this rank's parameters of one tower."""
    return {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()
            if getattr(p, "finevit_tower", None) == tower}


def train_in_process(cfg, task_cls, **save_hooks):
    """Set up, train and close a trainer in this process (the `dist` fixture's world)."""
    from finevit.train.trainer import Trainer

    trainer = Trainer(cfg, task_cls(cfg))
    trainer._save_hooks.update(save_hooks)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def torchrun_train(config: str, args: list, nproc: int, run_dir) -> dict:
    """`finevit train CONFIG ARGS` under torchrun with `nproc` gloo ranks; step -> logged row."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "finevit.cli", "train", config, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if r["kind"] == "train"}
