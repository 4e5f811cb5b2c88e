"""Everything a run carries from one step to the next, named in one place.

A checkpoint holds the model and optimizer (sharded, megatron dist_checkpointing), the
`common` dict built here (the TrainState counters, the LR schedule position, every data-parallel
rank's loader state) and each rank's RNG state (checkpointing/dist.py gathers per-rank state). Restoring all of it continues the run exactly
(same layout) or as closely as the layout allows (other DP size: the loader reshards its epoch;
RNG states are per rank and are then re-seeded).
"""

from dataclasses import asdict, dataclass, field, fields

import torch

from finevit.checkpointing import dist as ckpt
from finevit.data.loader import BadSampleBudget
from finevit.parallel.dist import collective_device


@dataclass
class TrainState:
    step: int = 0  # optimizer steps attempted (skipped ones included)
    consumed_samples: int = 0  # images over all data-parallel ranks
    phase: int = 0  # index into the resolved progressive schedule
    skipped_steps: int = 0  # non-finite loss or gradients, over the whole run
    bad_in_a_row: int = 0
    # The task's own state (plain data; stage 1: the text position rows trained so far). It
    # describes the weights, so it travels with them, also on a weights-only load.
    task: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def gather_objects(obj, group=None) -> list:
    """Every rank's `obj`, in rank order (a collective over `group`)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def next_batches(loader, n: int, tp_group) -> list:
    """The step's n micro-batches. Only tensor-parallel rank 0 reads them; its TP peers receive a
    copy, so a node decodes each image once per pipeline stage instead of once per TP rank.

    What travels: a small pickled header per batch (its class, shapes and dtypes, the ids and
    texts), then each tensor by a plain broadcast on the collective device (the GPU under NCCL):
    pickling a 30k-patch micro-batch (~140 MB of pixels) would cost far more than the copy.
    A BadSampleBudget raised by the reading rank is raised on its TP peers too (they would
    otherwise wait for batches that never come)."""
    if tp_group.size() == 1:
        return [next(loader) for _ in range(n)]
    reader = tp_group.rank() == 0
    batches, header = [], [None]
    if reader:
        try:
            batches = [next(loader) for _ in range(n)]
            header = [[_header(b) for b in batches]]
        except BadSampleBudget as e:
            header = [e]
    src = torch.distributed.get_global_rank(tp_group, 0)
    torch.distributed.broadcast_object_list(header, src=src, group=tp_group)
    if isinstance(header[0], BadSampleBudget):
        raise header[0]
    device = collective_device()
    out = []
    for i, (cls, rest, specs) in enumerate(header[0]):
        tensors = {}
        for name, (shape, dtype) in specs.items():
            t = getattr(batches[i], name).to(device) if reader else torch.empty(shape, dtype=dtype, device=device)
            torch.distributed.broadcast(t, src=src, group=tp_group)
            if not reader:
                tensors[name] = t.cpu()  # what the reader's loader gives: CPU tensors
        out.append(batches[i] if reader else cls(**rest, **tensors))
    return out


def _header(batch) -> tuple:
    """(class, the non-tensor fields, {tensor field: (shape, dtype)}) of a dataclass batch."""
    rest, specs = {}, {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            specs[f.name] = (tuple(value.shape), value.dtype)
        else:
            rest[f.name] = value
    return type(batch), rest, specs


def collect_common(state: TrainState, scheduler, loader, dp_rank: int, extra: dict, reads: bool = True) -> dict:
    """The checkpoint's plain part. Collective: every rank calls it. `reads`: this rank's loader
    is the one that reads (TP rank 0, see next_batches); its peers' loaders stand still."""
    loaders = [x for x in gather_objects((dp_rank, loader.state_dict()) if reads else None) if x is not None]
    per_dp = {r: s for r, s in loaders}  # the reading ranks of one replica hold the same state
    return {"train": state.to_dict(), "scheduler": scheduler.state_dict(),
            "loader": [per_dp[r] for r in sorted(per_dp)], **extra}


def restore_common(common: dict, scheduler, loader, pg) -> TrainState:
    """Inverse of collect_common on this rank (any layout); RNG only when the layout is the same."""
    loader.load_state_dict(common["loader"])
    scheduler.load_state_dict(common["scheduler"])
    mine = ckpt.saved_rank_state(common, pg)
    if mine is not None:
        ckpt.set_rng_state(mine["rng"])
    return TrainState.from_dict(common["train"])
