"""Held-out evaluation of the VLM (stage 2): teacher-forced answer-token loss and greedy generated
answers scored per FineCap task (eval/generate.py).

Each data-parallel rank reads its shard of eval.corpora once (packed like training, at the current
phase's resolution), through the pipeline schedule in forward-only mode; the last pipeline stage
sums token losses, answer tokens and metric values, and the sums meet over the DP group at the
end, so every value is a mean over all held-out answers whatever the layout.
"""

import dataclasses
import json
import os
from functools import partial
from typing import Optional

import torch

from finevit.config.data import BadSampleConfig
from finevit.eval.generate import BOX_TASKS, TEXT_TASKS, generation_scores
from finevit.eval.passes import eval_pass
from finevit.parallel.dist import collective_device
from finevit.parallel.schedule import forward_backward

METRICS = ([f"{t}_{m}" for t in BOX_TASKS for m in ("acc50", "miou")]
           + [f"{t}_{m}" for t in TEXT_TASKS for m in ("exact", "f1")] + ["caption_f1"])


def _batches(loader, quota: Optional[int]):
    """The loader's batches until this rank's share of eval.max_samples is read."""
    samples = 0
    for batch in loader:
        if quota is not None and samples >= quota:
            return
        samples += batch.num_images
        yield batch


@torch.no_grad()
def evaluate_vlm(cfg, task, chunks: list, pg, phase=None, answers_to: Optional[str] = None) -> Optional[dict]:
    """{"answer_loss", "answer_tokens", "samples", <task>_<metric>...} on last-stage ranks, None
    elsewhere. Collective over all ranks. `answers_to`: a JSON-lines file that receives a few
    generated answers per task beside their references (written by the first reporting rank)."""
    # No bad-sample budget: a rank stopping alone would leave its peers in a collective.
    data = dataclasses.replace(cfg.data, corpora=list(cfg.eval.corpora),
                               bad_samples=BadSampleConfig(max_fraction=1.0, first=0))
    loader = task.build_loader(pg.dp.rank(), pg.dp.size(), data=data, epochs=1)
    if phase is not None:
        loader.set_pixel_budget(phase.min_pixels, phase.max_pixels)
    limit, dp = cfg.eval.max_samples, pg.dp.size()
    quota = None if limit is None else limit // dp + int(pg.dp.rank() < limit % dp)
    losses: list = []
    images = 0
    with eval_pass(chunks, loader):
        batches = list(_batches(loader, quota))
        for batch in batches:
            images += batch.num_images
            forward_backward(chunks, [task.inputs(batch)], partial(task.forward, collect=losses), pg,
                             seq_length=task.seq_length, forward_only=True)
        examples: list = []
        sums, counts = ({}, {}) if not cfg.eval.max_new_tokens else generation_scores(
            task, chunks, pg, batches, cfg.eval.max_new_tokens, cfg.data.max_tokens, examples)
    if pg.pp.rank() != pg.pp.size() - 1:
        return None
    if answers_to and examples and pg.dp.rank() == 0 and pg.tp.rank() == 0:
        _write_answers(answers_to, examples)
    device = collective_device()
    totals = torch.tensor([sum(s for s, _ in losses), sum(n for _, n in losses), images]
                          + [sums.get(m, 0.0) for m in METRICS] + [counts.get(m, 0) for m in METRICS],
                          dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals, group=pg.dp)
    values = totals.tolist()
    loss, tokens, samples = values[:3]
    out = {"answer_loss": loss / max(tokens, 1.0), "answer_tokens": int(tokens), "samples": int(samples)}
    metric_sums, metric_counts = values[3:3 + len(METRICS)], values[3 + len(METRICS):]
    out.update({m: s / n for m, s, n in zip(METRICS, metric_sums, metric_counts) if n})
    return out


def _write_answers(path: str, examples: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
