"""Where torch.distributed's rank, world and rendezvous come from: torchrun, srun, or nothing."""

import pytest

from finevit.parallel.dist import dist_env, first_host


@pytest.mark.parametrize("nodelist,host", [("gpu[03-05,9],cpu1", "gpu03"), ("node7", "node7"),
                                           ("a-b[10-11]", "a-b10"), ("x[1,3]", "x1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables():
    env = dist_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("n0", 1234, "torchrun")


def test_srun_variables_one_task_per_gpu():
    env = dist_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                    "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)",
                    "SLURM_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu12", 24242, "slurm")


def test_torchrun_inside_srun_wins():
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (3, 4, "torchrun")


def test_a_single_process_takes_a_free_port_unless_told():
    alone = dist_env({})
    assert (alone.rank, alone.world_size, alone.launcher) == (0, 1, "single") and alone.master_port > 0
    assert dist_env({"MASTER_PORT": "29555"}).master_port == 29555
