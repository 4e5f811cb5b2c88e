"""SigLIP / SigLIP2 text tower <-> finevit: output parity with Hugging Face, exact round trips,
the longer position table, the TE renames, the config mapping and the errors on bad inputs."""

import dataclasses

import pytest
import torch

from finevit.config import ParallelConfig, TextConfig
from finevit.convert.siglip_text import (
    ConversionError,
    canonical_shapes,
    canonical_to_hf,
    hf_config_from_text,
    hf_shapes,
    hf_to_canonical,
    load_hf_text,
    local_to_te,
    te_to_local,
    text_config_from_hf,
    text_tower_state,
)
from finevit.convert.qwen2_5_vl import strip_extra_state
from unit_scale import randomize_

TOL = 1e-5  # fp32
TEXT = TextConfig(vocab_size=96, max_positions=12, num_layers=2, hidden_size=32, num_heads=4,
                  ffn_hidden_size=48, pad_id=1)
EMBED = 24
FLAVORS = pytest.mark.parametrize("siglip2", [False, True], ids=["siglip", "siglip2"])


def hf_text(siglip2: bool, positions: int = TEXT.max_positions, seed: int = 0):
    from transformers import Siglip2TextModel, SiglipTextModel

    cfg = hf_config_from_text(TEXT, EMBED, siglip2=siglip2, hf_positions=positions)
    cfg._attn_implementation = "eager"
    model = (Siglip2TextModel if siglip2 else SiglipTextModel)(cfg).float().eval()
    randomize_(model, seed)
    return model


def ours(pg, text: TextConfig = TEXT, seed: int = 1):
    from finevit.models.text.build import build_text_encoder

    model = build_text_encoder(text, EMBED, ParallelConfig(), pg, dtype="fp32", use_te=False).eval()
    randomize_(model, seed)
    return model


def token_ids(n: int, seq_len: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, TEXT.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@FLAVORS
def test_expected_shapes_match_both_real_models(tp1_groups, siglip2):
    hf = hf_text(siglip2)
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == hf_shapes(TEXT, EMBED)
    mine = strip_extra_state(ours(tp1_groups).state_dict())
    assert {k: tuple(v.shape) for k, v in mine.items()} == canonical_shapes(TEXT, EMBED)


@FLAVORS
def test_pooled_output_parity(tp1_groups, siglip2):
    """HF with 8 positions into ours with 12: the first 8 rows carry HF's table."""
    hf = hf_text(siglip2, positions=8)
    model = ours(tp1_groups, seed=3)
    assert load_hf_text(model, hf) == 8
    assert model.position_embeddings.weight[8:].abs().sum() == 0
    wrong = ours(tp1_groups, seed=3)
    raw = hf_to_canonical(hf.state_dict(), TEXT, EMBED)
    for i in range(TEXT.num_layers):  # control: HF's [q; k; v] rows without the head interleave
        for p in ("weight", "bias"):
            raw[f"decoder.layers.{i}.self_attention.linear_qkv.{p}"] = torch.cat(
                [hf.state_dict()[f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"])
    wrong.load_state_dict(raw, strict=False)
    for seq_len in (8, 5):  # SigLIP's padded length, and a shorter one (first rows of both tables)
        ids = token_ids(4, seq_len)
        with torch.no_grad():
            ref = hf(input_ids=ids).pooler_output
            out, bad = model(ids), wrong(ids)
        print(f"siglip2={siglip2} L={seq_len}: max |ours - HF| = {max_diff(out, ref):.2e}, "
              f"output std {ref.std():.2f}, un-interleaved qkv {max_diff(bad, ref):.2e}")
        assert ref.shape == (4, EMBED)
        assert max_diff(out, ref) <= TOL
        assert max_diff(bad, ref) > 100 * TOL


@FLAVORS
def test_round_trips_are_exact(tp1_groups, siglip2):
    hf_state = hf_text(siglip2).state_dict()
    back = canonical_to_hf(hf_to_canonical(hf_state, TEXT, EMBED), TEXT, EMBED)
    assert list(back) == list(hf_state)  # also the order HF saves in
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)

    short = hf_text(siglip2, positions=8).state_dict()  # through our longer table and back
    back = canonical_to_hf(hf_to_canonical(short, TEXT, EMBED), TEXT, EMBED, hf_positions=8)
    assert all(torch.equal(back[k], short[k]) for k in short)

    mine = ours(tp1_groups).state_dict()  # with `_extra_state` entries
    back = hf_to_canonical(canonical_to_hf(mine, TEXT, EMBED), TEXT, EMBED)
    assert list(back) == list(strip_extra_state(mine))
    assert all(torch.equal(back[k], mine[k]) for k in back)


def test_exported_model_matches_ours(tp1_groups):
    """finevit -> HF: the HF model built from our config computes our output."""
    from transformers import SiglipTextModel

    model = ours(tp1_groups, seed=4)
    cfg = hf_config_from_text(TEXT, EMBED)
    cfg._attn_implementation = "eager"
    hf = SiglipTextModel(cfg).eval()
    hf.load_state_dict(canonical_to_hf(model.state_dict(), TEXT, EMBED), strict=True)
    ids = token_ids(3, TEXT.max_positions, seed=5)
    with torch.no_grad():
        assert max_diff(model(ids), hf(input_ids=ids).pooler_output) <= TOL


def test_full_model_state_and_te_names(tp1_groups):
    hf_state = hf_text(False).state_dict()
    full = {"logit_scale": torch.zeros(1), "vision_model.head.probe": torch.zeros(1, 1, 32), **hf_state}
    assert text_tower_state(full) == hf_state
    with pytest.raises(ConversionError, match="not a SigLIP text tower"):
        text_tower_state({"logit_scale": torch.zeros(1)})

    local = ours(tp1_groups).state_dict()
    te = local_to_te(local)
    renamed = sorted(set(te) - set(local))
    assert renamed == sorted(f"decoder.layers.{i}.{m}.layer_norm_{p}" for i in range(2) for p in
                             ("weight", "bias") for m in ("self_attention.linear_qkv", "mlp.linear_fc1"))
    assert "decoder.final_layernorm.bias" in te  # the final norm is a norm under both specs
    back = te_to_local(te)
    assert list(back) == list(local) and all(back[k] is local[k] for k in local)
    with pytest.raises(ConversionError, match="apply te_to_local first"):
        canonical_to_hf(te, TEXT, EMBED)


def test_bad_state_dicts_raise_one_clear_error():
    hf_state = {k: torch.zeros(s) for k, s in hf_shapes(TEXT, EMBED).items()}
    del hf_state["text_model.encoder.layers.1.self_attn.q_proj.bias"]
    hf_state["text_model.head.weight"] = torch.zeros(7, 32)
    with pytest.raises(ConversionError) as err:
        hf_to_canonical(hf_state, TEXT, EMBED)
    assert str(err.value) == (
        "Hugging Face SigLIP text state dict does not match the config: "
        "missing text_model.encoder.layers.1.self_attn.q_proj.bias; "
        "wrong shape text_model.head.weight (7, 32) (expected (24, 32)).")
    too_long = {k: torch.zeros(s) for k, s in hf_shapes(TEXT, EMBED, hf_positions=13).items()}
    with pytest.raises(ConversionError, match="HF has 13 positions, more than max_positions=12"):
        hf_to_canonical(too_long, TEXT, EMBED)
    mine = {k: torch.zeros(s) for k, s in canonical_shapes(TEXT, EMBED).items()}
    with pytest.raises(ConversionError, match="cannot export 13 positions from 12"):
        canonical_to_hf(mine, TEXT, EMBED, hf_positions=13)


def test_config_mapping():
    from transformers import Siglip2TextConfig, SiglipConfig, SiglipTextConfig

    hf = SiglipTextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=12, pad_token_id=1,
                          projection_size=24)
    text, embed_dim = text_config_from_hf(hf)
    assert (text, embed_dim) == (TEXT, EMBED)
    assert text_config_from_hf(hf, max_positions=64)[0].max_positions == 64
    assert hf_config_from_text(text, embed_dim).to_diff_dict() == hf.to_diff_dict()
    assert isinstance(hf_config_from_text(text, embed_dim, siglip2=True), Siglip2TextConfig)
    # config.json of a full SigLIP model (text part under "text_config"), and the object itself
    full = SiglipConfig(text_config=hf.to_dict())
    assert text_config_from_hf(full.to_dict()) == (TEXT, EMBED)
    assert text_config_from_hf(full) == (TEXT, EMBED)

    with pytest.raises(ConversionError, match="hidden_act='gelu' is not supported"):
        text_config_from_hf(SiglipTextConfig(hidden_act="gelu"))
    with pytest.raises(ConversionError, match="max_positions=32 is shorter than HF's 64"):
        text_config_from_hf(SiglipTextConfig(), max_positions=32)
    with pytest.raises(ConversionError, match="pooling='eos' has no SigLIP equivalent"):
        hf_config_from_text(dataclasses.replace(TEXT, pooling="eos"), EMBED)
