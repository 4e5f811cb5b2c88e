"""The stage-2 decoder LLM (Qwen2 / Qwen2.5 / Qwen3 family) on megatron-core's GPTModel."""

from finevit.models.llm.build import build_llm, llm_transformer_config
from finevit.models.llm.packing import LLMPackedSeqParams, text_positions

__all__ = ["LLMPackedSeqParams", "build_llm", "llm_transformer_config", "text_positions"]
