"""TransformerConfig fields every tower sets alike (vision, text, LLM): dtypes, where weights are
made, which fused kernels may run, activation recomputation, and the tensor / pipeline layout."""

import torch

from finevit.config import ParallelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def runtime_fields(parallel: ParallelConfig, dtype: str, recompute_num_layers: int) -> dict:
    """dtype (bf16 | fp16 | fp32); fused kernels only on GPU, and never the fused RoPE (our
    frequencies are per token: 2D positions in the ViT, M-RoPE in the LLM)."""
    torch_dtype, on_gpu = DTYPES[dtype], torch.cuda.is_available()
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": recompute_num_layers}}[parallel.recompute]
    return dict(pipeline_dtype=torch_dtype, params_dtype=torch_dtype, bf16=dtype == "bf16",
                fp16=dtype == "fp16", use_cpu_initialization=not on_gpu, hidden_dropout=0.0,
                attention_dropout=0.0, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                persist_layer_norm=False, bias_dropout_fusion=on_gpu, apply_rope_fusion=False, **recompute)


def layout_fields(parallel: ParallelConfig) -> dict:
    """Tensor, sequence and pipeline parallelism as megatron reads them."""
    return dict(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        # batch_p2p_comm=True silently swaps activations with PP=2 + virtual pipeline
        # (Megatron-LM #750, #1450); the interleaved schedule then needs overlapped p2p.
        batch_p2p_comm=False,
        overlap_p2p_comm=parallel.virtual_pipeline is not None,
    )
