"""A short stage-1 run under TP=2 (with sequence parallelism, and resharded to TP=1 midway) and
under PP=2 (real processes via torchrun, gloo) follows the loss curve of the single-process run
with the same data and micro-batching."""

import json

import pytest

from tiny_runs import torchrun_train
from tiny_stage1 import DEMO_CONFIG, tiny_overrides

pytestmark = pytest.mark.slow


def train(run_dir, nproc: int, *overrides: str) -> dict:
    corpus, tokenizer, base = overrides[0], overrides[1], overrides[2:]
    args = tiny_overrides(corpus, tokenizer, run_dir, **{"schedule.train_samples": 60}) + list(base)
    return torchrun_train(DEMO_CONFIG, args, nproc, run_dir)


@pytest.fixture(scope="module")
def single_runs() -> dict:
    return {}


# Plain TP=2 (no sequence parallelism) is covered by the resharding test below.
@pytest.mark.parametrize("layout,nproc,micro", [
    ("parallel.tensor=2 parallel.sequence_parallel=true", 2, 1),  # as the 0.9b recipe runs
    ("parallel.pipeline=2", 2, 2)], ids=["tp2_sp", "pp2"])
def test_parallel_loss_curve_equals_single_process(stage1_corpus, tmp_path, single_runs, layout, nproc,
                                                   micro):
    corpus, tokenizer = map(str, stage1_corpus)
    common = (corpus, tokenizer, f"schedule.micro_batches_per_step={micro}")
    if micro not in single_runs:  # the reference of every layout with this micro-batching
        single_runs[micro] = train(tmp_path / "single", 1, *common)
    reference = single_runs[micro]
    parallel = train(tmp_path / "parallel", nproc, *common, *layout.split())
    assert reference.keys() == parallel.keys() and len(reference) >= 4
    for step, ref in reference.items():
        got = parallel[step]
        assert got["samples"] == ref["samples"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5), f"step {step}"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3, abs=1e-5), f"step {step}"


def test_a_tp2_checkpoint_resumes_under_tp1_on_the_same_curve(stage1_corpus, tmp_path, single_runs):
    """TP=2 follows the single-process curve, and the dual tower (vision, head, text, loss) and
    its optimizer reshard from TP=2 to TP=1 and continue on it."""
    corpus, tokenizer = map(str, stage1_corpus)
    common = (corpus, tokenizer, "schedule.micro_batches_per_step=1")
    if 1 not in single_runs:
        single_runs[1] = train(tmp_path / "single", 1, *common)
    reference = single_runs[1]
    first = train(tmp_path / "run", 2, *common, "parallel.tensor=2", "schedule.stop_after_steps=3")
    assert max(first) == 3
    resumed = train(tmp_path / "run", 1, *common)
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == sorted(reference)  # resumed at step 4, not started again
    for step in sorted(reference):  # TP=2 for steps 1-3, then TP=1 from its checkpoint
        assert resumed[step]["samples"] == reference[step]["samples"]
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4, abs=1e-5), f"step {step}"
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-3, abs=1e-5)
