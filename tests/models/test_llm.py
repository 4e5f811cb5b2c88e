"""The LLM on megatron-core equals Hugging Face's Qwen2 / Qwen3 on the same (tiny, random) weights:
logits within 1e-4 (fp32) on a packed row of two samples and padding, each sample compared
with HF run on it alone; a wrong q/k/v regrouping is caught."""

import pytest
import torch

from finevit.config import ParallelConfig
from finevit.config.model import LLMConfig
from finevit.convert import qwen2 as conv
from finevit.models.llm import build_llm, text_positions
from tiny_llm import CASES, LENGTHS, hf_model, packed_batch


def ours_from(hf, llm: LLMConfig, groups):
    torch.manual_seed(0)
    model = build_llm(llm, ParallelConfig(), groups, use_te=False).eval()
    conv.load_hf_llm([model], hf.state_dict(), llm, 0, 1)
    return model


def max_diff_per_sample(model, hf, llm) -> float:
    ids, params = packed_batch(llm)
    with torch.no_grad():
        ours = model(ids, text_positions(params), None, packed_seq_params=params)  # [1, s, V]
        worst, start = 0.0, 0
        for n in LENGTHS:
            theirs = hf(input_ids=ids[:, start:start + n]).logits
            worst = max(worst, (ours[:, start:start + n] - theirs).abs().max().item())
            start += n
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_hugging_face(solo_groups, name):
    llm = CASES[name]
    hf = hf_model(llm)
    model = ours_from(hf, llm, solo_groups)
    assert max_diff_per_sample(model, hf, llm) < 1e-4
    # And back: our weights export to the HF names, exactly.
    canonical = {n: p.detach() for n, p in model.named_parameters()}
    if llm.tie_embeddings:
        canonical["output_layer.weight"] = canonical["embedding.word_embeddings.weight"]
    exported = conv.canonical_to_hf(canonical, llm)
    theirs = hf.state_dict()
    expected = {k for k in theirs if not (llm.tie_embeddings and k == "lm_head.weight")}
    assert exported.keys() == expected and all(torch.equal(exported[k], theirs[k]) for k in exported)


def test_a_plain_qkv_concatenation_is_caught(solo_groups, monkeypatch):
    llm = CASES["qwen2_untied"]
    hf = hf_model(llm)
    monkeypatch.setattr(conv, "_qkv_to_megatron", lambda q, k, v, llm: torch.cat([q, k, v]))
    assert max_diff_per_sample(ours_from(hf, llm, solo_groups), hf, llm) > 1e-2


def test_flops_are_the_hand_count():
    from finevit.models.llm.flops import llm_train_flops

    llm = CASES["qwen3"]  # h 64, 4 heads of 24 (q 96), 2 kv heads (kv 48), ffn 96, vocab 96, 2 layers
    # Per token and layer: qkv 2*64*(96+96) = 24576, proj 2*96*64 = 12288, SwiGLU 2*3*64*96 = 36864;
    # logits 2*64*96 = 12288. Samples of 3 and 1 tokens: 4 tokens, 6 + 1 causal pairs, each 4*96
    # per layer (scores and weighted values).
    per_token = 2 * (24576 + 12288 + 36864) + 12288
    assert llm_train_flops(llm, [3, 1]) == 3 * (4 * per_token + 2 * 7 * 4 * 96)
