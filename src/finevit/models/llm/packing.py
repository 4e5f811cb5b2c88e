"""Several samples in one LLM sequence: where each starts, and their positions.

A packed row holds samples back to back, then padding: `cu_seqlens` [n + 1] marks the samples'
token boundaries (the last one may be followed by padding, which sits in a segment of its own).
Attention is causal within a sample and never crosses into another; positions restart at 0 in
each sample. Positions are M-RoPE's [3, b, s] (t, h, w): a text token has the same index in all
three, an image token its (frame, row, column) offset (the VLM computes those).
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LLMPackedSeqParams:
    """Sample boundaries of one packed row (micro-batch size 1), token order `sbhd`.

    megatron's own PackedSeqParams with qkv_format "thd" would switch its rotary embedding to a
    path that needs every token, padding included, inside a segment; the local attention reads
    the boundaries from here instead and the rotary table comes from explicit positions.
    """

    cu_seqlens: torch.Tensor  # [n + 1] int32, 0 ... total
    max_seqlen: int
    qkv_format: str = "sbhd"
    cp_group: Optional[object] = None  # read by megatron's rotary embedding; no context parallelism


def segments(lengths: list[int], total: int) -> LLMPackedSeqParams:
    """Boundaries of samples of `lengths` tokens packed into a row of `total` (padding last)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if bounds[-1] > total:
        raise ValueError(f"samples of {sum(lengths)} tokens do not fit a row of {total}")
    if bounds[-1] < total:
        bounds.append(total)  # padding: a segment of its own, attending only to itself
    return LLMPackedSeqParams(torch.tensor(bounds, dtype=torch.int32), max(b - a for a, b in zip(bounds, bounds[1:])))


def text_positions(params: LLMPackedSeqParams) -> torch.Tensor:
    """[3, 1, s] positions restarting at 0 in each segment, equal in t, h and w (text only)."""
    bounds = params.cu_seqlens.tolist()
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    return pos.view(1, 1, -1).expand(3, 1, -1).contiguous()  # [s] -> [3, 1, s]
