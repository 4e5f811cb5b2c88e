"""The LLM's layer spec: a Qwen2 / Qwen3 decoder layer from megatron-core parts.

Pre-norm RMSNorm, grouped-query attention (q/k/v bias for Qwen2, a per-head q/k RMSNorm for
Qwen3), causal attention within each packed sample, SwiGLU MLP without bias. As for the towers,
only the implementations change with transformer-engine: TE fuses each norm into the following
column-parallel linear and attends with its fused THD kernel; the local spec uses megatron's
tensor-parallel linears, finevit's RMSNorm and SDPA per sample.
"""

from typing import Optional

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from finevit.models.attention import LocalCoreAttention, sdpa_packed, te_thd_attention
from finevit.models.layers import transformer_layer_spec
from finevit.models.llm.packing import LLMPackedSeqParams
from finevit.models.norm import RMSNorm


class PackedCausalAttention(LocalCoreAttention):
    """Core attention [s, 1, heads, d] (sbhd) -> [s, 1, heads * d]: causal within each packed
    sample (LLMPackedSeqParams), or over the whole row when there is none."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[LLMPackedSeqParams] = None):
        s, b, heads, dim = query.shape
        assert b == 1, "packed LLM sequences use micro-batch size 1"
        cu = packed_seq_params.cu_seqlens if packed_seq_params is not None else query.new_tensor([0, s]).int()
        out = sdpa_packed(query[:, 0], key[:, 0], value[:, 0], cu, self.softmax_scale, causal=True)
        return out.reshape(s, 1, heads * dim)


def te_packed_causal_attention_class():
    """TEDotProductAttention fed packed samples in THD layout, causal within each."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TEPackedCausalAttention(TEDotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
            super().__init__(config, layer_number, AttnMaskType.padding_causal, *args, **kwargs)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            p = packed_seq_params
            return te_thd_attention(super().forward, query, key, value, p.cu_seqlens, p.max_seqlen,
                                    AttnMaskType.padding_causal)

    return TEPackedCausalAttention


def llm_block_spec(use_te: bool, qk_norm: bool, local_layers: int) -> ModuleSpec:
    """This pipeline stage's `local_layers` decoder layers and, on the last, the final RMSNorm."""
    if not use_te:
        layer = transformer_layer_spec(RMSNorm, ColumnParallelLinear, PackedCausalAttention, RowParallelLinear,
                                       ColumnParallelLinear, RowParallelLinear, AttnMaskType.causal,
                                       qk_norm=RMSNorm if qk_norm else IdentityOp)
        final = RMSNorm
    else:
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        # TE fuses each norm into the linear that follows it, so the layer's own norms are identities.
        layer = transformer_layer_spec(IdentityOp, TELayerNormColumnParallelLinear,
                                       te_packed_causal_attention_class(), TERowParallelLinear,
                                       TELayerNormColumnParallelLinear, TERowParallelLinear,
                                       AttnMaskType.causal, qk_norm=TENorm if qk_norm else IdentityOp)
        final = TENorm
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[layer] * local_layers, layer_norm=final))
