#!/usr/bin/env python
"""Stage-1 step anatomy and contrastive-loss memory (a benchmark, not a test).

1. Step time split: a single-process stage-1 run on a generated demo corpus, reporting per step
   the time waiting for data, in forward+backward, in the optimizer step, and the loss's share
   of forward+backward (timed separately on the step's embeddings); with CUDA also the model
   TFLOP/s and MFU (default model: finevit-0.9b at a 448^2 budget with the TE spec when
   installed; on CPU a small tower).
2. Loss memory at a growing global batch: one rank's share of the SigLIP loss with 256 local
   pairs against B gathered captions (B = 256 x simulated ranks), as the peak bytes of live
   tensors during forward+backward, for the chunked loss, a plain per-rank loss materialising the
   [256, B] logits, and the dense global [B, B] loss a single device would build.

Example:  python bench/stage1_step.py --steps 20
"""

import argparse
import os
import sys
import tempfile
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors produced by aten ops and still alive (storage-deduplicated)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                storage = o.untyped_storage()
                key = storage.data_ptr()
                if key in self.seen or storage.nbytes() == 0:
                    continue
                self.seen.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes


def loss_memory(local: int = 256, dim: int = 1152, ranks=(1, 4, 16, 64), chunk: int = 1024):
    from finevit.models.contrastive import _SigmoidPairSum

    print(f"\n# loss memory: {local} local pairs, d={dim}, chunk {chunk}; peak live MiB in fwd+bwd")
    print(f"{'ranks':>6} {'B':>7} {'chunked':>9} {'per-rank [b,B]':>15} {'dense [B,B]':>12}")
    t, b = torch.tensor(2.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    for r in ranks:
        B = local * r
        row = [r, B]
        for kind in ("chunked", "local", "dense"):
            q = torch.randn(local if kind != "dense" else B, dim, requires_grad=True)
            keys = torch.randn(B, dim, requires_grad=True)
            with LiveBytes() as probe:
                if kind == "chunked":
                    loss = _SigmoidPairSum.apply(q, keys, t, b, 0, chunk)
                else:
                    logits = t.exp() * q @ keys.T + b
                    z = -torch.ones_like(logits)
                    z[torch.arange(q.shape[0]), torch.arange(q.shape[0])] = 1
                    loss = -F.logsigmoid(z * logits).sum()
                loss.backward()
                del loss
            row.append(probe.peak / 2**20)
        print(f"{row[0]:>6} {row[1]:>7} {row[2]:>9.1f} {row[3]:>15.1f} {row[4]:>12.1f}", flush=True)


def time_loss(cfg, n: int, reps: int = 20) -> float:
    """ms of the contrastive loss's forward+backward on n pairs of embeddings (one rank)."""
    from finevit.models.contrastive import ContrastiveLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loss = ContrastiveLoss(cfg.model.contrastive).to(device)
    x = torch.randn(n, cfg.model.contrastive.embed_dim, device=device, requires_grad=True)
    y = torch.randn(n, cfg.model.contrastive.embed_dim, device=device, requires_grad=True)
    for i in range(reps + 2):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss(x, y).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def step_split(steps: int, preset: str, budget: int) -> None:
    from finevit.config import load_config
    from finevit.data.demo import write_demo_corpus
    from finevit.data.corpus import open_corpus
    from finevit.data.tokenizer import corpus_texts, train_sentencepiece
    from finevit.train.stage1 import Stage1Task
    from finevit.train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="finevit_bench_")
    write_demo_corpus(work, seed=0, train=400, heldout=8, schemas=("recaption",))
    corpus = open_corpus(os.path.join(work, "recaption", "train"))
    train_sentencepiece(corpus_texts(corpus), os.path.join(work, "tok.model"), vocab_size=512)
    corpus.close()
    cuda = torch.cuda.is_available()
    base = "configs/stage1/finevit_0.9b.yaml" if preset == "finevit-0.9b" else "configs/stage1/demo_cpu.yaml"
    overrides = [f"data.corpora=[{{path: {work}/recaption/train}}]", f"data.tokenizer={work}/tok.model",
                 "model.text.vocab_size=512", "model.text.init_from=null", "eval.corpora=[]", "parallel.tensor=1",
                 "parallel.sequence_parallel=false", f"data.max_pixels={budget * budget}",
                 f"data.min_pixels={min(budget * budget, 50176)}", "schedule.phases=[]",
                 "schedule.train_samples=100000000", "schedule.warmup_samples=10",
                 f"logging.run_dir={work}/run", "logging.tensorboard=false", "checkpoint.save_interval=1000000",
                 "data.num_workers=2", "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]
    if not cuda:
        overrides += ["precision.dtype=fp32"]
    cfg = load_config(os.path.join(root, base), overrides)
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    for _ in range(3):  # warm-up: allocation, kernel selection
        trainer.train_step()
    trainer.timers.pop()
    t0, flops, images = time.perf_counter(), 0, 0
    for _ in range(steps):
        out = trainer.train_step()
        flops, images = flops + out["flops"], images + out["images"]
    wall = time.perf_counter() - t0
    times = trainer.timers.pop()
    trainer.close()
    print(f"\n# step split: {preset}, budget {budget}^2, {cfg.data.max_tokens} tokens per micro-batch, "
          f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, {steps} steps")
    for k, v in times.items():
        print(f"  {k:>18}: {v / steps * 1e3:9.1f} ms/step  ({v / wall:5.1%})")
    loss_ms = time_loss(cfg, max(1, images // steps))
    print(f"  {'of which loss':>18}: {loss_ms:9.1f} ms/step  ({loss_ms / 1e3 * steps / times['forward_backward']:5.1%} "
          "of forward_backward, timed alone on the step's embeddings)")
    print(f"  {'images/s':>18}: {images / wall:9.1f}")
    print(f"  {'model TFLOP/s':>18}: {flops / wall / 1e12:9.3f}")
    if cuda:
        from finevit.train.metrics import peak_tflops

        peak = peak_tflops()
        if peak:
            print(f"  {'MFU':>18}: {flops / wall / 1e12 / peak:9.1%} (peak {peak} TFLOP/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--preset", choices=["demo", "finevit-0.9b"], default=None,
                   help="default finevit-0.9b with CUDA, the demo tower without")
    p.add_argument("--budget", type=int, default=None, help="max pixel side (default 448 GPU / 224 CPU)")
    p.add_argument("--skip-step", action="store_true", help="only the loss-memory table")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    loss_memory()
    if not args.skip_step:
        os.environ.setdefault("MASTER_PORT", "29517")
        step_split(args.steps, args.preset or ("finevit-0.9b" if cuda else "demo"),
                   args.budget or (448 if cuda else 224))
    return 0


if __name__ == "__main__":
    sys.exit(main())
