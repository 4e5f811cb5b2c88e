"""Opening corpora one job at a time per node, so that two jobs never pick the same shared memory.

mosaicml-streaming names a dataset's shared memory by the first free prefix in /dev/shm: every
local rank of a job searches for it, then the job's local leader registers it, with a barrier
between. Two jobs opening datasets on one node at once both find the same prefix: one fails
(`FileExistsError: '/000005_locals'`), or worse, attaches to the other job's memory. Holding a
node-wide lock (a file in /dev/shm, the namespace that collides) from before the search until
every rank of the job is registered closes that window.

Within a job the lock must be held by the job as a whole: the search spans a collective, so the
node's leader (the lowest rank that sees the same /dev/shm) locks on behalf of its node-mates.
A job spanning several nodes needs every node's lock at once; it takes them all or none (try,
agree with an all-reduce, back off at random), so two multi-node jobs can never deadlock.
"""

import contextlib
import fcntl
import os
import random
import socket
import time

import torch

LOCK_FILE = "finevit-streaming.lock"


def _node_key(shm_dir: str) -> tuple:
    """Which node this process is on, as shared memory sees it (host and /dev/shm's device)."""
    return socket.gethostname(), os.stat(shm_dir).st_dev


@contextlib.contextmanager
def node_exclusive(shm_dir: str = "/dev/shm"):
    """Hold the node-wide corpus-opening lock for this job (collective when distributed)."""
    dist = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    fd = os.open(os.path.join(shm_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not dist:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
            return
        keys = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(keys, _node_key(shm_dir))
        rank = torch.distributed.get_rank()
        leader = keys.index(keys[rank]) == rank
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        rng = random.Random(os.getpid())
        while True:
            got = True
            if leader:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    got = False
            every = torch.tensor([float(got)], device=device)
            torch.distributed.all_reduce(every, op=torch.distributed.ReduceOp.MIN)
            if every.item():
                break
            if leader and got:
                fcntl.flock(fd, fcntl.LOCK_UN)  # not all nodes: give this one back, try again
            time.sleep(rng.uniform(0.05, 0.5))
        try:
            yield
            torch.distributed.barrier()  # every rank of the node has registered its memory
        finally:
            if leader:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
