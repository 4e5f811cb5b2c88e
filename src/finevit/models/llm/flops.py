"""Model FLOPs of the LLM for a packed row (throughput and MFU logging), with the encoder's
conventions (models/vision/flops.py): a multiply-add is 2 FLOPs, training is 3x forward, padding
does no useful work, and attention is counted per sample, causally: token i of a sample scores
i + 1 keys (a VLM step adds the encoder's FLOPs of its images)."""

from finevit.config.model import LLMConfig


def llm_forward_flops(llm: LLMConfig, lengths: list[int]) -> int:
    """Forward FLOPs of samples of `lengths` tokens (logits of every token included)."""
    h, f, d = llm.hidden_size, llm.ffn_hidden_size, llm.kv_channels
    q, kv = llm.num_heads * d, llm.num_kv_heads * d
    per_token = llm.num_layers * (2 * h * (q + 2 * kv) + 2 * q * h + 2 * 3 * h * f) + 2 * h * llm.vocab_size
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)  # causal query-key pairs
    return tokens * per_token + llm.num_layers * pairs * 2 * 2 * q  # QK^T and AV per pair


def llm_train_flops(llm: LLMConfig, lengths: list[int]) -> int:
    return 3 * llm_forward_flops(llm, lengths)
