"""Megatron process groups for building our encoder in this single test process."""

import os
import socket

import pytest
import torch


@pytest.fixture(scope="session")
def single_process_dist():
    """torch.distributed as one gloo rank (a no-op when something already initialised it; the
    group is left up at the end for whoever else shares the session)."""
    from finevit.parallel.dist import init_distributed

    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as s:  # a free port, so parallel test sessions do not collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed()  # idempotent; also switches on the CPU backend without CUDA
    return torch.distributed


@pytest.fixture
def tp1_groups(single_process_dist):
    """megatron's TP=1 / PP=1 process groups, read afresh for each test because another fixture
    in the session may re-initialise megatron's parallel state between tests."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if not get_cuda_rng_tracker().get_states():  # megatron's forward forks the TP RNG tracker
        model_parallel_cuda_manual_seed(0)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    if pg.tp.size() != 1 or pg.pp.size() != 1:
        pytest.skip("converter tests need megatron's parallel state at TP=1, PP=1")
    return pg


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """The models here are tiny: one thread is faster than several, and far faster on shared
    cores, where OpenMP threads spin waiting for each other (10 s instead of 0.1 s a test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
