"""Tiny random Qwen2 / Qwen3 LLMs for the parity tests: our config, HF's model, a packed row."""

import dataclasses

import torch

from finevit.config.model import LLMConfig
from finevit.convert import qwen2 as conv
from finevit.models.llm.packing import segments
from unit_scale import randomize_

LENGTHS, ROW = [7, 5], 16  # two samples and 4 tokens of padding in one row
TINY = LLMConfig(family="qwen2", vocab_size=96, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=96, rope_theta=1e6, mrope_section=[2, 3, 3], max_positions=64,
                 tie_embeddings=False)
CASES = {
    "qwen2_untied": TINY,
    "qwen2_tied": dataclasses.replace(TINY, tie_embeddings=True),
    # Qwen3: q/k norms, no q/k/v bias, a head_dim that is not hidden / heads
    "qwen3": dataclasses.replace(TINY, family="qwen3", head_dim=24, mrope_section=[4, 4, 4]),
}


def hf_model(llm: LLMConfig):
    """A random HF causal LM of `llm`'s shape, at unit scale (std 0.02 would hide a head mix-up)."""
    import transformers

    cfg = conv.hf_config_from_llm(llm)
    arch = cfg.pop("architectures")[0]
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = getattr(transformers, arch)(config).eval()
    randomize_(model, seed=3)
    return model


def packed_batch(llm: LLMConfig, seed: int = 0):
    """(input ids [1, ROW], the row's LLMPackedSeqParams)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.vocab_size, (1, ROW), generator=g), segments(LENGTHS, ROW)
