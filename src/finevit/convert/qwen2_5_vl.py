"""Weights and config mapping between Hugging Face's Qwen2.5-VL vision tower and our encoder.

Two state-dict layouts, both without any prefix (see `vision_tower_state` for full checkpoints):

Hugging Face, `Qwen2_5_VisionTransformerPretrainedModel` (h = hidden, f = SwiGLU inner width,
H = heads, d = h / H, C = channels, T = temporal patch, P = patch, w = 4h merger width):
    patch_embed.proj.weight              [h, C, T, P, P]  Conv3d with stride == kernel
    blocks.{i}.norm1.weight / norm2.weight               [h]  RMSNorm, eps fixed at 1e-6
    blocks.{i}.attn.qkv.weight / .bias   [3h, h] / [3h]   rows: all q heads, all k, all v
    blocks.{i}.attn.proj.weight / .bias  [h, h] / [h]
    blocks.{i}.mlp.gate_proj / up_proj   [f, h] (+ bias [f])
    blocks.{i}.mlp.down_proj             [h, f] (+ bias [h])
    merger.ln_q.weight [h]; merger.mlp.0 [w, w] (+ [w]); merger.mlp.2 [out, w] (+ [out])

Canonical (ours): the state dict of `FineViTEncoder` built with the local (non-TE) spec at
TP=1, PP=1, `_extra_state` entries left out:
    patch_embed.weight                   [h, C*T*P*P]  the Conv3d kernel flattened (C, T, P, P),
                                         the order in which patches are flattened for both models
    decoder.layers.{i}.input_layernorm.weight / pre_mlp_layernorm.weight          [h]
    decoder.layers.{i}.self_attention.linear_qkv.weight / .bias  [3h, h] / [3h]  megatron's
        head-interleaved rows: view as [H, 3, d, h], i.e. [q_0; k_0; v_0; q_1; k_1; v_1; ...]
    decoder.layers.{i}.self_attention.linear_proj.weight / .bias  [h, h] / [h]
    decoder.layers.{i}.mlp.linear_fc1.weight / .bias  [2f, h] / [2f]  [gate; up] stacked
    decoder.layers.{i}.mlp.linear_fc2.weight / .bias  [h, f] / [h]
    merger.norm.weight [h]; merger.linear_fc1 [w, w] (+ [w]); merger.linear_fc2 [out, w] (+ [out])

With transformer-engine the layer norms are fused into the following linear and their weights
are named `self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight`;
`te_to_local` / `local_to_te` rename between the two specs, everything else is identical.

Temporal patch size: Qwen2.5-VL embeds 2-frame tubelets and feeds a still image as two identical
frames, so a kernel with one frame is the sum of the two slices (HF -> ours) and the two slices
are each half the one-frame kernel (ours -> HF). Both are exact on still images, not on video.
"""

import re
from collections.abc import Mapping
from typing import Any, Optional

import torch

from finevit.config import VisionConfig

HF_NORM_EPS = 1e-6  # hard-coded in Qwen2.5-VL's vision blocks and merger
HF_ROPE_THETA = 10000.0  # hard-coded in Qwen2_5_VisionRotaryEmbedding

# 1:1 renames inside layer i: ours (after "decoder.layers.{i}.") -> HF (after "blocks.{i}.").
_LAYER_RENAMES = {
    "input_layernorm.weight": "norm1.weight",
    "self_attention.linear_proj.weight": "attn.proj.weight",
    "self_attention.linear_proj.bias": "attn.proj.bias",
    "pre_mlp_layernorm.weight": "norm2.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}
_MERGER_RENAMES = {
    "merger.norm.weight": "merger.ln_q.weight",
    "merger.linear_fc1.weight": "merger.mlp.0.weight",
    "merger.linear_fc1.bias": "merger.mlp.0.bias",
    "merger.linear_fc2.weight": "merger.mlp.2.weight",
    "merger.linear_fc2.bias": "merger.mlp.2.bias",
}
# local spec suffix <-> transformer-engine spec suffix (TE fuses each norm into the next linear).
_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_HF_PREFIXES = ("model.visual.", "visual.")  # transformers >= 4.52 in memory; hub checkpoints


class ConversionError(ValueError):
    """A state dict or config that cannot be converted as asked."""


# ---------------------------------------------------------------------------------------------
# Configs


def _require_hf_compatible(vision: VisionConfig) -> None:
    """Qwen2.5-VL fixes some choices that our VisionConfig leaves open."""
    bad = [f"{name}={getattr(vision, name)!r} (Qwen2.5-VL: {want!r})"
           for name, want in (("qkv_bias", True), ("linear_bias", True), ("merger", True),
                              ("norm_eps", HF_NORM_EPS), ("rope_theta", HF_ROPE_THETA))
           if getattr(vision, name) != want]
    if bad:
        raise ConversionError(f"VisionConfig has no Qwen2.5-VL equivalent: {', '.join(bad)}.")


def vision_config_from_hf(hf_config: Any,
                          temporal_patch_size: Optional[int] = None) -> VisionConfig:
    """VisionConfig for a Qwen2.5-VL vision config (object or config.json dict; a full
    Qwen2_5_VLConfig is accepted too). temporal_patch_size=None keeps HF's (2); 1 gives an
    image-only encoder whose converted patch embedding sums HF's two frame slices."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    if isinstance(hf_config, Mapping):
        hf_config = Qwen2_5_VLVisionConfig(**hf_config.get("vision_config", hf_config))
    cfg = getattr(hf_config, "vision_config", hf_config)
    if cfg.hidden_act != "silu":
        raise ConversionError(
            f"hidden_act={cfg.hidden_act!r} is not supported: our MLP is SwiGLU (silu).")
    full = set(cfg.fullatt_block_indexes)
    outside = sorted(i for i in full if not 0 <= i < cfg.depth)
    if outside:
        raise ConversionError(
            f"fullatt_block_indexes {outside} are outside [0, depth={cfg.depth}).")
    return VisionConfig(
        num_layers=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        ffn_hidden_size=cfg.intermediate_size,
        patch_size=cfg.patch_size,
        temporal_patch_size=(cfg.temporal_patch_size if temporal_patch_size is None
                             else temporal_patch_size),
        in_channels=cfg.in_channels,
        spatial_merge_size=cfg.spatial_merge_size,
        norm_eps=HF_NORM_EPS,
        qkv_bias=True,
        linear_bias=True,
        rope_theta=HF_ROPE_THETA,
        # HF lists the full-attention blocks; every other block attends within windows.
        window_layers=[i for i in range(cfg.depth) if i not in full],
        window_size=cfg.window_size,
        merger=True,
        out_hidden_size=cfg.out_hidden_size,
        init_std=cfg.initializer_range,
    )


def hf_config_from_vision(vision: VisionConfig, temporal_patch_size: int = 2):
    """Qwen2_5_VLVisionConfig for our config. temporal_patch_size is HF's (2 for a drop-in
    Qwen2.5-VL tower, whatever ours is); tokens_per_second keeps HF's default (LLM side only)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    _require_hf_compatible(vision)
    window = set(vision.window_layers)
    return Qwen2_5_VLVisionConfig(
        depth=vision.num_layers,
        hidden_size=vision.hidden_size,
        hidden_act="silu",
        intermediate_size=vision.ffn_hidden_size,
        num_heads=vision.num_heads,
        in_channels=vision.in_channels,
        patch_size=vision.patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        temporal_patch_size=temporal_patch_size,
        window_size=vision.window_size,
        out_hidden_size=vision.out_hidden_size,
        fullatt_block_indexes=[i for i in range(vision.num_layers) if i not in window],
        initializer_range=vision.init_std,
    )


# ---------------------------------------------------------------------------------------------
# Expected keys and shapes, and the check against them


def _merger_shapes(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    w = v.hidden_size * v.merge_unit  # the merger sees each 2x2 group as one row of 4h
    return {"merger.norm.weight": (v.hidden_size,),
            "merger.linear_fc1.weight": (w, w), "merger.linear_fc1.bias": (w,),
            "merger.linear_fc2.weight": (v.out_hidden_size, w),
            "merger.linear_fc2.bias": (v.out_hidden_size,)}


def hf_shapes(vision: VisionConfig, temporal_patch_size: int = 2) -> dict[str, tuple[int, ...]]:
    """Every key of the HF vision tower's state dict with its shape, in HF's order."""
    h, f, v = vision.hidden_size, vision.ffn_hidden_size, vision
    layer = {"norm1.weight": (h,), "norm2.weight": (h,),
             "attn.qkv.weight": (3 * h, h), "attn.qkv.bias": (3 * h,),
             "attn.proj.weight": (h, h), "attn.proj.bias": (h,),
             "mlp.gate_proj.weight": (f, h), "mlp.gate_proj.bias": (f,),
             "mlp.up_proj.weight": (f, h), "mlp.up_proj.bias": (f,),
             "mlp.down_proj.weight": (h, f), "mlp.down_proj.bias": (h,)}
    kernel = (h, v.in_channels, temporal_patch_size, v.patch_size, v.patch_size)
    shapes = {"patch_embed.proj.weight": kernel}
    for i in range(v.num_layers):
        shapes.update({f"blocks.{i}.{k}": s for k, s in layer.items()})
    shapes.update({_MERGER_RENAMES[k]: s for k, s in _merger_shapes(v).items()})
    return shapes


def canonical_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every key of our canonical state dict (local spec, TP=1, PP=1) with its shape, in the
    order of our model's state dict."""
    h, f, v = vision.hidden_size, vision.ffn_hidden_size, vision
    layer = {"input_layernorm.weight": (h,),
             "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
             "self_attention.linear_qkv.weight": (3 * h, h),
             "self_attention.linear_qkv.bias": (3 * h,),
             "pre_mlp_layernorm.weight": (h,),
             "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc1.bias": (2 * f,),
             "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,)}
    shapes = {"patch_embed.weight": (h, v.patch_dim)}
    for i in range(v.num_layers):
        shapes.update({f"decoder.layers.{i}.{k}": s for k, s in layer.items()})
    shapes.update(_merger_shapes(v))
    return shapes


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                     what: str) -> None:
    """Raise one ConversionError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
             for k in sorted(expected.keys() & state.keys())
             if tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {_listing(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if any(k.endswith("layer_norm_weight") for k in unexpected):
        problems.append("(transformer-engine names: apply te_to_local first)")
    if problems:
        raise ConversionError(
            f"{what} state dict does not match the config: {'; '.join(problems)}.")


def strip_extra_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop megatron's `_extra_state` entries (None for local linears, FP8 metadata with TE):
    they hold no weights and have no HF counterpart."""
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


def vision_tower_state(full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's entries of a full Qwen2.5-VL state dict, prefix removed."""
    for prefix in _HF_PREFIXES:
        tower = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
        if tower:
            return tower
    raise ConversionError(
        f"no key starts with any of {list(_HF_PREFIXES)}: not a Qwen2.5-VL checkpoint.")


# ---------------------------------------------------------------------------------------------
# Tensor layouts


def qkv_hf_to_megatron(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv weight [3h, h] or bias [3h] from HF's [q; k; v] rows to megatron's per-head rows."""
    rest = t.shape[1:]
    # [3h, ...] -> [3, H, d, ...] -> [H, 3, d, ...] -> [3h, ...]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def qkv_megatron_to_hf(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `qkv_hf_to_megatron`."""
    rest = t.shape[1:]
    # [3h, ...] -> [H, 3, d, ...] -> [3, H, d, ...] -> [3h, ...]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def resample_temporal(kernel: torch.Tensor, frames: int) -> torch.Tensor:
    """Conv3d kernel [h, C, T, P, P] -> [h, C, frames, P, P], exact on still images (all frames
    equal): T -> 1 sums the slices, 1 -> frames gives each slice 1/frames of the kernel."""
    t = kernel.shape[2]
    if t == frames:
        return kernel
    if frames == 1:
        return kernel.float().sum(2, keepdim=True).to(kernel.dtype)
    if t == 1:
        return (kernel / frames).expand(-1, -1, frames, -1, -1).contiguous()
    raise ConversionError(f"cannot convert a patch embedding of {t} frames to {frames} frames: "
                          "only conversions to or from 1 frame are exact on still images.")


# ---------------------------------------------------------------------------------------------
# State dicts


def hf_to_canonical(hf_state: Mapping[str, torch.Tensor], vision: VisionConfig,
                    hf_temporal_patch_size: int = 2, merger: bool = True) -> dict[str, torch.Tensor]:
    """HF vision tower state dict -> our canonical one (see the module docstring).
    merger=False: a tower saved without its merger (an exported stage-1 encoder).

    Tensors keep their dtype; renamed ones may share storage with `hf_state`.
    """
    _require_hf_compatible(vision)
    expected = hf_shapes(vision, hf_temporal_patch_size)
    if not merger:
        expected = {k: s for k, s in expected.items() if not k.startswith("merger.")}
    check_state_dict(hf_state, expected, "Hugging Face Qwen2.5-VL vision")
    kernel = resample_temporal(hf_state["patch_embed.proj.weight"], vision.temporal_patch_size)
    # [h, C, T, P, P] -> [h, C*T*P*P]
    out = {"patch_embed.weight": kernel.reshape(vision.hidden_size, -1)}
    for i in range(vision.num_layers):
        src, dst = f"blocks.{i}.", f"decoder.layers.{i}."
        out.update({dst + ours: hf_state[src + theirs] for ours, theirs in _LAYER_RENAMES.items()})
        for p in ("weight", "bias"):
            out[dst + f"self_attention.linear_qkv.{p}"] = qkv_hf_to_megatron(
                hf_state[src + f"attn.qkv.{p}"], vision.num_heads)
            out[dst + f"mlp.linear_fc1.{p}"] = torch.cat(
                [hf_state[src + f"mlp.gate_proj.{p}"], hf_state[src + f"mlp.up_proj.{p}"]])
    if merger:
        out.update({ours: hf_state[theirs] for ours, theirs in _MERGER_RENAMES.items()})
    return {k: out[k] for k in canonical_shapes(vision) if k in out}  # in the order our model saves


def canonical_to_hf(state: Mapping[str, torch.Tensor], vision: VisionConfig,
                    hf_temporal_patch_size: int = 2, merger: bool = True) -> dict[str, torch.Tensor]:
    """Our canonical state dict (`_extra_state` entries allowed) -> HF vision tower state dict.
    merger=False: an encoder without its merger (stage 1's), whose HF state lacks merger.*.

    Tensors keep their dtype; renamed ones may share storage with `state`.
    """
    _require_hf_compatible(vision)
    state = strip_extra_state(state)
    expected = canonical_shapes(vision)
    if not merger:
        expected = {k: s for k, s in expected.items() if not k.startswith("merger.")}
    check_state_dict(state, expected, "finevit canonical")
    v = vision
    kernel = state["patch_embed.weight"].reshape(  # [h, C*T*P*P] -> [h, C, T, P, P]
        v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out = {"patch_embed.proj.weight": resample_temporal(kernel, hf_temporal_patch_size)}
    for i in range(v.num_layers):
        src, dst = f"decoder.layers.{i}.", f"blocks.{i}."
        out.update({dst + theirs: state[src + ours] for ours, theirs in _LAYER_RENAMES.items()})
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = qkv_megatron_to_hf(
                state[src + f"self_attention.linear_qkv.{p}"], v.num_heads)
            # clone: chunks are views of one tensor, which safetensors refuses to save twice
            gate, up = state[src + f"mlp.linear_fc1.{p}"].chunk(2)
            out[dst + f"mlp.gate_proj.{p}"] = gate.clone()
            out[dst + f"mlp.up_proj.{p}"] = up.clone()
    if merger:
        out.update({theirs: state[ours] for ours, theirs in _MERGER_RENAMES.items()})
    return {k: out[k] for k in hf_shapes(v, hf_temporal_patch_size) if k in out}  # in the order HF saves


def _rename_suffixes(state: Mapping[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    pattern = re.compile(r"^(|.*\.)(" + "|".join(re.escape(s) for s in renames) + r")$")
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        new = m.group(1) + renames[m.group(2)] if m else key
        if new in out or (new != key and new in state):
            raise ConversionError(f"renaming {key} to {new} collides with an existing key.")
        out[new] = value
    return out


def te_to_local(state: Mapping[str, Any]) -> dict[str, Any]:
    """Transformer-engine spec names -> local spec names (fused norm weights back to the norms)."""
    return _rename_suffixes(state, {te: local for local, te in _TE_NORMS.items()})


def local_to_te(state: Mapping[str, Any]) -> dict[str, Any]:
    """Local spec names -> transformer-engine spec names (norm weights into the fused linears)."""
    return _rename_suffixes(state, _TE_NORMS)
