#!/usr/bin/env python
"""Stage-2 step anatomy (a benchmark, not a test).

A single-process stage-2 run on a generated demo finecap corpus with a tokenizer trained on it,
reporting per step the time waiting for data, in forward+backward, and in the optimizer step; the
encoder's (ViT + projector) share of forward+backward, timed alone on the step's images (forward
and backward of its output), the rest being the LLM's; answer tokens (the loss's tokens) and LLM
tokens per second, padding; with CUDA also the model TFLOP/s and MFU.

Default model: on CPU the demo recipe's towers (configs/stage2/demo_cpu.yaml); with CUDA the 0.9b
encoder + Qwen2.5-1.5B's shape (random weights) at a 1008^2 budget in bf16.

Example:  python bench/stage2_step.py --steps 20
"""

import argparse
import os
import sys
import tempfile
import time

import torch


def corpus(work: str) -> tuple[str, str]:
    """A demo finecap corpus and an LLM tokenizer trained on it."""
    from finevit.data.corpus import open_corpus
    from finevit.data.demo import write_demo_corpus
    from finevit.data.llm_tokenizer import train_llm_tokenizer
    from finevit.data.tokenizer import corpus_texts

    write_demo_corpus(work, seed=0, train=400, heldout=8, schemas=("finecap",))
    c = open_corpus(os.path.join(work, "finecap", "train"))
    texts = list(corpus_texts(c))
    c.close()
    return os.path.join(work, "finecap", "train"), train_llm_tokenizer(texts, os.path.join(work, "tok"), 1024)


def time_encoder(trainer, batches, reps: int = 3) -> float:
    """Seconds per step of the encoder + projector alone (forward, and backward of its output)."""
    vision = trainer.chunks[0].vision
    device = next(vision.parameters()).device
    total = 0.0
    for _ in range(reps):
        for batch in batches:
            pixels = batch.pixel_values.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = vision(pixels, batch.grid_thw, batch.max_tokens)
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            total += time.perf_counter() - t0
    return total / reps


def step_split(steps: int, cuda: bool) -> None:
    from finevit.config import load_config
    from finevit.train.stage2 import Stage2Task
    from finevit.train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="finevit_bench_")
    train, tokenizer = corpus(work)
    base = "configs/stage2/finevit_0.9b_qwen2.5_1.5b.yaml" if cuda else "configs/stage2/demo_cpu.yaml"
    overrides = [f"data.corpora=[{{path: {train}}}]", f"data.llm.tokenizer={tokenizer}", "model.vision.init_from=null",
                 "model.llm.init_from=null", "model.llm.vocab_size=1024", "eval.corpora=[]", "parallel.tensor=1",
                 "parallel.sequence_parallel=false", "schedule.phases=[]", "schedule.train_samples=100000000",
                 "schedule.warmup_samples=10", f"logging.run_dir={work}/run", "logging.tensorboard=false",
                 "checkpoint.save_interval=1000000", "data.num_workers=2", "parallel.overlap_grad_reduce=false",
                 "parallel.overlap_param_gather=false"]
    overrides += [] if cuda else ["precision.dtype=fp32"]
    cfg = load_config(os.path.join(root, base), overrides)
    trainer = Trainer(cfg, Stage2Task(cfg)).setup()
    for _ in range(3):  # warm-up: allocation, kernel selection
        trainer.train_step()
    trainer.timers.pop()
    t0, totals = time.perf_counter(), {"flops": 0.0, "images": 0, "tokens": 0, "slots": 0, "answer_tokens": 0}
    for _ in range(steps):
        out = trainer.train_step()
        for k in totals:
            totals[k] += out[k]
    wall = time.perf_counter() - t0
    times = trainer.timers.pop()
    batches = [next(trainer.loader) for _ in range(cfg.schedule.micro_batches_per_step)]
    encoder = time_encoder(trainer, batches)
    trainer.close()
    fb = times["forward_backward"] / steps
    print(f"# stage-2 step split: {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, {steps} steps, "
          f"{cfg.data.llm.max_tokens} LLM tokens / {cfg.data.max_tokens} ViT patches per row, "
          f"{cfg.schedule.micro_batches_per_step} row(s) per step")
    for k, v in times.items():
        print(f"  {k:>20}: {v / steps * 1e3:9.1f} ms/step  ({v / wall:5.1%})")
    print(f"  {'of which encoder':>20}: {encoder * 1e3:9.1f} ms/step  ({encoder / fb:5.1%} of forward_backward, "
          "timed alone on a step's images)")
    print(f"  {'of which LLM':>20}: {(fb - encoder) * 1e3:9.1f} ms/step  (the rest)")
    print(f"  {'answer tokens/s':>20}: {totals['answer_tokens'] / wall:9.1f}")
    print(f"  {'LLM tokens/s':>20}: {totals['tokens'] / wall:9.1f}  (padding {1 - totals['tokens'] / totals['slots']:.1%})")
    print(f"  {'images/s':>20}: {totals['images'] / wall:9.1f}")
    print(f"  {'model TFLOP/s':>20}: {totals['flops'] / wall / 1e12:9.4f}")
    if cuda:
        from finevit.train.metrics import peak_tflops

        peak = peak_tflops()
        if peak:
            print(f"  {'MFU':>20}: {totals['flops'] / wall / 1e12 / peak:9.1%} (peak {peak} TFLOP/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    os.environ.setdefault("MASTER_PORT", "29518")
    step_split(args.steps, torch.cuda.is_available())
    return 0


if __name__ == "__main__":
    sys.exit(main())
