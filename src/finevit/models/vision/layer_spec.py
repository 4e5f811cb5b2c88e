"""The ViT layer spec: which implementation backs each part of a transformer layer.

The architecture is fixed (pre-norm RMSNorm, qkv with bias, packed 2D-RoPE attention, SwiGLU
MLP); only the implementations change. With transformer-engine (GPU) the norms are fused into the
following column-parallel linear and attention is TE's fused varlen kernel; without it the same
layer is built from megatron's local tensor-parallel linears, our RMSNorm and packed SDPA. Both
give the same parameter shapes apart from where the norm weights live (see convert/).
"""

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from finevit.models.attention import PackedSDPAttention, te_packed_attention_class
from finevit.models.layers import transformer_layer_spec
from finevit.models.norm import RMSNorm


def have_transformer_engine() -> bool:
    return te_packed_attention_class() is not None


def vision_layer_spec(use_te: bool) -> ModuleSpec:
    if not use_te:
        return transformer_layer_spec(RMSNorm, ColumnParallelLinear, PackedSDPAttention, RowParallelLinear,
                      ColumnParallelLinear, RowParallelLinear)
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    # TE fuses each norm into the linear that follows it, so the layer's own norms are identities.
    return transformer_layer_spec(IdentityOp, TELayerNormColumnParallelLinear, te_packed_attention_class(),
                  TERowParallelLinear, TELayerNormColumnParallelLinear, TERowParallelLinear)


def attention_backend(use_te: bool) -> str:
    return "transformer-engine fused THD attention" if use_te else "torch SDPA per packed segment"
