"""One local 2-node SLURM cluster for every launch test of the session."""

import os

import pytest

from local_slurm import LocalSlurm, available


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why}")
        pytest.skip(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2).start()
    yield cluster
    cluster.stop()
