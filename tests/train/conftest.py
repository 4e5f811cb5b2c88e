"""The trainer tests' demo corpus and tokenizer (configs: tiny_stage1.py)."""

import os

import pytest




@pytest.fixture(scope="session")
def stage1_corpus(tmp_path_factory):
    """(corpus dir with recaption/{train,heldout}, tokenizer path), built once per session."""
    from finevit.data.corpus import open_corpus
    from finevit.data.demo import write_demo_corpus
    from finevit.data.tokenizer import corpus_texts, train_sentencepiece

    out = tmp_path_factory.mktemp("stage1_demo")
    write_demo_corpus(str(out), seed=0, train=96, heldout=24, schemas=("recaption",))
    corpus = open_corpus(str(out / "recaption" / "train"))
    try:
        model = str(out / "caption.model")
        train_sentencepiece(corpus_texts(corpus), model, vocab_size=384)
    finally:
        corpus.close()
    return out, model
