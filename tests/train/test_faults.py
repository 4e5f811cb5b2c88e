"""Fault campaign: a DP=2 run whose every process (torchrun agent and workers) is SIGKILLed at
seeded random steps and once in the middle of a checkpoint save ends on the uninterrupted run's
losses, step for step, bit for bit; a DP=2 run resumed with DP=1 trains on every sample of the
epoch exactly once."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from finevit.data.corpus import open_corpus
from finevit.train.metrics import read_rows

from tiny_stage1 import DEMO_CONFIG, ROOT, tiny_overrides

pytestmark = pytest.mark.slow
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded_train.py")


def launch(run_dir: Path, overrides: list[str], ranks: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECORD_DIR": str(run_dir.parent / f"{run_dir.name}.record")}
    os.makedirs(env["RECORD_DIR"], exist_ok=True)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, DRIVER, DEMO_CONFIG, *overrides]
    if ranks > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:  # the launch's log lines
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and every worker at once (workers sit in sessions of their own)."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]


def losses(run_dir: Path) -> dict:
    """Step -> (loss, samples): the last line of each step, as `finevit report` reads them."""
    rows = [r for r in read_rows(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    return {r["step"]: (r["loss"], r["samples"]) for r in rows}


def wait_for(condition, proc, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def clean_shm():
    """SIGKILLed ranks leak mosaicml-streaming's shared memory; remove what appeared."""
    before = set(os.listdir("/dev/shm"))
    yield
    for name in set(os.listdir("/dev/shm")) - before:
        Path("/dev/shm", name).unlink(missing_ok=True)


def test_killed_at_random_steps_and_mid_save_the_run_ends_on_the_uninterrupted_losses(
        stage1_corpus, tmp_path, clean_shm):
    corpus, tokenizer = stage1_corpus
    extra = {"schedule.train_samples": 160, "checkpoint.save_interval": 3, "eval.corpora": "[]"}
    finish(launch(tmp_path / "reference", tiny_overrides(corpus, tokenizer, tmp_path / "reference", **extra), 2))
    reference = losses(tmp_path / "reference")
    last = max(reference)
    assert last >= 10 and {s for s, _ in reference.items()} == set(range(1, last + 1))

    run = tmp_path / "killed"
    overrides = tiny_overrides(corpus, tokenizer, run, **extra)
    ckpts = run / "checkpoints"
    rng = random.Random(20261207)
    kills = sorted(rng.sample(range(2, last - 1), 2))
    for target in kills:  # anywhere in a step, including right after a save
        proc = launch(run, overrides, 2)
        wait_for(lambda: max(losses(run), default=0) >= target if (run / "metrics.jsonl").exists() else False,
                 proc, f"step {target}")
        kill_everything(proc)
    for _ in range(5):  # in the middle of a save: its .tmp directory exists, `latest` not yet moved
        proc = launch(run, overrides, 2)
        saving = lambda: ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir())  # noqa: E731
        wait_for(saving, proc, "a checkpoint save")
        kill_everything(proc)
        if saving():
            break
    else:
        pytest.fail("no kill landed inside a checkpoint save in 5 tries")
    done = max(int(p.name.split("_")[1]) for p in ckpts.iterdir() if p.name.startswith("step_") and
               not p.name.endswith(".tmp"))
    finish(launch(run, overrides, 2))
    log = Path(f"{run}.log").read_text()
    assert done > 0 and f"resumed from {ckpts / f'step_{done:06d}'} " in log  # not a run from scratch
    assert losses(run) == reference


def test_a_dp2_run_resumed_with_dp1_trains_on_every_sample_once(stage1_corpus, tmp_path, clean_shm):
    corpus, tokenizer = stage1_corpus
    run = tmp_path / "reshard"
    extra = {"eval.corpora": "[]", "checkpoint.save_interval": 1000}
    finish(launch(run, tiny_overrides(corpus, tokenizer, run, **extra, **{"schedule.stop_after_steps": 3}), 2))
    # The rest under DP=1, well into a second epoch of the 96-image corpus.
    finish(launch(run, tiny_overrides(corpus, tokenizer, run, **extra, **{"schedule.train_samples": 150}), 1))
    record = Path(f"{run}.record")
    batches = [json.loads(line) for f in sorted(record.iterdir()) for line in f.read_text().splitlines()]
    positions = [k for b in batches for k in b["keys"]]
    ids = {k: i for b in batches for k, i in zip(b["keys"], b["ids"])}
    assert len(positions) == len(set(positions)), "a stream position was trained on twice"
    assert len(positions) == losses(run)[max(losses(run))][1]  # every position trained was counted
    with open_corpus(f"{corpus}/recaption/train") as c:
        epoch = [c[i]["id"] for i in range(len(c))]
    first_epoch = [ids[g] for g in range(len(epoch))]  # KeyError: a position of the epoch was skipped
    assert Counter(first_epoch) == Counter(epoch)  # every sample exactly once
