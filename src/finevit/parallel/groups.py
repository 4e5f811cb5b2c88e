"""Megatron process groups for one model, as an explicit ProcessGroupCollection.

Model code receives the collection it should use; nothing below the constructors reads
megatron's global parallel_state. That lets stage 2 hold a ViT and an LLM with different
layouts side by side, and lets tests build a TP=1 reference next to a TP=2 model.
"""

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from finevit.config import ParallelConfig


_MEGATRON_GROUPS: list = []  # the groups the last init_model_parallel made


def init_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> ProcessGroupCollection:
    """(Re)build megatron's TP / PP / DP groups for `parallel` and seed the TP RNG tracker.

    Rebuilding destroys the previous layout's groups: megatron's own teardown only drops its
    references, and every gloo group keeps threads polling (a process that switches layouts many
    times, e.g. the multi-rank tests, ended up with ~500 groups and 1,500 threads per rank)."""
    from torch.distributed import distributed_c10d

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for group in _MEGATRON_GROUPS:
        if group in distributed_c10d._world.pg_map:
            torch.distributed.destroy_process_group(group)
    before = set(distributed_c10d._world.pg_map)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        # gloo duplicates of the DP groups only matter when the main backend is NCCL.
        create_gloo_process_groups=torch.distributed.get_backend() == "nccl",
    )
    _MEGATRON_GROUPS[:] = [g for g in distributed_c10d._world.pg_map if g not in before]
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def data_parallel_rank_and_size(pg: ProcessGroupCollection) -> tuple[int, int]:
    """The data loader shards by this, never by the global rank (TP/PP peers share batches)."""
    return pg.dp.rank(), pg.dp.size()


GROUP_NAMES = ("tp", "pp", "mp", "cp", "tp_cp", "dp", "dp_cp", "tp_dp_cp", "embd", "pos_embd",
               "dp_cp_gtp_remat", "intra_dp_cp")


_SOLO: list = []  # [(world group, this rank's singleton group)]


def _solo_group():
    """This rank alone, made once per world: each new gloo group starts threads of its own, and
    a process that builds many models (tests, canonical copies) would pile up hundreds."""
    world = torch.distributed.group.WORLD
    if not _SOLO or _SOLO[0][0] is not world:
        mine, _ = torch.distributed.new_subgroups(group_size=1)  # collective: every rank, in order
        _SOLO[:] = [(world, mine)]
    return _SOLO[0][1]


def solo_collection() -> ProcessGroupCollection:
    """A collection in which every group is this rank alone: a TP=1, PP=1 model beside a parallel
    one in the same process (canonical initialisation, references in tests). Collective the first
    time in a world: every rank creates every singleton group, in the same order."""
    mine = _solo_group()
    pg = ProcessGroupCollection()
    for name in GROUP_NAMES:
        setattr(pg, name, mine)
    return pg
