"""Zero-shot image<->text retrieval on held-out corpora (recall@1 and @5 with long captions).

Every data-parallel rank embeds its shard of the held-out split (one pass, packed like training,
through the same pipeline schedule in forward-only mode); the last pipeline stage gathers the
pairs of all DP ranks and scores every image against every caption. Pair i is image i with the
caption the loader picked for it, so a hit is the exact caption, not one that merely reads alike.
"""

import dataclasses
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from finevit.data import PatchSpec, build_loader
from finevit.train.forward_backward import forward_backward


def recall_at_k(images: torch.Tensor, texts: torch.Tensor, ks=(1, 5)) -> dict:
    """images, texts [N, d] paired by row -> {i2t_r1, i2t_r5, t2i_r1, t2i_r5} in [0, 1]."""
    sim = F.normalize(images.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).t()  # [N, N]
    truth = torch.arange(sim.shape[0])
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        # rank of the true partner = how many candidates score strictly higher
        rank = (s > s[truth, truth][:, None]).sum(dim=1)
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    out["pairs"] = int(sim.shape[0])
    out["chance_r1"] = 1.0 / max(1, sim.shape[0])
    return out


@torch.no_grad()
def evaluate_retrieval(cfg, task, chunks: list, pg, phase=None) -> Optional[dict]:
    """Recall on cfg.eval.corpora at the current phase's resolution and text length.

    Collective over all ranks; returns the metrics on last-stage ranks, None elsewhere.
    """
    data = dataclasses.replace(cfg.data, corpora=list(cfg.eval.corpora))
    dp_rank, dp_size = pg.dp.rank(), pg.dp.size()
    loader = build_loader(data, PatchSpec.from_vision(cfg.model.vision), dp_rank, dp_size,
                          seed=cfg.precision.seed, epochs=1)
    if phase is not None:
        loader.set_pixel_budget(phase.min_pixels, phase.max_pixels)
        loader.set_max_text_len(phase.max_text_len)
    for chunk in chunks:
        chunk.eval()
    pairs: list = []
    seen = 0
    limit = cfg.eval.max_samples
    try:
        for batch in loader:
            if limit is not None and seen >= -(-limit // dp_size):
                break
            seen += batch.num_images
            forward_backward(chunks, [task.inputs(batch)], partial(task.forward, collect=pairs), pg,
                             seq_length=cfg.data.max_tokens, forward_only=True)
    finally:
        loader.close()
        for chunk in chunks:
            chunk.train()
    if pg.pp.rank() != pg.pp.size() - 1:
        return None
    local = (torch.cat([p[0] for p in pairs]) if pairs else torch.zeros(0, 1),
             torch.cat([p[1] for p in pairs]) if pairs else torch.zeros(0, 1))
    gathered = [None] * dp_size
    torch.distributed.all_gather_object(gathered, local, group=pg.dp)
    images = torch.cat([g[0] for g in gathered if g[0].numel()])
    texts = torch.cat([g[1] for g in gathered if g[1].numel()])
    return recall_at_k(images, texts)
