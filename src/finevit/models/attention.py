"""Core attention over packed sequences: tokens attend only within their own segment.

Two implementations behind one contract (inputs [s, 1, heads, head_dim] in sbhd, output
[s, 1, heads * head_dim], segments from `VisionPackedSeqParams`):
* `PackedSDPAttention`: torch scaled_dot_product_attention per segment. Exact and dependency
  free: the CPU path, and the GPU fallback when transformer-engine is absent.
* `TEPackedAttention`: transformer-engine's fused THD (varlen) attention.
A layer listed in VisionConfig.window_layers uses the window segments instead of the image ones.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.models.packing import VisionPackedSeqParams


def _is_window_layer(config: TransformerConfig, layer_number: int) -> bool:
    # layer_number is megatron's global, 1-based index (pipeline offset included).
    return (layer_number - 1) in getattr(config, "window_layers", ())


def sdpa_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """q, k, v: [t, heads, head_dim] -> [t, heads, head_dim], attention within segments (causal
    within each one with `causal`). k and v may have fewer heads (grouped-query attention)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [len, h, d] -> [h, len, d]: SDPA batches over heads.
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, scale=scale, is_causal=causal, enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1)
    return out


class LocalCoreAttention(MegatronModule):
    """What the local (torch SDPA) core attentions share: megatron's constructor signature, no
    context parallelism, the softmax scale megatron hands over."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError(f"{type(self).__name__} does not support context parallelism")
        self.layer_number, self.softmax_scale = layer_number, softmax_scale


class PackedSDPAttention(LocalCoreAttention):
    """Drop-in for megatron's DotProductAttention that supports packed sequences."""

    def __init__(self, config: TransformerConfig, layer_number: int, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self.window = _is_window_layer(config, layer_number)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[VisionPackedSeqParams] = None):
        s, b, heads, dim = query.shape
        if packed_seq_params is None:
            # One unpacked sequence per batch entry: [s, b, h, d] -> [b, h, s, d].
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)
        assert b == 1, "packed sequences use micro-batch size 1"
        cu_seqlens, _ = packed_seq_params.for_layer(self.window)
        out = sdpa_packed(query[:, 0], key[:, 0], value[:, 0], cu_seqlens, self.softmax_scale)
        return out.reshape(s, 1, heads * dim)


def te_packed_attention_class():
    """TEDotProductAttention fed packed segments in THD layout (None without transformer-engine)."""
    try:
        import transformer_engine  # noqa: F401  (megatron's TE module imports without it, as mocks)
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except (ImportError, OSError):  # OSError: TE installed but no GPU libraries (cuDNN)
        return None
    from megatron.core.transformer.enums import AttnMaskType

    class TEPackedAttention(TEDotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
            # THD attention with segment boundaries is TE's "padding" mask type.
            super().__init__(config, layer_number, AttnMaskType.padding, *args, **kwargs)
            self.window = _is_window_layer(config, layer_number)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            cu, max_len = packed_seq_params.for_layer(self.window)
            return te_thd_attention(super().forward, query, key, value, cu, max_len, AttnMaskType.padding)

    return TEPackedAttention


def te_thd_attention(te_forward, query, key, value, cu_seqlens, max_len: int, mask_type):
    """Packed [s, 1, heads, d] (sbhd) through a TEDotProductAttention forward in THD layout, with
    segments `cu_seqlens` -> [s, 1, heads * d]."""
    from megatron.core.packed_seq_params import PackedSeqParams

    s, _, heads, dim = query.shape
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                          max_seqlen_q=max_len, max_seqlen_kv=max_len)
    out = te_forward(query[:, 0], key[:, 0], value[:, 0], None, attn_mask_type=mask_type, packed_seq_params=thd)
    return out.reshape(s, 1, heads * dim)
