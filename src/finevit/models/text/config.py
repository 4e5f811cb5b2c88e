"""Build megatron's TransformerConfig for the text tower from TextConfig.

The architecture is SigLIP's text encoder: pre-LN LayerNorm (with bias), qkv and every linear with
bias, a non-gated MLP with GELU in its tanh approximation (HF's `gelu_pytorch_tanh`), no dropout.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.config import ParallelConfig, TextConfig
from finevit.models.megatron_config import runtime_fields


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """SigLIP's activation. A named function (not F.gelu) so that megatron never swaps in its
    fused bias-GELU: that one is the tanh form, while unfused F.gelu is the erf form, and the
    tower would compute a different function on GPU and CPU."""
    return F.gelu(x, approximate="tanh")


def text_transformer_config(text: TextConfig, parallel: ParallelConfig,
                            dtype: str = "fp32") -> TransformerConfig:
    """The tower is tensor-parallel only: it lives whole on the last pipeline stage, so the
    pipeline size megatron sees here is always 1 (layer numbering then starts at 1 on every
    rank), and sequence parallelism stays off (texts are short; the torch LayerNorm of the local
    spec cannot take it)."""
    return TransformerConfig(
        num_layers=text.num_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_heads,
        ffn_hidden_size=text.ffn_hidden_size,
        kv_channels=text.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=text.norm_eps,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        add_bias_linear=True,
        add_qkv_bias=True,
        init_method_std=text.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        bias_activation_fusion=False,  # see gelu_tanh
        # One layer per recomputed block: the vision's recompute_num_layers may exceed this depth.
        **runtime_fields(parallel, dtype, recompute_num_layers=1),
    )
