"""Build the decoder LLM for this rank: megatron's TransformerConfig from LLMConfig, and GPTModel.

Settings that make megatron-core compute exactly what Hugging Face's Qwen2 / Qwen3 compute
(measured, ../shared/notes/stage2.md): RMSNorm, SwiGLU (gated silu) without biases, q/k/v bias
for Qwen2 and a q/k RMSNorm for Qwen3, an explicit head_dim (kv_channels), grouped query
attention (num_query_groups), `rotary_base` passed to GPTModel (a wrong base moves the logits by
~1.6), and M-RoPE positions [3, b, s] so that packed samples and image tokens get their own.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from finevit.config import ParallelConfig
from finevit.config.model import LLMConfig
from finevit.models.llm.layer_spec import llm_block_spec
from finevit.models.megatron_config import layout_fields, runtime_fields
from finevit.models.vision.layer_spec import have_transformer_engine


def llm_transformer_config(llm: LLMConfig, parallel: ParallelConfig, dtype: str = "fp32",
                           first_stage_layers: Optional[int] = None, use_te: bool = False) -> TransformerConfig:
    """first_stage_layers: decoder layers on the first pipeline stage, when it also holds the
    vision tower (the rest split evenly); None splits them all evenly."""
    uneven = {}
    if first_stage_layers is not None and parallel.pipeline > 1:
        uneven = {"num_layers_in_first_pipeline_stage": first_stage_layers}
    return TransformerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_heads,
        num_query_groups=llm.num_kv_heads,
        kv_channels=llm.kv_channels,
        ffn_hidden_size=llm.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=llm.family == "qwen2",
        qk_layernorm=llm.family == "qwen3",
        mrope_section=list(llm.mrope_section),
        init_method_std=llm.init_std,
        bias_activation_fusion=torch.cuda.is_available() and use_te,
        **layout_fields(parallel),
        **runtime_fields(parallel, dtype, recompute_num_layers=1),
        **uneven,
    )


def build_llm(llm: LLMConfig, parallel: ParallelConfig, pg_collection: ProcessGroupCollection,
              dtype: str = "fp32", pre_process: bool = True, post_process: bool = True,
              vp_stage: Optional[int] = None, use_te: Optional[bool] = None,
              first_stage_layers: Optional[int] = None, scatter_embeddings: bool = True) -> GPTModel:
    """This rank's part of the LLM (tensor-parallel over pg_collection.tp, this pipeline stage's
    layers). forward(input_ids [1, s], position_ids [3, 1, s], None, decoder_input=None or
    [s, 1, h], packed_seq_params=LLMPackedSeqParams) -> logits [1, s, vocab / tp] on the last
    stage, hidden states [s, 1, h] elsewhere. scatter_embeddings=False leaves the embedding's
    output whole under sequence parallelism (the VLM splices images in first, then scatters)."""
    if use_te is None:
        use_te = have_transformer_engine()
    config = llm_transformer_config(llm, parallel, dtype, first_stage_layers, use_te)
    local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pg_collection.pp.rank())
    spec = llm_block_spec(use_te, qk_norm=llm.family == "qwen3", local_layers=local)
    return GPTModel(config, spec, vocab_size=llm.vocab_size, max_sequence_length=llm.max_positions,
                    pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=llm.tie_embeddings,
                    position_embedding_type="mrope", rotary_base=int(llm.rope_theta),
                    scatter_embedding_sequence_parallel=scatter_embeddings,
                    pg_collection=pg_collection, vp_stage=vp_stage)
