"""`sbatch launch/stage2.slurm` on the local 2-node SLURM cluster: the encoder starts from the
stage-1 run named by STAGE1_RUN; a two-node job sent the pre-timeout signal checkpoints, requeues,
resumes from its own run directory (not from the stage-1 run again) and ends on the uninterrupted
one-node job's losses, bit for bit."""

import os
import subprocess
import sys

import pytest

import tiny_stage1
from local_slurm import finish, signal_after, submit, train_rows
from tiny_stage2 import ROOT, tiny_overrides

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(ROOT, "launch", "stage2.slurm")


@pytest.fixture(scope="module")
def stage1_run(stage1_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1")
    overrides = tiny_stage1.tiny_overrides(*map(str, stage1_corpus), run_dir, **{"schedule.stop_after_steps": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    subprocess.run([sys.executable, "-m", "finevit.cli", "train", tiny_stage1.DEMO_CONFIG, *overrides],
                   cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    return run_dir


def job(slurm, stage2_corpus, stage1_run, run_dir, nodes: int):
    short = {"eval.corpora": "[]", "schedule.train_samples": 24,  # 12 steps of 2 ranks
             "schedule.phases": "[{start_samples: 0, freeze: [vision, llm]}, {start_samples: 12, freeze: []}]"}
    overrides = [o for o in tiny_overrides(*map(str, stage2_corpus), run_dir, **short)
                 if not o.startswith("model.vision.init_from=")]  # STAGE1_RUN names it
    return submit(slurm, SCRIPT, "configs/stage2/demo_cpu.yaml", overrides, run_dir, nodes,
                  env={"STAGE1_RUN": str(stage1_run)})


def test_requeued_stage2_job_resumes_and_matches_the_uninterrupted_job(slurm, stage2_corpus, stage1_run, tmp_path):
    plain = tmp_path / "plain"
    out = finish(job(slurm, stage2_corpus, stage1_run, plain, nodes=1), plain)
    assert f"loaded vision from {stage1_run}" in out, out[-3000:]
    reference = train_rows(plain)
    assert reference and reference[-1]["samples"] >= 24

    requeued = tmp_path / "requeued"
    proc = job(slurm, stage2_corpus, stage1_run, requeued, nodes=2)
    signal_after(slurm, proc, requeued)
    out = finish(proc, requeued)
    assert "requeueing job" in out and "restart 1" in out and "resumed from" in out, out[-3000:]
    first, restart = out.split("restart 1")
    assert "loaded vision from" in first and "loaded vision from" not in restart  # resumed its own
    rows = train_rows(requeued)
    final = {r["step"]: r for r in rows}
    assert rows[-1]["step"] == reference[-1]["step"]
    for r in reference:
        assert final[r["step"]]["loss"] == r["loss"], f"step {r['step']}"
