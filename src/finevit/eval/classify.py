"""Zero-shot classification on labelled corpora (schema "classify"), as CLIP evaluates it.

Each class name is written into every prompt template ("a photo of a {}."); the text tower embeds
the prompts, a class's embedding is the normalised mean of its prompts' normalised embeddings, and
an image is assigned the classes whose embeddings are nearest to its own. The names and, when
the corpus brings them, the templates come from the corpus manifest; eval.templates otherwise.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.utils import unwrap_model

from finevit.data.corpus import default_name
from finevit.data.tokenizer import CaptionTokenizer
from finevit.eval.embed import embed_corpora


def zero_shot_accuracy(images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict:
    """images [N, d], classes [C, d], labels [N] -> {top1, top5}: the share of images whose true
    class is among the k classes nearest by cosine similarity (k capped at C)."""
    sim = F.normalize(images.float(), dim=-1) @ F.normalize(classes.float(), dim=-1).t()  # [N, C]
    # rank of the true class = how many classes score strictly higher (ties count in its favour)
    rank = (sim > sim.gather(1, labels[:, None])).sum(dim=1)
    return {f"top{k}": float((rank < min(k, classes.shape[0])).float().mean()) for k in ks}


@torch.no_grad()
def class_embeddings(chunk, tokenizer: CaptionTokenizer, classes: Sequence[str], templates: Sequence[str],
                     text_len: int, batch: int = 256) -> torch.Tensor:
    """[C, d]: each class's prompts through the text tower of the last-stage `chunk`, averaged.

    Collective over the tensor-parallel group (every rank of it must call with the same names).
    """
    model = unwrap_model(chunk)
    prompts = [t.format(c) for c in classes for t in templates]  # class-major: [C * T]
    out = []
    for i in range(0, len(prompts), batch):
        ids = [tokenizer.encode(p, text_len) for p in prompts[i:i + batch]]
        lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)
        padded = torch.full((len(ids), int(lengths.max())), tokenizer.pad_id, dtype=torch.int64)
        for row, t in zip(padded, ids):
            row[: len(t)] = t
        out.append(F.normalize(model.encode_text(padded, lengths, text_len).float(), dim=-1))
    emb = torch.cat(out).cpu().view(len(classes), len(templates), -1)  # [C*T, d] -> [C, T, d]
    return F.normalize(emb.mean(dim=1), dim=-1)


def evaluate_classification(cfg, task, chunks: list, pg, corpus, manifest: dict,
                            phase=None) -> Optional[dict]:
    """{<name>_top1, <name>_top5, <name>_chance, <name>_images} on one classify corpus (its
    CorpusConfig and manifest); <name> is the config's name, else the directory's.

    Collective over all ranks; returns the metrics on last-stage ranks, None elsewhere.
    """
    if not cfg.data.tokenizer:  # before any collective, so that every rank stops alike
        raise ValueError("zero-shot classification needs data.tokenizer to write the class prompts")
    classes, templates = manifest["classes"], manifest.get("templates") or list(cfg.eval.templates)
    emb = embed_corpora(cfg, task, chunks, pg, [corpus], phase)
    if emb is None:
        return None
    text_len = phase.max_text_len if phase is not None else cfg.data.max_text_len
    names = class_embeddings(chunks[-1], CaptionTokenizer(cfg.data.tokenizer), classes, templates, text_len)
    name = corpus.name or default_name(corpus.path)
    out = {f"{name}_{k}": v for k, v in zero_shot_accuracy(emb.images, names, emb.labels).items()}
    out[f"{name}_chance"] = 1.0 / len(classes)
    out[f"{name}_images"] = int(emb.images.shape[0])
    return out
