"""Packed variable-length sequences: many images in one token sequence.

megatron-core's attention receives `PackedSeqParams`. We keep its qkv_format at "sbhd" on
purpose: our 2D rotary embedding is one frequency row per token, and in sbhd megatron applies it
position-wise in one vectorised op, whereas the thd path loops over sequences with a host sync
each. The core attention (ours, see `attention.py`) is what reads the cu_seqlens and attends
within segments. Window layers read `window_cu_seqlens` instead.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class VisionPackedSeqParams(PackedSeqParams):
    # Boundaries of the attention windows (window layers only); None when no layer uses windows.
    window_cu_seqlens: Optional[torch.Tensor] = None
    window_max_seqlen: Optional[int] = None

    def for_layer(self, window: bool) -> tuple[torch.Tensor, int]:
        if window and self.window_cu_seqlens is not None:
            return self.window_cu_seqlens, self.window_max_seqlen
        return self.cu_seqlens_q, self.max_seqlen_q


def make_packed_seq_params(cu_seqlens: torch.Tensor,
                           window_cu_seqlens: Optional[torch.Tensor] = None) -> VisionPackedSeqParams:
    """cu_seqlens must cover every token of the sequence (padding as its own final segment)."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    win_max = None
    if window_cu_seqlens is not None:
        window_cu_seqlens = window_cu_seqlens.to(torch.int32)
        win_max = int((window_cu_seqlens[1:] - window_cu_seqlens[:-1]).max())
    return VisionPackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
        window_cu_seqlens=window_cu_seqlens,
        window_max_seqlen=win_max,
    )
