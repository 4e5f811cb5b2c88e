"""Build megatron's TransformerConfig for the vision tower from our typed configs."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.config import ParallelConfig, VisionConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class VisionTransformerConfig(TransformerConfig):
    # 0-based indices of the layers that attend within windows (read by the core attention).
    window_layers: tuple = field(default_factory=tuple)


def vision_transformer_config(vision: VisionConfig, parallel: ParallelConfig, dtype: str = "fp32",
                              use_te: bool = False) -> VisionTransformerConfig:
    torch_dtype = DTYPES[dtype]
    on_gpu = torch.cuda.is_available()
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": parallel.recompute_num_layers}}[parallel.recompute]
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
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=vision.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=torch_dtype,
        params_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA; the rotary embedding must stay unfused in every case because
        # our frequencies are per token (2D positions), which TE's fused RoPE cannot express.
        bias_activation_fusion=on_gpu and use_te,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        # batch_p2p_comm=True silently swaps activations with PP=2 + virtual pipeline
        # (Megatron-LM #750, #1450); the interleaved schedule then needs overlapped p2p.
        batch_p2p_comm=False,
        overlap_p2p_comm=parallel.virtual_pipeline is not None,
        window_layers=tuple(vision.window_layers),
        **recompute,
    )
