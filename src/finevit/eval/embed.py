"""Embed a held-out corpus with the model being trained: the part every zero-shot metric shares.

Every data-parallel rank embeds its shard of the corpora (one pass, packed like training, through
the same pipeline schedule in forward-only mode, at the current phase's resolution and text
length); the last pipeline stage gathers the rows of all DP ranks.
"""

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from finevit.config.data import BadSampleConfig
from finevit.data import PatchSpec, build_loader
from finevit.eval.passes import eval_pass
from finevit.parallel.schedule import forward_backward


@dataclass
class Embedded:
    """Row i is one image: its embedding, its caption's (None for classify corpora), its label."""

    images: torch.Tensor  # [N, d] float32
    texts: Optional[torch.Tensor]  # [N, d] float32
    labels: torch.Tensor  # [N] int64, -1 where the corpus has no labels


@torch.no_grad()
def embed_corpora(cfg, task, chunks: list, pg, corpora: list, phase=None) -> Optional[Embedded]:
    """Embeddings of `corpora` (CorpusConfig list) over all DP ranks; collective over all ranks.

    Returns them on last-stage ranks, None elsewhere. eval.max_samples caps the images embedded.
    """
    # No bad-sample budget: ranks stopping on their own would leave their peers in a collective;
    # an evaluation reads a finite split and reports what it skipped.
    data = dataclasses.replace(cfg.data, corpora=list(corpora),
                               bad_samples=BadSampleConfig(max_fraction=1.0, first=0))
    dp_size = pg.dp.size()
    loader = build_loader(data, PatchSpec.from_vision(cfg.model.vision), pg.dp.rank(), dp_size,
                          seed=cfg.precision.seed, epochs=1)
    if phase is not None:
        loader.set_pixel_budget(phase.min_pixels, phase.max_pixels)
        loader.set_max_text_len(phase.max_text_len)
    pairs, labels = [], []
    # eval.max_samples exactly: packed batches overshoot, so each rank cuts its rows to its share.
    limit = cfg.eval.max_samples
    quota = None if limit is None else limit // dp_size + int(pg.dp.rank() < limit % dp_size)
    with eval_pass(chunks, loader):
        for batch in loader:
            if quota is not None and sum(len(x) for x in labels) >= quota:
                break
            labels.append(batch.labels)
            forward_backward(chunks, [task.inputs(batch, captions=batch.text_ids is not None)],
                             partial(task.forward, collect=pairs), pg,
                             seq_length=cfg.data.max_tokens, forward_only=True)
    if pg.pp.rank() != pg.pp.size() - 1:
        return None
    local = (_cat([p[0] for p in pairs]), _cat([p[1] for p in pairs if p[1] is not None]), _cat(labels))
    local = tuple(x if x is None or quota is None else x[:quota] for x in local)
    gathered = [None] * dp_size
    torch.distributed.all_gather_object(gathered, local, group=pg.dp)
    images, texts, labels = (_cat([g[i] for g in gathered]) for i in range(3))
    return Embedded(images, texts, labels.long() if labels is not None else torch.zeros(0, dtype=torch.long))


def _cat(tensors: list) -> Optional[torch.Tensor]:
    tensors = [t for t in tensors if t is not None and t.numel()]
    return torch.cat(tensors) if tensors else None
