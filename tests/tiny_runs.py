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
