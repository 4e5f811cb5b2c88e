"""Start torch.distributed the same way under torchrun, srun, or as a single process.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` with one
task per GPU there is no torchrun, so the same facts come from SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID and the first host of SLURM_NODELIST. torchrun's variables win when both exist
(srun + torchrun: SLURM describes the torchrun agents, not the workers).
"""

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from finevit.parallel import cpu_backend

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read a host name from SLURM_NODELIST='{nodelist}'")
    prefix, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ntasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", 1))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        # A job id derived port lets two jobs share a node without colliding.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(per_node) if per_node.isdigit() else max(1, ntasks // nodes),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_NODELIST", "127.0.0.1")),
            master_port=port,
            launcher="slurm",
        )
    # A lone process needs a port only for its own store: any free one, so that two single-process
    # runs (a training and an evaluation, two tests) on one machine do not collide.
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return DistEnv(0, 1, 0, 1, "127.0.0.1", port, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_device() -> torch.device:
    """Where tensors for the default backend's collectives live (NCCL: this rank's GPU)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: int = 600,
                     environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Initialise the default process group (idempotent) and pick this rank's device.

    Without CUDA the CPU backend is switched on here, before any megatron module is built.
    """
    env = dist_env(environ)
    has_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if has_cuda else "gloo"
    if has_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_backend.enable()
    if not torch.distributed.is_initialized():
        # env:// so that under torchrun the workers join the agent's store instead of racing
        # it for MASTER_PORT; for srun / single runs we export what env:// reads.
        if environ is None:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        torch.distributed.init_process_group(
            backend=backend,
            init_method="env://" if environ is None else f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return env
