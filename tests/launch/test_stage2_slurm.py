"""`sbatch launch/stage2.slurm` on the local 2-node SLURM cluster: the encoder starts from the
stage-1 run named by STAGE1_RUN; the two-node job, sent the pre-timeout signal, checkpoints,
requeues, resumes from its own run directory (not from the stage-1 run again) and trains to the
end, every step once. (That a resumed run is bit-exact is tests/train/test_stage2.py's, in one
process; the requeue machinery is stage 1's, whose SLURM test also compares losses.)"""

import os

import pytest

import tiny_stage1
from local_slurm import finish, signal_after, submit, train_rows
from tiny_stage2 import ROOT, tiny_overrides

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(ROOT, "launch", "stage2.slurm")


@pytest.fixture(scope="module")
def stage1_run(dist, stage1_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1")
    tiny_stage1.stage1_run(*map(str, stage1_corpus), run_dir)
    return run_dir


def job(slurm, stage2_corpus, stage1_run, run_dir, nodes: int):
    short = {"eval.corpora": "[]", "schedule.train_samples": 24,  # 12 steps of 2 ranks
             "schedule.phases": "[{start_samples: 0, freeze: [vision, llm]}, {start_samples: 12, freeze: []}]"}
    overrides = [o for o in tiny_overrides(*map(str, stage2_corpus), run_dir, **short)
                 if not o.startswith("model.vision.init_from=")]  # STAGE1_RUN names it
    return submit(slurm, SCRIPT, "configs/stage2/demo_cpu.yaml", overrides, run_dir, nodes,
                  env={"STAGE1_RUN": str(stage1_run)})


def test_requeued_stage2_job_resumes_its_own_checkpoint_and_finishes(slurm, stage2_corpus, stage1_run, tmp_path):
    run_dir = tmp_path / "requeued"
    proc = job(slurm, stage2_corpus, stage1_run, run_dir, nodes=2)
    signal_after(slurm, proc, run_dir)
    out = finish(proc, run_dir)
    assert "requeueing job" in out and "restart 1" in out and "resumed from" in out, out[-3000:]
    first, restart = out.split("restart 1")
    assert f"loaded vision from {stage1_run}" in first and "loaded vision from" not in restart
    assert "2 node(s) x 1" in out and "on each of 2 data-parallel ranks" in out
    rows = train_rows(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 13)) and rows[-1]["samples"] == 24  # checkpointed where it stopped
