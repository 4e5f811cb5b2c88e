"""Two jobs opening the same corpus on one node at the same moment: mosaicml-streaming's shared
memory prefix search races (measured: FileExistsError '/000005_locals'); finevit's loader opens
corpora under a node-wide lock, so both jobs start, each with its own shared memory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

JOB = r"""
import json, os, sys, time, torch
import streaming.base.shared.prefix as prefix
from finevit.config.data import CorpusConfig, DataConfig
from finevit.data.corpus import open_corpus
from finevit.data.loader import build_loader

corpus, ready, bare = sys.argv[1], sys.argv[2], sys.argv[3] == "bare"
search = prefix._check_and_find
def slow_search(*args, **kwargs):  # a busy node: the search and the registration far apart
    found = search(*args, **kwargs)
    time.sleep(0.5)
    return found
prefix._check_and_find = slow_search
torch.distributed.init_process_group("gloo")
open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < 2 * int(os.environ["WORLD_SIZE"]):  # both jobs at once
    time.sleep(0.01)
try:
    if bare:  # what opening a corpus did before the node lock
        opened = open_corpus(corpus)
        found, close = opened._ds._shm_prefix_int, opened.close
    else:
        loader = build_loader(DataConfig(corpora=[CorpusConfig(path=corpus)], num_workers=0))
        found, close = loader.corpora[0]._ds._shm_prefix_int, loader.close
    time.sleep(1)  # both jobs' memory exists at once
    close()
except Exception as e:
    found = f"{type(e).__name__}: {e}"
print(json.dumps(found), flush=True)
"""


def two_jobs(corpus: str, ranks: int, mode: str, ready: Path) -> list:
    """Each rank's shared memory prefix (or error) in two jobs of `ranks` ranks, job by job."""
    ready.mkdir()
    procs = []
    for _ in range(2):
        port = free_port()
        for rank in range(ranks):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, "-c", JOB, corpus, str(ready), mode], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    return [json.loads(out.strip().splitlines()[-1]) if out.strip() else f"no result: {err[-2000:]}"
            for out, err in outs]


@pytest.mark.slow
def test_two_jobs_on_one_node_open_the_same_corpus_without_colliding(recap, tmp_path):
    shm_before = set(os.listdir("/dev/shm"))
    try:
        # Control: two one-rank jobs opening the corpus as before collide.
        bare = two_jobs(recap.path, 1, "bare", tmp_path / "bare")
        assert not all(isinstance(r, int) for r in bare), f"control: without the lock the jobs collide: {bare}"
        locked = two_jobs(recap.path, 2, "locked", tmp_path / "locked")  # two 2-rank jobs
        assert all(isinstance(r, int) for r in locked), locked
        a, a2, b, b2 = locked
        assert a == a2 and b == b2 and a != b  # one prefix per job, none shared
    finally:
        for name in set(os.listdir("/dev/shm")) - shm_before:  # what the collided control leaked
            Path("/dev/shm", name).unlink(missing_ok=True)
