"""`sbatch launch/stage1.slurm` on a real 2-node SLURM cluster (slurm-wlm + munge, two slurmd on
this machine, each with its own shared memory and temp dir, started in a temporary directory): a
one-node job with two ranks succeeds; a two-node job of one rank per node, sent the pre-timeout
signal, checkpoints, requeues itself, resumes and ends on the one-node job's steps and losses,
bit for bit (the same data-parallel layout, placed on one node or two)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_slurm import LocalSlurm, available
from tiny_stage1 import ROOT, tiny_overrides

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(ROOT, "launch", "stage1.slurm")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why}")
        pytest.skip(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2).start()
    yield cluster
    cluster.stop()


def job(slurm, stage1_corpus, run_dir: Path, nodes: int) -> subprocess.Popen:
    """Two data-parallel ranks: both on one node, or one on each of two."""
    corpus, tokenizer = stage1_corpus
    overrides = tiny_overrides(corpus, tokenizer, run_dir, **{
        "schedule.train_samples": 160, "checkpoint.save_interval": 1000, "model.text.vocab_size": 384})
    env = {**os.environ, **slurm.env, "CONFIG": "configs/stage1/demo_cpu.yaml", "GPUS_PER_NODE": str(2 // nodes),
           "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           # node names (n1, n2) are not host names here; every node is this machine
           "MASTER_ADDR": "127.0.0.1", "LOCAL_ADDR": "127.0.0.1", "TMPDIR": str(slurm.node_tmp)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["sbatch", "--parsable", "--wait", "--gpus-per-node=0", f"--nodes={nodes}",
           f"--cpus-per-task={2 // nodes}", f"--job-name={run_dir.name}", f"--output={run_dir}.out",
           SCRIPT, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def finish(proc: subprocess.Popen, run_dir: Path) -> None:
    out, err = proc.communicate(timeout=600)
    log = Path(f"{run_dir}.out")
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {err}\n{log.read_text()[-4000:] if log.exists() else ''}"


def test_requeued_two_node_job_resumes_and_matches_the_uninterrupted_job(slurm, stage1_corpus, tmp_path):
    plain = job(slurm, stage1_corpus, tmp_path / "plain", nodes=1)
    finish(plain, tmp_path / "plain")
    reference = train_rows(tmp_path / "plain")
    assert reference and reference[-1]["samples"] >= 160

    requeued = job(slurm, stage1_corpus, tmp_path / "requeued", nodes=2)
    deadline = time.time() + 300
    while time.time() < deadline and len(train_rows(tmp_path / "requeued")) < 3:
        assert requeued.poll() is None, "the job ended before it could be signalled"
        time.sleep(0.5)
    # sbatch --wait prints the id only when it exits (stdout is a pipe): find the job by name.
    (line,) = [j for j in slurm.scontrol("show", "job", "-o").splitlines() if " JobName=requeued " in j]
    job_id = line.split("JobId=")[1].split()[0]
    # What --signal=B:USR1@<s> does shortly before the time limit, now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env, check=True)
    finish(requeued, tmp_path / "requeued")
    out = Path(f"{tmp_path / 'requeued'}.out").read_text()
    assert "requeueing job" in out and "restart 1" in out and "resumed from" in out, out[-3000:]
    assert "2 node(s) x 1" in out and "on each of 2 data-parallel ranks" in out
    rows = train_rows(tmp_path / "requeued")
    final = {r["step"]: r for r in rows}
    assert rows[-1]["step"] == reference[-1]["step"]
    for r in reference:
        assert final[r["step"]]["loss"] == r["loss"], f"step {r['step']}"
