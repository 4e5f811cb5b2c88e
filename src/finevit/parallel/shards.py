"""Map between a model's full (TP=1, PP=1) parameters and this rank's shards.

The canonical name of a parameter is its name in a TP=1, PP=1 model: pipeline chunks number
their layers from 0, so `decoder.layers.{i}` is renamed to the layer's global index. A
tensor-parallel parameter is a slice of the full tensor along `partition_dim`; with
`partition_stride` s > 1 (SwiGLU's fused [gate; up] projection has s = 2) the full tensor is s
blocks and each rank holds its slice of every block.
"""

import re
from typing import Iterator

import torch

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def canonical_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for every parameter of one model chunk."""
    for name, param in chunk.named_parameters():
        m = _LAYER.match(name)
        if m:
            layer = chunk.get_submodule(m.group(1).rstrip(".") + "." + m.group(2))
            name = f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"
        elif name.endswith("output_layer.weight") and getattr(param, "shared_embedding", False):
            # A tied output layer on a later pipeline stage: megatron's copy of the input
            # embedding (kept equal by the embedding group), which a TP=1, PP=1 model does not have.
            name = name[: -len("output_layer.weight")] + "embedding.word_embeddings.weight"
        yield name, param


def local_shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of `full` that `param` holds on tensor-parallel rank `tp_rank`."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = full.chunk(stride, dim=dim)  # [gate; up] -> gate, up
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def full_from_shards(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of local_shard: shards[r] is what rank r holds."""
    if not getattr(param, "tensor_model_parallel", False) or len(shards) == 1:
        return shards[0]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[b] for p in per_rank], dim=dim) for b in range(stride)], dim=dim)


@torch.no_grad()
def load_full_state(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor],
                    tp_rank: int, tp_size: int, skip: tuple = ()) -> None:
    """Copy a canonical (TP=1) state into this rank's chunks; every local parameter must be named
    (but those under a `skip` prefix, which keep their values)."""
    missing = []
    for chunk in chunks:
        for name, param in canonical_parameters(chunk):
            if skip and name.startswith(skip):
                continue
            if name not in full:
                missing.append(name)
                continue
            param.copy_(local_shard(full[name], param, tp_rank, tp_size))
    if missing:
        raise KeyError(f"the full state lacks {len(missing)} parameters of this model: {missing[:5]}")
