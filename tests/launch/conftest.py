"""A local 2-node SLURM cluster per launch test module, stopped when the module ends (idle daemons
must not share the machine with the rest of the suite)."""

import os

import pytest

from local_slurm import LocalSlurm, available


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
