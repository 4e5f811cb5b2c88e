"""Zero-shot image<->text retrieval on held-out corpora (recall@1 and @5 with long captions).

The held-out captioned corpora are embedded together (eval/embed.py); pair i is image i with the
caption the loader picked for it, so a hit is the exact caption, not one that merely reads alike.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from finevit.eval.embed import embed_corpora


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


def evaluate_retrieval(cfg, task, chunks: list, pg, corpora: list, phase=None) -> Optional[dict]:
    """Recall on captioned `corpora` at the phase's resolution and text length.

    Collective over all ranks; returns the metrics on last-stage ranks, None elsewhere.
    """
    emb = embed_corpora(cfg, task, chunks, pg, corpora, phase)
    if emb is None:
        return None
    if emb.texts is None or emb.texts.shape[0] != emb.images.shape[0]:
        raise ValueError("retrieval needs a caption per image: set data.tokenizer")
    return recall_at_k(emb.images, emb.texts)
