"""A tiny stage-2 config for the trainer tests: the demo recipe shrunk to seconds."""

import os

from finevit.config import load_config
from tiny_runs import run_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "stage2", "demo_cpu.yaml")


def tiny_overrides(corpus_dir, tokenizer, run_dir, **extra) -> list[str]:
    """56^2..112^2 images (tiny_runs.py), 256-patch / 192-token rows, a 2-layer encoder and a 2-layer LLM."""
    base = {
        "model.vision.num_layers": 2, "model.vision.hidden_size": 32, "model.vision.num_heads": 2,
        "model.vision.ffn_hidden_size": 64, "model.vision.init_from": "null",
        "model.llm.vocab_size": 512, "model.llm.num_layers": 2, "model.llm.hidden_size": 64,
        "model.llm.num_heads": 4, "model.llm.num_kv_heads": 2, "model.llm.ffn_hidden_size": 96,
        "model.llm.mrope_section": "[2, 3, 3]", "model.llm.init_from": "null", "parallel.tensor": 1,
        "data.corpora": f"[{{path: {corpus_dir}/finecap/train}}]", "data.llm.tokenizer": tokenizer,
        "data.llm.max_tokens": 192, "data.llm.max_turns": 3,
        "eval.corpora": f"[{{path: {corpus_dir}/finecap/heldout}}]", "eval.max_samples": 8,
        "eval.max_new_tokens": 12, "schedule.train_samples": 48,
        "schedule.phases": "[{start_samples: 0, max_pixels: 6272, freeze: [vision, llm]},"
                           " {start_samples: 24, max_pixels: 12544, freeze: []}]",
        **run_settings(run_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(corpus_dir, tokenizer, run_dir, **extra):
    return load_config(DEMO_CONFIG, tiny_overrides(corpus_dir, tokenizer, run_dir, **extra))
