"""Zero-shot evaluation on held-out corpora: retrieval on captioned ones, classification on
labelled (schema "classify") ones. Usable without the trainer: give it a task, its model chunks
and process groups."""

from typing import Optional

from finevit.data.corpus import read_manifest
from finevit.eval.classify import evaluate_classification, zero_shot_accuracy
from finevit.eval.retrieval import evaluate_retrieval, recall_at_k


def corpus_schemas(corpora: list) -> list[str]:
    """The schema of each corpus (CorpusConfig) from its manifest; CorpusError (one sentence) for
    one that cannot be read. The trainer calls it at setup, so a run learns of a bad eval corpus
    at its start, not at its first evaluation."""
    return [read_manifest(c.path, c.cache)["schema"] for c in corpora]


def evaluate(cfg, task, chunks: list, pg, phase=None) -> Optional[dict]:
    """Every metric eval.corpora supports, in one dict on last-stage ranks (None elsewhere).

    Captioned corpora are pooled into one retrieval set (i2t_r1, ...); each classify corpus is
    scored on its own (<name>_top1, ...). Collective over all ranks.
    """
    manifests = [read_manifest(c.path, c.cache) for c in cfg.eval.corpora]
    captioned = [c for c, m in zip(cfg.eval.corpora, manifests) if m["schema"] != "classify"]
    results = []
    if captioned:
        results.append(evaluate_retrieval(cfg, task, chunks, pg, captioned, phase))
    for corpus, manifest in zip(cfg.eval.corpora, manifests):
        if manifest["schema"] == "classify":
            results.append(evaluate_classification(cfg, task, chunks, pg, corpus, manifest, phase))
    if not results or results[0] is None:
        return None
    return {k: v for r in results for k, v in r.items()}


__all__ = ["corpus_schemas", "evaluate", "evaluate_classification", "evaluate_retrieval", "recall_at_k", "zero_shot_accuracy"]
