"""The ViT layer spec: which implementation backs each part of a transformer layer.

The architecture is fixed (pre-norm RMSNorm, qkv with bias, packed 2D-RoPE attention, SwiGLU
MLP); only the implementations change. With transformer-engine (GPU) the norms are fused into the
following column-parallel linear and attention is TE's fused varlen kernel; without it the same
layer is built from megatron's local tensor-parallel linears, our RMSNorm and packed SDPA. Both
give the same parameter shapes apart from where the norm weights live (see convert/).
"""

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from finevit.models.attention import PackedSDPAttention, te_packed_attention_class
from finevit.models.norm import RMSNorm


def have_transformer_engine() -> bool:
    return te_packed_attention_class() is not None


def _layer(norm, qkv, core_attention, proj, fc1, fc2) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=core_attention, linear_proj=proj,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=partial(MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def vision_layer_spec(use_te: bool) -> ModuleSpec:
    if not use_te:
        return _layer(RMSNorm, ColumnParallelLinear, PackedSDPAttention, RowParallelLinear,
                      ColumnParallelLinear, RowParallelLinear)
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    # TE fuses each norm into the linear that follows it, so the layer's own norms are identities.
    return _layer(IdentityOp, TELayerNormColumnParallelLinear, te_packed_attention_class(),
                  TERowParallelLinear, TELayerNormColumnParallelLinear, TERowParallelLinear)


def attention_backend(use_te: bool) -> str:
    return "transformer-engine fused THD attention" if use_te else "torch SDPA per packed segment"
