"""Qwen2.5-VL <-> finevit conversion: output parity with Hugging Face's vision tower, exact round
trips, temporal patch size conversion, the TE renames, and the errors on bad inputs."""

import pytest
import torch

from finevit.config import ParallelConfig, VisionConfig
from finevit.convert.qwen2_5_vl import (
    ConversionError,
    canonical_shapes,
    canonical_to_hf,
    hf_config_from_vision,
    hf_shapes,
    hf_to_canonical,
    local_to_te,
    resample_temporal,
    strip_extra_state,
    te_to_local,
    vision_config_from_hf,
    vision_tower_state,
)

TOL = 1e-4  # fp32; measured differences are ~1e-6
FULL_GRIDS = [[1, 4, 6], [1, 2, 2], [1, 6, 4]]
# window_size 56 = 2x2 merge groups: 8x12 tiles exactly, 6x10 and 10x6 leave partial windows,
# the 2-tubelet video has two windows per frame, and 2x6 is one row of merge groups.
WINDOW_GRIDS = [[1, 8, 12], [1, 6, 10], [2, 4, 8], [1, 10, 6], [1, 2, 6]]


def tiny_vision(**overrides) -> VisionConfig:
    fields = dict(num_layers=3, hidden_size=64, num_heads=4, ffn_hidden_size=96, out_hidden_size=48,
                  window_size=56, temporal_patch_size=2)
    return VisionConfig(**{**fields, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, norms and biases included, at unit activation scale so
    attention is far from uniform: a mixed-up head, q/k/v or gate/up then shows far above TOL."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name or "ln_q" in name else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)  # std 1/sqrt(fan_in)


def hf_tower(vision: VisionConfig, temporal_patch_size: int = 2, seed: int = 0):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    cfg = hf_config_from_vision(vision, temporal_patch_size)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VisionTransformerPretrainedModel(cfg).float().eval()
    randomize_(model, seed)
    return model


def our_encoder(vision: VisionConfig, pg, state=None, seed: int = 1):
    from finevit.models.vision.build import build_vision_encoder

    model = build_vision_encoder(vision, ParallelConfig(), pg, dtype="fp32", use_te=False)[0].eval()
    if state is None:
        randomize_(model, seed)
        return model
    result = model.load_state_dict(state, strict=False)
    # megatron's linears expect `_extra_state` entries, which hold no weights
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model


def pixels(grids, patch_dim: int, seed: int) -> torch.Tensor:
    tokens = sum(t * h * w for t, h, w in grids)
    return torch.randn(tokens, patch_dim, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_expected_shapes_match_both_real_models(tp1_groups):
    vision = tiny_vision(window_layers=[0, 2])
    hf = hf_tower(vision)
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == hf_shapes(vision)
    ours = strip_extra_state(our_encoder(vision, tp1_groups).state_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == canonical_shapes(vision)


def test_full_attention_parity(tp1_groups):
    vision = tiny_vision()  # no window layers: HF's fullatt_block_indexes = [0, 1, 2]
    assert hf_config_from_vision(vision).fullatt_block_indexes == [0, 1, 2]
    hf = hf_tower(vision)
    state = hf_to_canonical(hf.state_dict(), vision)
    x, grid = pixels(FULL_GRIDS, vision.patch_dim, seed=2), torch.tensor(FULL_GRIDS)
    with torch.no_grad():
        ref = hf(x, grid_thw=grid)
        out = our_encoder(vision, tp1_groups, state)(x, grid)
        # control: HF's [q; k; v] rows loaded as they are must be caught at this tolerance
        raw = dict(state)
        for i in range(vision.num_layers):
            for p in ("weight", "bias"):
                raw[f"decoder.layers.{i}.self_attention.linear_qkv.{p}"] = \
                    hf.state_dict()[f"blocks.{i}.attn.qkv.{p}"]
        wrong = our_encoder(vision, tp1_groups, raw)(x, grid)
    assert ref.shape == (x.shape[0] // 4, vision.out_hidden_size)
    print(f"full attention: max |ours - HF| = {max_diff(out, ref):.2e}, output std {ref.std():.2f}")
    assert max_diff(out, ref) <= TOL
    assert max_diff(wrong, ref) > 100 * TOL


def test_window_attention_parity(tp1_groups):
    vision = tiny_vision(window_layers=[0, 2])
    assert hf_config_from_vision(vision).fullatt_block_indexes == [1]
    hf = hf_tower(vision)
    model = our_encoder(vision, tp1_groups, hf_to_canonical(hf.state_dict(), vision))
    x, grid = pixels(WINDOW_GRIDS, vision.patch_dim, seed=3), torch.tensor(WINDOW_GRIDS)
    pad = torch.randn(8, vision.patch_dim)  # padding: its own segment, outputs after the real ones
    with torch.no_grad():
        ref = hf(x, grid_thw=grid)
        out = model(x, grid)
        padded = model(torch.cat([x, pad]), grid, num_tokens=x.shape[0] + 8)
        hf.fullatt_block_indexes = [0, 1, 2]  # control: windows must change the output
        full = hf(x, grid_thw=grid)
    padded = padded[:ref.shape[0]]
    print(f"window attention: max |ours - HF| = {max_diff(out, ref):.2e}, "
          f"padded {max_diff(padded, ref):.2e}, windows vs full {max_diff(full, ref):.2e}")
    assert max_diff(out, ref) <= TOL
    assert max_diff(padded, ref) <= TOL
    assert max_diff(full, ref) > 100 * TOL


def test_round_trips_are_exact(tp1_groups):
    vision = tiny_vision(window_layers=[1])
    hf_state = hf_tower(vision).state_dict()
    back = canonical_to_hf(hf_to_canonical(hf_state, vision), vision)
    assert list(back) == list(hf_state)  # also the order HF saves in
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)

    ours = our_encoder(vision, tp1_groups).state_dict()  # with `_extra_state` entries
    back = hf_to_canonical(canonical_to_hf(ours, vision), vision)
    assert list(back) == list(strip_extra_state(ours))
    assert all(torch.equal(back[k], ours[k]) for k in back)


def test_temporal_patch_size_one_matches_two_on_still_images(tp1_groups):
    v2, v1 = tiny_vision(window_layers=[0]), tiny_vision(window_layers=[0], temporal_patch_size=1)
    frames = torch.randn(sum(t * h * w for t, h, w in FULL_GRIDS), 3, 1, 14, 14)
    x1 = frames.flatten(1)  # [S, C*1*P*P]
    x2 = frames.expand(-1, -1, 2, -1, -1).flatten(1)  # HF's still image: its frame twice
    grid = torch.tensor(FULL_GRIDS)
    hf = hf_tower(v2)
    ours = our_encoder(v1, tp1_groups, hf_to_canonical(hf.state_dict(), v1))  # HF 2 -> ours 1
    ours_state = ours.state_dict()
    hf_back = hf_tower(v2, seed=5)
    hf_back.load_state_dict(canonical_to_hf(ours_state, v1), strict=True)  # ours 1 -> HF 2
    with torch.no_grad():
        ref, out, back = hf(x2, grid_thw=grid), ours(x1, grid), hf_back(x2, grid_thw=grid)
    print(f"temporal 2 -> 1: max diff {max_diff(out, ref):.2e}; 1 -> 2: {max_diff(back, out):.2e}")
    assert max_diff(out, ref) <= TOL
    assert max_diff(back, out) <= TOL
    # halving then summing the kernel is exact in floating point
    round_trip = hf_to_canonical(canonical_to_hf(ours_state, v1), v1)
    assert torch.equal(round_trip["patch_embed.weight"], ours_state["patch_embed.weight"])
    with pytest.raises(ConversionError, match="cannot convert a patch embedding of 2 frames to 3"):
        resample_temporal(torch.zeros(4, 3, 2, 14, 14), 3)


def zeros_like_shapes(shapes) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_bad_state_dicts_raise_one_clear_error():
    vision = tiny_vision()
    hf_state = zeros_like_shapes(hf_shapes(vision))
    del hf_state["blocks.1.attn.proj.bias"]
    hf_state["blocks.7.norm1.weight"] = torch.zeros(64)
    hf_state["merger.mlp.2.weight"] = torch.zeros(47, 256)
    with pytest.raises(ConversionError) as err:
        hf_to_canonical(hf_state, vision)
    assert str(err.value) == (
        "Hugging Face Qwen2.5-VL vision state dict does not match the config: "
        "missing blocks.1.attn.proj.bias; unexpected blocks.7.norm1.weight; "
        "wrong shape merger.mlp.2.weight (47, 256) (expected (48, 256)).")

    ours = zeros_like_shapes(canonical_shapes(vision))
    ours["patch_embed.weight"] = torch.zeros(64, 3 * 14 * 14)  # a 1-frame kernel, config says 2
    with pytest.raises(ConversionError, match=r"patch_embed.weight \(64, 588\) \(expected \(64, 1176\)"):
        canonical_to_hf(ours, vision)
    # long listings are cut short
    with pytest.raises(ConversionError, match=r"missing blocks.0.attn.proj.bias, .* and \d+ more"):
        hf_to_canonical({}, vision)


def test_te_renames_round_trip_and_are_caught_when_forgotten(tp1_groups):
    vision = tiny_vision()
    local = our_encoder(vision, tp1_groups).state_dict()
    te = local_to_te(local)
    renamed = sorted(set(te) - set(local))
    assert renamed == sorted(f"decoder.layers.{i}.{s}" for i in range(3) for s in (
        "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"))
    assert (te["decoder.layers.2.mlp.linear_fc1.layer_norm_weight"]
            is local["decoder.layers.2.pre_mlp_layernorm.weight"])
    assert "merger.norm.weight" in te  # the merger keeps its own norm under both specs
    back = te_to_local(te)
    assert list(back) == list(local) and all(back[k] is local[k] for k in local)
    with pytest.raises(ConversionError, match="apply te_to_local first"):
        canonical_to_hf(te, vision)
    both = {**local, "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.ones(64)}
    with pytest.raises(ConversionError, match="renaming .*linear_qkv.layer_norm_weight to "
                                              "decoder.layers.0.input_layernorm.weight collides"):
        te_to_local(both)


def test_config_mapping():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    hf = Qwen2_5_VLVisionConfig(depth=4, hidden_size=64, num_heads=4, intermediate_size=96,
                                out_hidden_size=48, window_size=56, fullatt_block_indexes=[1, 3])
    vision = vision_config_from_hf(hf)
    assert (vision.num_layers, vision.hidden_size, vision.num_heads) == (4, 64, 4)
    assert vision.ffn_hidden_size == 96
    assert (vision.window_layers, vision.window_size, vision.out_hidden_size) == ([0, 2], 56, 48)
    assert vision.temporal_patch_size == 2 and vision_config_from_hf(hf, 1).temporal_patch_size == 1
    back = hf_config_from_vision(vision)
    assert back.to_diff_dict() == hf.to_diff_dict()
    # config.json of a full Qwen2.5-VL model: the vision part sits under "vision_config"
    assert vision_config_from_hf({"vision_config": hf.to_dict()}) == vision

    with pytest.raises(ConversionError, match="hidden_act='gelu_pytorch_tanh' is not supported"):
        vision_config_from_hf(Qwen2_5_VLVisionConfig(hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ConversionError, match=r"fullatt_block_indexes \[4\] are outside"):
        vision_config_from_hf(Qwen2_5_VLVisionConfig(depth=4, fullatt_block_indexes=[3, 4]))
    with pytest.raises(ConversionError, match="norm_eps=1e-05 .*, rope_theta=100.0"):
        hf_config_from_vision(tiny_vision(norm_eps=1e-5, rope_theta=100.0))


def test_vision_tower_state_strips_the_prefix():
    w = torch.zeros(1)
    new = {"model.visual.merger.ln_q.weight": w, "model.language_model.norm.weight": w}
    assert vision_tower_state(new) == {"merger.ln_q.weight": w}
    hub = {"visual.blocks.0.norm1.weight": w, "lm_head.weight": w}
    assert vision_tower_state(hub) == {"blocks.0.norm1.weight": w}
    with pytest.raises(ConversionError, match="not a Qwen2.5-VL checkpoint"):
        vision_tower_state({"lm_head.weight": w})
