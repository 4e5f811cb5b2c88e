"""Multi-rank: the text tower under TP=2 equals the TP=1 tower; a HF import loads under TP=2.

Run through tests/parallel/test_multirank.py (4 gloo ranks: TP=2 x DP=2). The TP=1 reference is
built beside the parallel model in the same process, on singleton process groups, with the same
full weights; outputs and every local gradient shard are compared.
"""

import dataclasses

import pytest
import torch

from finevit.config import ParallelConfig, TextConfig
from finevit.models.text.build import build_text_encoder
from finevit.parallel.shards import canonical_parameters, load_full_state, local_shard
from unit_scale import randomize_

TEXT = TextConfig(vocab_size=64, max_positions=16, num_layers=2, hidden_size=32, num_heads=4,
                  ffn_hidden_size=48)
EMBED = 24
LENGTHS = [3, 10, 1, 7]
ATOL = 1e-5


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TEXT.vocab_size, (len(LENGTHS), 10), generator=g)
    for row, n in zip(ids, LENGTHS):
        row[n:] = TEXT.pad_id
    target = torch.randn(len(LENGTHS), EMBED, generator=g)
    return ids, torch.tensor(LENGTHS), target


def run(model, pooling):
    """Output and the loss's gradients (through every parameter) for one batch."""
    ids, lengths, target = batch()
    out = model(ids, lengths if pooling == "eos" else None)
    torch.nn.functional.mse_loss(out, target).backward()
    return out.detach()


@pytest.mark.parametrize("pooling", ["last", "eos"])
def test_tp2_equals_tp1(parallel_groups, solo_groups, pooling):
    text = dataclasses.replace(TEXT, pooling=pooling)
    torch.manual_seed(0)
    ref = build_text_encoder(text, EMBED, ParallelConfig(), solo_groups, use_te=False)
    randomize_(ref, seed=1)
    full = {name: p.detach().clone() for name, p in canonical_parameters(ref)}
    ref_out = run(ref, pooling)
    ref_grads = {name: p.grad for name, p in canonical_parameters(ref)}

    pg = parallel_groups(tp=2)
    tp_rank = pg.tp.rank()
    model = build_text_encoder(text, EMBED, ParallelConfig(tensor=2), pg, use_te=False)
    assert model.word_embeddings.weight.shape[0] == TEXT.vocab_size // 2
    load_full_state([model], full, tp_rank, 2)
    out = run(model, pooling)
    print(f"{pooling}: max |TP2 - TP1| output {(out - ref_out).abs().max():.2e}")
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    sharded = 0
    for name, param in canonical_parameters(model):
        want = local_shard(ref_grads[name], param, tp_rank, 2)
        torch.testing.assert_close(param.grad, want, atol=ATOL, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
        sharded += getattr(param, "tensor_model_parallel", False)
    assert sharded >= 1 + 4 * TEXT.num_layers  # vocab, and qkv / proj / fc1 / fc2 per layer


def test_hf_import_under_tp2(parallel_groups):
    from transformers import SiglipTextModel

    from finevit.convert.siglip_text import hf_config_from_text, load_hf_text

    torch.manual_seed(0)  # every rank builds the same HF model
    cfg = hf_config_from_text(TEXT, EMBED, hf_positions=10)
    cfg._attn_implementation = "eager"
    hf = SiglipTextModel(cfg).eval()
    pg = parallel_groups(tp=2)
    model = build_text_encoder(TEXT, EMBED, ParallelConfig(tensor=2), pg, use_te=False).eval()
    assert load_hf_text(model, hf) == 10
    ids, _, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).pooler_output, atol=ATOL, rtol=1e-4)
