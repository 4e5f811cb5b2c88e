"""Shared test fixtures, and the harness for multi-rank tests.

Multi-rank tests live in files named `dist_*.py` (pytest's default pattern skips them). They
run as real processes on gloo: `tests/parallel/test_multirank.py` launches ONE torchrun of 4
ranks over all of them, so process start-up and imports are paid once; each test builds the
megatron parallel groups it needs (`parallel_groups(tp=..., pp=...)`), which on gloo is cheap.
Inside that launch every rank records its outcomes (FINEVIT_DIST_RESULTS) and the outer
session reports one test per multi-rank test, failing with the failing rank's traceback.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch

RESULTS_DIR = os.environ.get("FINEVIT_DIST_RESULTS")
GLOO_TIMEOUT_S = 120  # a rank that fails leaves its peers blocked until this expires


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (still run in CI)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if RESULTS_DIR:
    def pytest_runtest_logreport(report):
        if report.when == "call" or report.outcome != "passed":
            rank = os.environ.get("RANK", "0")
            # Parametrized cases report under their function's name: the outer test is per function.
            line = {"name": report.nodeid.split("::")[-1].split("[")[0], "file": Path(report.fspath).name,
                    "when": report.when, "outcome": report.outcome,
                    "text": str(report.longrepr) if report.outcome != "passed" else ""}
            with open(Path(RESULTS_DIR) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


@pytest.fixture(scope="session")
def dist():
    """torch.distributed for this process: the torchrun world, or a single gloo rank."""
    from finevit.parallel.dist import init_distributed

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
        init_distributed(timeout_s=GLOO_TIMEOUT_S)
    yield torch.distributed
    # Without an orderly teardown the gloo threads keep the interpreter from exiting.
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def parallel_groups(dist):
    """parallel_groups(tp=1, pp=1, vpp=None) -> megatron ProcessGroupCollection for this layout."""
    from finevit.config import ParallelConfig
    from finevit.parallel.groups import init_model_parallel

    def make(tp: int = 1, pp: int = 1, vpp=None):
        return init_model_parallel(ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp))

    return make


@pytest.fixture(scope="session")
def solo_groups(dist):
    """A collection in which every group is this rank alone: for TP=1/PP=1 references built
    beside a parallel model in the same process."""
    from finevit.parallel.groups import solo_collection

    return solo_collection()


@pytest.fixture(scope="session")
def stage1_corpus(tmp_path_factory):
    """(corpus dir with recaption/{train,heldout}, tokenizer path) for stage-1 runs (see
    tiny_stage1.py), built once per session."""
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


@pytest.fixture(scope="session")
def stage2_corpus(tmp_path_factory):
    """(corpus dir with finecap/{train,heldout}, LLM tokenizer directory) for stage-2 runs (see
    tiny_stage2.py), built once per session."""
    from finevit.data.corpus import open_corpus
    from finevit.data.demo import write_demo_corpus
    from finevit.data.llm_tokenizer import train_llm_tokenizer
    from finevit.data.tokenizer import corpus_texts

    out = tmp_path_factory.mktemp("stage2_demo")
    write_demo_corpus(str(out), seed=0, train=64, heldout=16, schemas=("finecap",))
    corpus = open_corpus(str(out / "finecap" / "train"))
    try:
        texts = list(corpus_texts(corpus))
    finally:
        corpus.close()
    questions = ["Describe this image in detail.", "Describe the region", "Read the text in the region",
                 "Locate in the image. Answer with its box.", "Where is the text? Answer with its box.",
                 "user\n", "assistant\n", "system\n"] + [f"[{i}, {i + 1}, {i + 2}, {i + 3}]" for i in range(0, 200, 7)]
    return out, train_llm_tokenizer(texts + questions * 20, str(out / "llm_tokenizer"), vocab_size=480)
