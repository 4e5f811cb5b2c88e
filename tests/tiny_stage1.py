"""A tiny stage-1 config for the trainer tests: the demo recipe shrunk to seconds."""

import os

from finevit.config import load_config
from tiny_runs import run_settings, train_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "stage1", "demo_cpu.yaml")


def tiny_overrides(corpus_dir, tokenizer, run_dir, **extra) -> list[str]:
    """The demo recipe shrunk to seconds: 56^2..112^2 images, 256-token batches, a tiny model."""
    base = {
        "model.vision.num_layers": 2, "model.vision.hidden_size": 32, "model.vision.num_heads": 2,
        "model.vision.ffn_hidden_size": 64, "model.text.vocab_size": 384, "model.text.num_layers": 1,
        "model.text.hidden_size": 32, "model.text.num_heads": 2, "model.text.ffn_hidden_size": 64,
        "model.text.max_positions": 64, "model.contrastive.embed_dim": 32,
        "model.contrastive.pool_heads": 2, "parallel.tensor": 1,
        "data.corpora": f"[{{path: {corpus_dir}/recaption/train}}]", "data.tokenizer": tokenizer,
        "data.max_text_len": 64, "eval.corpora": f"[{{path: {corpus_dir}/recaption/heldout}}]",
        "schedule.train_samples": 80,
        "schedule.phases": "[{start_samples: 0, max_pixels: 6272, max_text_len: 32},"
                           " {start_samples: 40, max_pixels: 12544, max_text_len: 64}]",
        **run_settings(run_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(corpus_dir, tokenizer, run_dir, **extra):
    return load_config(DEMO_CONFIG, tiny_overrides(corpus_dir, tokenizer, run_dir, **extra))


def stage1_run(corpus_dir, tokenizer, run_dir, steps: int = 2) -> dict:
    """A short stage-1 run in this process (the `dist` fixture's world), e.g. for stage 2 to start
    from; returns its encoder's weights."""
    from finevit.train.stage1 import Stage1Task

    cfg = tiny_config(corpus_dir, tokenizer, run_dir, **{"schedule.stop_after_steps": steps})
    trainer = train_in_process(cfg, Stage1Task)
    return {n: p.detach().clone() for n, p in trainer.chunks[0].vision.named_parameters()}
