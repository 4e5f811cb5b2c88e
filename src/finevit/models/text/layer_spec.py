"""The text layer spec: SigLIP's encoder layer from megatron-core parts.

Pre-norm LayerNorm, qkv with bias, bidirectional attention (no causal mask), GELU(tanh) MLP.
As for the vision tower only the implementations change with transformer-engine: TE fuses each
norm into the following column-parallel linear and attends with its fused kernel; the local spec
uses megatron's tensor-parallel linears, torch's LayerNorm and SDPA. Attention takes an optional
key-padding mask, needed only by "eos" pooling ("last" pooling is SigLIP's: no mask at all).
"""


import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.models.attention import LocalCoreAttention
from finevit.models.layers import transformer_layer_spec


class LayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm with megatron's norm constructor. megatron's WrappedTorchNorm would
    build it too, but always in fp32 whatever `params_dtype` says."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


class MaskedSDPAttention(LocalCoreAttention):
    """Core attention by torch SDPA over [s, b, heads, d] (sbhd), with megatron's mask convention:
    `attention_mask` [b, 1, 1, s] bool, True where a key is padding (None: attend everywhere)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        s, b, heads, dim = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, h, d] -> [b, h, s, d]
        keep = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)  # [b, h, s, d] -> [s, b, h*d]


def text_block_spec(use_te: bool, num_layers: int, masked: bool) -> TransformerBlockSubmodules:
    """All layers of the tower and the final LayerNorm. masked=True ("eos" pooling) makes the
    attention take a key-padding mask; TE needs to know at build time (its "padding" type)."""
    mask_type = AttnMaskType.padding if masked else AttnMaskType.no_mask
    if not use_te:
        layer = transformer_layer_spec(LayerNorm, ColumnParallelLinear, MaskedSDPAttention, RowParallelLinear,
                       ColumnParallelLinear, RowParallelLinear, mask_type)
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=LayerNorm)
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    # TE fuses each norm into the linear that follows it, so the layer's own norms are identities.
    layer = transformer_layer_spec(IdentityOp, TELayerNormColumnParallelLinear, TEDotProductAttention,
                   TERowParallelLinear, TELayerNormColumnParallelLinear, TERowParallelLinear,
                   mask_type)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TENorm)
