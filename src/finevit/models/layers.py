"""The transformer layer both towers share, as a megatron ModuleSpec; the towers' layer specs
(vision/layer_spec.py, text/layer_spec.py) only choose the implementations that fill it."""

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


def transformer_layer_spec(norm, qkv, core_attention, proj, fc1, fc2,
                           mask_type: AttnMaskType = AttnMaskType.no_mask, qk_norm=IdentityOp) -> ModuleSpec:
    """Pre-norm self-attention + MLP with residuals (norms are identities where TE fuses them);
    qk_norm normalises each head's queries and keys (Qwen3)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=core_attention, linear_proj=proj,
                    q_layernorm=qk_norm, k_layernorm=qk_norm),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=partial(MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
