"""Stage 2 under TP=2 (with sequence parallelism), PP=2 (the encoder, projector and first LLM
layer on the first stage) and TP=2 x PP=2, as real processes on gloo, starts its encoder from the
same single-process stage-1 run and follows the single-process loss and gradient-norm curve,
through a projector-only phase and the unfreezing after it."""

import pytest

import tiny_stage1
from tiny_runs import torchrun_train
from tiny_stage2 import DEMO_CONFIG, tiny_overrides

pytestmark = pytest.mark.slow

# 2 rows per step (pipeline micro-batches), 6 steps, the towers unfrozen after step 3.
COMMON = {"schedule.micro_batches_per_step": 2, "schedule.train_samples": 12, "eval.corpora": "[]",
          "schedule.phases": "[{start_samples: 0, max_pixels: 6272, freeze: [vision, llm]},"
                             " {start_samples: 6, max_pixels: 12544, freeze: []}]"}


@pytest.fixture(scope="module")
def stage1_source(dist, stage1_corpus, tmp_path_factory):
    """The stage-1 run every layout starts its encoder from (PP: loaded by stage 0 only)."""
    stage1 = tmp_path_factory.mktemp("stage1")
    tiny_stage1.stage1_run(*map(str, stage1_corpus), stage1)
    return stage1


def train(stage2_corpus, stage1_source, run_dir, nproc: int, *layout: str) -> dict:
    args = tiny_overrides(*map(str, stage2_corpus), run_dir, **COMMON,
                          **{"model.vision.init_from": str(stage1_source)}) + list(layout)
    return torchrun_train(DEMO_CONFIG, args, nproc, run_dir)


@pytest.fixture(scope="module")
def reference(stage2_corpus, stage1_source, tmp_path_factory) -> dict:
    return train(stage2_corpus, stage1_source, tmp_path_factory.mktemp("single"), 1)


@pytest.mark.parametrize("layout,nproc", [
    ("parallel.tensor=2 parallel.sequence_parallel=true", 2),
    ("parallel.pipeline=2", 2),
    ("parallel.tensor=2 parallel.pipeline=2 parallel.sequence_parallel=true", 4)], ids=["tp2_sp", "pp2", "tp2_pp2"])
def test_parallel_loss_curve_equals_single_process(stage2_corpus, stage1_source, tmp_path, reference, layout,
                                                   nproc):
    got = train(stage2_corpus, stage1_source, tmp_path, nproc, *layout.split())
    assert got.keys() == reference.keys() and len(reference) == 6
    assert {r["phase"] for r in reference.values()} == {0, 1}
    for step, ref in reference.items():
        assert got[step]["samples"] == ref["samples"]
        assert got[step]["answer_tokens"] == ref["answer_tokens"]
        assert got[step]["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5), f"step {step}"
        assert got[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3, abs=1e-5), f"step {step}"
        for tower in ("vision", "projector", "llm"):
            assert got[step][f"grad_norm_{tower}"] == pytest.approx(ref[f"grad_norm_{tower}"], rel=1e-3, abs=1e-6)
