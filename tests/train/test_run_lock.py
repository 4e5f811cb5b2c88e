"""One owner per run directory: a live owner (here or on another machine) keeps it, a dead one's
lock is taken over, a recycled pid fools nothing, and a job whose lock was taken stops writing."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from finevit.train import main
from finevit.train.run_lock import LOCK, RunLock, RunLockError, process_start
from finevit.train.stage1 import Stage1Task
from finevit.train.trainer import Trainer, TrainingError

from tiny_stage1 import DEMO_CONFIG, ROOT, tiny_config, tiny_overrides

HOLD = """
import sys, time
from finevit.train.run_lock import RunLock
lock = RunLock(sys.argv[1], stale_s=0.3).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_owner_keeps_the_directory_and_a_killed_one_loses_it(tmp_path, caplog):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"^run directory {tmp_path} is in use by pid {holder.pid} on "
                                               rf"{socket.gethostname()}, since .*; stop that job first"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no release: the lock file stays behind
        holder.wait()
    assert (tmp_path / LOCK).exists()
    with caplog.at_level(logging.WARNING, logger="finevit.train"):
        lock = RunLock(tmp_path).acquire()
    assert f"taking over the stale lock of pid {holder.pid}" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_recycled_pid_is_not_the_owner(tmp_path):
    stale = RunLock(tmp_path).me | {"start": process_start(os.getpid()) - 1}  # this pid, another process
    (tmp_path / LOCK).write_text(json.dumps(stale))
    RunLock(tmp_path).acquire().release()


def test_another_machines_owner_is_alive_while_its_heartbeat_moves(tmp_path):
    remote = {"host": "node-elsewhere", "boot": "x", "pid": 1, "start": 1, "job": "77", "token": "t",
              "beat": 0, "since": "then"}
    (tmp_path / LOCK).write_text(json.dumps(remote))
    beating = threading.Event()
    beating.set()

    def beat():
        while beating.is_set():
            remote["beat"] += 1
            (tmp_path / LOCK).write_text(json.dumps(remote))
            time.sleep(0.05)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunLockError, match="is in use by job 77, pid 1 on node-elsewhere, since then"):
            RunLock(tmp_path, stale_s=0.5).acquire()
    finally:
        beating.clear()
        thread.join()
    lock = RunLock(tmp_path, stale_s=0.5).acquire()  # the heartbeat stopped: a dead node's lock
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.me["token"]
    lock.release()


def test_a_lock_taken_over_is_noticed_and_left_to_its_new_owner(tmp_path):
    lock = RunLock(tmp_path, stale_s=0.3).acquire()
    other = RunLock(tmp_path).me | {"token": "theirs", "pid": 12345}
    (tmp_path / LOCK).write_text(json.dumps(other))
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.lost and "now names pid 12345" in lock.lost and not lock.owned()
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "theirs"


@pytest.mark.slow
def test_a_second_job_on_a_running_run_directory_is_refused_then_resumes_once_it_is_gone(
        dist, stage1_corpus, tmp_path, caplog):
    corpus, tokenizer = stage1_corpus
    overrides = tiny_overrides(corpus, tokenizer, tmp_path / "run", **{
        "schedule.train_samples": 100000, "checkpoint.save_interval": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    # The first job: as an orphaned worker would be, alive and training, its launcher gone.
    first = subprocess.Popen([sys.executable, "-m", "finevit.cli", "train", DEMO_CONFIG, *overrides],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        latest = tmp_path / "run" / "checkpoints" / "latest"
        deadline = time.time() + 120
        while not latest.exists() and time.time() < deadline:
            assert first.poll() is None, "the first job died"
            time.sleep(0.2)
        with caplog.at_level(logging.ERROR, logger="finevit.train"):
            assert main.train(DEMO_CONFIG, overrides) == 2
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            f"run directory {tmp_path / 'run'} is in use by pid {first.pid} on {socket.gethostname()}, since "
            f"{json.loads((tmp_path / 'run' / LOCK).read_text())['since']} ({tmp_path / 'run' / LOCK}); "
            "stop that job first: one run directory has one writer"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = int(latest.read_text().strip().split("_")[1])
    # Gone (killed, its lock left behind): the next launch takes the directory over and resumes.
    assert main.train(DEMO_CONFIG, overrides[:-2] + ["schedule.stop_after_steps=1", "checkpoint.save_interval=2"]) == 0
    assert int(latest.read_text().strip().split("_")[1]) == done + 1


def test_a_trainer_whose_lock_was_taken_stops_without_committing(dist, stage1_corpus, tmp_path):
    corpus, tokenizer = stage1_corpus
    cfg = tiny_config(corpus, tokenizer, tmp_path / "run", **{"checkpoint.owner_stale_s": 0.3,
                                                               "checkpoint.save_interval": 1})
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        trainer.train_step()
        trainer.save()
        lock = tmp_path / "run" / LOCK
        lock.write_text(json.dumps(json.loads(lock.read_text()) | {"token": "theirs", "pid": 12345}))
        trainer.save()  # rank 0 checks the lock itself before making a checkpoint visible
        assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000001"
        deadline = time.monotonic() + 10
        while trainer._lock.lost is None and time.monotonic() < deadline:  # the heartbeat notices
            time.sleep(0.02)
        with pytest.raises(TrainingError, match=f"this job no longer owns {tmp_path / 'run'} and stops "
                                                "without a checkpoint: the lock .* now names pid 12345"):
            trainer.train()  # stops after its first step, before the save that step would make
    finally:
        trainer.close()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000001"
