"""`sbatch launch/stage1.slurm` on a real 2-node SLURM cluster (slurm-wlm + munge, two slurmd on
this machine, each with its own shared memory and temp dir, started in a temporary directory): a
one-node job with two ranks succeeds; a two-node job of one rank per node, sent the pre-timeout
signal, checkpoints, requeues itself, resumes and ends on the one-node job's steps and losses,
bit for bit (the same data-parallel layout, placed on one node or two)."""

import os
from pathlib import Path

import pytest

from local_slurm import finish, signal_after, submit, train_rows
from tiny_stage1 import ROOT, tiny_overrides

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(ROOT, "launch", "stage1.slurm")


def job(slurm, stage1_corpus, run_dir: Path, nodes: int):
    """Two data-parallel ranks: both on one node, or one on each of two."""
    corpus, tokenizer = stage1_corpus
    overrides = tiny_overrides(corpus, tokenizer, run_dir, **{
        "schedule.train_samples": 160, "checkpoint.save_interval": 1000, "model.text.vocab_size": 384})
    return submit(slurm, SCRIPT, "configs/stage1/demo_cpu.yaml", overrides, run_dir, nodes)


def test_requeued_two_node_job_resumes_and_matches_the_uninterrupted_job(slurm, stage1_corpus, tmp_path):
    plain = job(slurm, stage1_corpus, tmp_path / "plain", nodes=1)
    finish(plain, tmp_path / "plain")
    reference = train_rows(tmp_path / "plain")
    assert reference and reference[-1]["samples"] >= 160

    requeued = job(slurm, stage1_corpus, tmp_path / "requeued", nodes=2)
    signal_after(slurm, requeued, tmp_path / "requeued")
    out = finish(requeued, tmp_path / "requeued")
    assert "requeueing job" in out and "restart 1" in out and "resumed from" in out, out[-3000:]
    assert "2 node(s) x 1" in out and "on each of 2 data-parallel ranks" in out
    rows = train_rows(tmp_path / "requeued")
    final = {r["step"]: r for r in rows}
    assert rows[-1]["step"] == reference[-1]["step"]
    for r in reference:
        assert final[r["step"]]["loss"] == r["loss"], f"step {r['step']}"
