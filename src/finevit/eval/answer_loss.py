"""Teacher-forced answer-token loss of a VLM on held-out conversations (stage 2).

Each data-parallel rank runs its shard of eval.corpora once (packed like training, through the
pipeline schedule in forward-only mode, at the current phase's resolution); the last pipeline
stage sums token losses and answer tokens, and the sums meet over the DP group at the end, so the
value is the mean over every held-out answer token, whatever the layout.
"""

import dataclasses
from functools import partial
from typing import Optional

import torch

from finevit.config.data import BadSampleConfig
from finevit.eval.passes import eval_pass
from finevit.parallel.schedule import forward_backward


@torch.no_grad()
def answer_loss(cfg, task, chunks: list, pg, phase=None) -> Optional[dict]:
    """{"answer_loss", "answer_tokens", "samples"} on last-stage ranks, None elsewhere. Collective."""
    # No bad-sample budget: a rank stopping alone would leave its peers in a collective.
    data = dataclasses.replace(cfg.data, corpora=list(cfg.eval.corpora),
                               bad_samples=BadSampleConfig(max_fraction=1.0, first=0))
    loader = task.build_loader(pg.dp.rank(), pg.dp.size(), data=data, epochs=1)
    if phase is not None:
        loader.set_pixel_budget(phase.min_pixels, phase.max_pixels)
    sums: list = []
    samples, limit = 0, cfg.eval.max_samples
    quota = None if limit is None else limit // pg.dp.size() + int(pg.dp.rank() < limit % pg.dp.size())
    with eval_pass(chunks, loader):
        for batch in loader:
            if quota is not None and samples >= quota:
                break
            samples += batch.num_images
            forward_backward(chunks, [task.inputs(batch)], partial(task.forward, collect=sums), pg,
                             seq_length=task.seq_length, forward_only=True)
    if pg.pp.rank() != pg.pp.size() - 1:
        return None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    totals = torch.tensor([sum(s for s, _ in sums), sum(n for _, n in sums), samples], dtype=torch.float64,
                          device=device)
    torch.distributed.all_reduce(totals, group=pg.dp)
    loss, tokens, images = totals.tolist()
    return {"answer_loss": loss / max(tokens, 1.0), "answer_tokens": int(tokens), "samples": int(images)}
