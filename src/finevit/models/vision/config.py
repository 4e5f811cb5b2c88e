"""Build megatron's TransformerConfig for the vision tower from our typed configs."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.config import ParallelConfig, VisionConfig
from finevit.models.megatron_config import layout_fields, runtime_fields


@dataclass
class VisionTransformerConfig(TransformerConfig):
    # 0-based indices of the layers that attend within windows (read by the core attention).
    window_layers: tuple = field(default_factory=tuple)


def vision_transformer_config(vision: VisionConfig, parallel: ParallelConfig, dtype: str = "fp32",
                              use_te: bool = False) -> VisionTransformerConfig:
    return VisionTransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        ffn_hidden_size=vision.ffn_hidden_size,
        kv_channels=vision.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=vision.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=vision.linear_bias,
        add_qkv_bias=vision.qkv_bias,
        init_method_std=vision.init_std,
        bias_activation_fusion=torch.cuda.is_available() and use_te,
        window_layers=tuple(vision.window_layers),
        **layout_fields(parallel),
        **runtime_fields(parallel, dtype, parallel.recompute_num_layers),
    )
