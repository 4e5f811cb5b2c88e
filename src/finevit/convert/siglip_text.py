"""Weights and config mapping between Hugging Face's SigLIP / SigLIP2 text tower and our TextEncoder.

SigLIP and SigLIP2 share the text architecture and the parameter names. Two state-dict layouts:

Hugging Face: the state dict of `SiglipTextModel` / `Siglip2TextModel`, which are also the text
keys of a full `SiglipModel` / `Siglip2Model` (beside `vision_model.*`, `logit_scale`,
`logit_bias`; `text_tower_state` picks them). V = vocab, h = hidden, f = MLP width,
E = projection_size (our embed_dim), Q = HF's max_position_embeddings:
    text_model.embeddings.token_embedding.weight      [V, h]
    text_model.embeddings.position_embedding.weight   [Q, h]
    text_model.encoder.layers.{i}.layer_norm1 / layer_norm2 .weight / .bias     [h]
    text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight / .bias     [h, h] / [h]
    text_model.encoder.layers.{i}.mlp.fc1.weight / .bias  [f, h] / [f]
    text_model.encoder.layers.{i}.mlp.fc2.weight / .bias  [h, f] / [h]
    text_model.final_layer_norm.weight / .bias        [h]
    text_model.head.weight / .bias                    [E, h] / [E]

Canonical (ours): the state dict of `TextEncoder` with the local spec at TP=1, `_extra_state`
entries left out (P = TextConfig.max_positions >= Q):
    word_embeddings.weight                            [V, h]
    position_embeddings.weight                        [P, h]  HF's Q rows first; from HF the
        rest are zero until `TextEncoder.extend_positions(Q, L)` stretches the Q trained rows
    decoder.layers.{i}.input_layernorm / pre_mlp_layernorm .weight / .bias      [h]
    decoder.layers.{i}.self_attention.linear_qkv.weight / .bias  [3h, h] / [3h]  megatron's
        head-interleaved rows [q_0; k_0; v_0; q_1; ...] (see convert/qwen2_5_vl.py)
    decoder.layers.{i}.self_attention.linear_proj.weight / .bias [h, h] / [h]
    decoder.layers.{i}.mlp.linear_fc1 [f, h] (+ [f]); mlp.linear_fc2 [h, f] (+ [h])
    decoder.final_layernorm.weight / .bias            [h]
    head.weight / .bias                               [E, h] / [E]

With transformer-engine the layer norms are fused into the following linear
(`self_attention.linear_qkv.layer_norm_weight` / `_bias`, `mlp.linear_fc1.layer_norm_*`);
`te_to_local` / `local_to_te` rename between the two specs.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from finevit.config import TextConfig
from finevit.convert.qwen2_5_vl import (
    ConversionError,
    _rename_suffixes,
    check_state_dict,
    qkv_hf_to_megatron,
    qkv_megatron_to_hf,
    strip_extra_state,
)

HF_PREFIX = "text_model."
HF_ACT = "gelu_pytorch_tanh"
_POS_HF, _POS = HF_PREFIX + "embeddings.position_embedding.weight", "position_embeddings.weight"

# 1:1 renames inside layer i: ours (after "decoder.layers.{i}.") -> HF (after "encoder.layers.{i}.").
_LAYER_RENAMES = {
    f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias") for ours, theirs in (
        ("input_layernorm", "layer_norm1"), ("self_attention.linear_proj", "self_attn.out_proj"),
        ("pre_mlp_layernorm", "layer_norm2"), ("mlp.linear_fc1", "mlp.fc1"),
        ("mlp.linear_fc2", "mlp.fc2"))}
_TOP_RENAMES = {
    "word_embeddings.weight": "embeddings.token_embedding.weight",
    "decoder.final_layernorm.weight": "final_layer_norm.weight",
    "decoder.final_layernorm.bias": "final_layer_norm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_TE_NORMS = {f"{norm}.{p}": f"{linear}.layer_norm_{p}" for p in ("weight", "bias")
             for norm, linear in (("input_layernorm", "self_attention.linear_qkv"),
                                  ("pre_mlp_layernorm", "mlp.linear_fc1"))}


# ---------------------------------------------------------------------------------------------
# Configs


def text_config_from_hf(hf_config: Any, max_positions: Optional[int] = None) -> tuple[TextConfig, int]:
    """(TextConfig, embed_dim) for a SigLIP / SigLIP2 text config (object or config.json dict;
    full Siglip(2)Config accepted). max_positions=None keeps HF's table length; a longer one
    leaves room for a later phase with longer texts."""
    from transformers import SiglipTextConfig

    if isinstance(hf_config, Mapping):
        hf_config = SiglipTextConfig(**hf_config.get("text_config", hf_config))
    cfg = getattr(hf_config, "text_config", hf_config)
    if cfg.hidden_act != HF_ACT:
        raise ConversionError(f"hidden_act={cfg.hidden_act!r} is not supported: our MLP is {HF_ACT}.")
    positions = cfg.max_position_embeddings if max_positions is None else max_positions
    if positions < cfg.max_position_embeddings:
        raise ConversionError(f"max_positions={positions} is shorter than HF's "
                              f"{cfg.max_position_embeddings} positions.")
    text = TextConfig(
        vocab_size=cfg.vocab_size, max_positions=positions, num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size, norm_eps=cfg.layer_norm_eps,
        pooling=getattr(cfg, "finevit_pooling", "last"),  # "eos": a tower finevit trained and exported
        pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    return text, cfg.projection_size


def hf_config_from_text(text: TextConfig, embed_dim: int, siglip2: bool = False,
                        hf_positions: Optional[int] = None, eos_as_last: bool = False):
    """Siglip(2)TextConfig for our config, with hf_positions (default max_positions) positions.
    Only "last" pooling exists in HF's model; `eos_as_last` accepts "eos" pooling, which HF's
    model reproduces on captions that end at their end-of-text token (not padded)."""
    from transformers import Siglip2TextConfig, SiglipTextConfig

    if text.pooling != "last" and not (eos_as_last and text.pooling == "eos"):
        raise ConversionError(f"pooling={text.pooling!r} has no SigLIP equivalent (SigLIP: 'last').")
    # An "eos" tower says so in its config.json (HF ignores the key), so that model.text.init_from
    # takes it back as the tower it was.
    marker = {"finevit_pooling": "eos"} if text.pooling == "eos" else {}
    return (Siglip2TextConfig if siglip2 else SiglipTextConfig)(**marker,
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.ffn_hidden_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, max_position_embeddings=hf_positions or text.max_positions,
        hidden_act=HF_ACT, layer_norm_eps=text.norm_eps, pad_token_id=text.pad_id,
        projection_size=embed_dim)


# ---------------------------------------------------------------------------------------------
# Expected keys and shapes


def _layer_shapes(text: TextConfig) -> dict[str, tuple[int, ...]]:
    h, f = text.hidden_size, text.ffn_hidden_size
    return {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
            "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
            "self_attention.linear_qkv.weight": (3 * h, h),
            "self_attention.linear_qkv.bias": (3 * h,),
            "pre_mlp_layernorm.weight": (h,), "pre_mlp_layernorm.bias": (h,),
            "mlp.linear_fc1.weight": (f, h), "mlp.linear_fc1.bias": (f,),
            "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,)}


def canonical_shapes(text: TextConfig, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Every key of our canonical state dict with its shape, in the order our model saves."""
    h = text.hidden_size
    shapes = {"word_embeddings.weight": (text.vocab_size, h), _POS: (text.max_positions, h)}
    for i in range(text.num_layers):
        shapes.update({f"decoder.layers.{i}.{k}": s for k, s in _layer_shapes(text).items()})
    shapes.update({"decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,),
                   "head.weight": (embed_dim, h), "head.bias": (embed_dim,)})
    return shapes


def hf_shapes(text: TextConfig, embed_dim: int,
              hf_positions: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Every key of HF's text model state dict with its shape, in the order HF saves."""
    h, f = text.hidden_size, text.ffn_hidden_size
    layer = {"layer_norm1.weight": (h,), "layer_norm1.bias": (h,)}
    for proj in ("k", "v", "q", "out"):
        layer.update({f"self_attn.{proj}_proj.weight": (h, h), f"self_attn.{proj}_proj.bias": (h,)})
    layer.update({"layer_norm2.weight": (h,), "layer_norm2.bias": (h,),
                  "mlp.fc1.weight": (f, h), "mlp.fc1.bias": (f,),
                  "mlp.fc2.weight": (h, f), "mlp.fc2.bias": (h,)})
    shapes = {"embeddings.token_embedding.weight": (text.vocab_size, h),
              "embeddings.position_embedding.weight": (hf_positions or text.max_positions, h)}
    for i in range(text.num_layers):
        shapes.update({f"encoder.layers.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,),
                   "head.weight": (embed_dim, h), "head.bias": (embed_dim,)})
    return {HF_PREFIX + k: s for k, s in shapes.items()}


def text_tower_state(full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's entries of a SigLIP(2) state dict (text model or full model)."""
    tower = {k: v for k, v in full_state.items() if k.startswith(HF_PREFIX)}
    if not tower:
        raise ConversionError(f"no key starts with {HF_PREFIX!r}: not a SigLIP text tower.")
    return tower


# ---------------------------------------------------------------------------------------------
# State dicts


def hf_to_canonical(hf_state: Mapping[str, torch.Tensor], text: TextConfig,
                    embed_dim: int) -> dict[str, torch.Tensor]:
    """HF text tower state dict -> our canonical one. HF's Q position rows go first; the other
    max_positions - Q rows are zero. Renamed tensors may share storage with `hf_state`."""
    hf_positions = hf_state[_POS_HF].shape[0] if _POS_HF in hf_state else None
    if hf_positions is not None and hf_positions > text.max_positions:
        raise ConversionError(f"HF has {hf_positions} positions, more than max_positions="
                              f"{text.max_positions}.")
    check_state_dict(hf_state, hf_shapes(text, embed_dim, hf_positions), "Hugging Face SigLIP text")
    hf = {k[len(HF_PREFIX):]: v for k, v in hf_state.items()}
    out = {ours: hf[theirs] for ours, theirs in _TOP_RENAMES.items()}
    table = hf["embeddings.position_embedding.weight"]
    out[_POS] = torch.cat([table, table.new_zeros(text.max_positions - hf_positions, table.shape[1])])
    for i in range(text.num_layers):
        src, dst = f"encoder.layers.{i}.", f"decoder.layers.{i}."
        out.update({dst + ours: hf[src + theirs] for ours, theirs in _LAYER_RENAMES.items()})
        for p in ("weight", "bias"):
            qkv = torch.cat([hf[src + f"self_attn.{x}_proj.{p}"] for x in "qkv"])  # [q; k; v]
            out[dst + f"self_attention.linear_qkv.{p}"] = qkv_hf_to_megatron(qkv, text.num_heads)
    return {k: out[k] for k in canonical_shapes(text, embed_dim)}


def canonical_to_hf(state: Mapping[str, torch.Tensor], text: TextConfig, embed_dim: int,
                    hf_positions: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Our canonical state dict (`_extra_state` entries allowed) -> HF text tower state dict,
    keeping the first hf_positions (default: all) position rows."""
    state = strip_extra_state(state)
    check_state_dict(state, canonical_shapes(text, embed_dim), "finevit canonical text")
    hf_positions = hf_positions or text.max_positions
    if hf_positions > text.max_positions:
        raise ConversionError(f"cannot export {hf_positions} positions from {text.max_positions}.")
    out = {theirs: state[ours] for ours, theirs in _TOP_RENAMES.items()}
    # clone: a slice is a view, which safetensors refuses to save
    out["embeddings.position_embedding.weight"] = state[_POS][:hf_positions].clone()
    for i in range(text.num_layers):
        src, dst = f"decoder.layers.{i}.", f"encoder.layers.{i}."
        out.update({dst + theirs: state[src + ours] for ours, theirs in _LAYER_RENAMES.items()})
        for p in ("weight", "bias"):
            qkv = qkv_megatron_to_hf(state[src + f"self_attention.linear_qkv.{p}"], text.num_heads)
            for x, t in zip("qkv", qkv.chunk(3)):  # [q; k; v]
                out[dst + f"self_attn.{x}_proj.{p}"] = t.clone()
    out = {HF_PREFIX + k: v for k, v in out.items()}
    return {k: out[k] for k in hf_shapes(text, embed_dim, hf_positions)}


def te_to_local(state: Mapping[str, Any]) -> dict[str, Any]:
    """Transformer-engine spec names -> local spec names (fused norm weights back to the norms)."""
    return _rename_suffixes(state, {te: local for local, te in _TE_NORMS.items()})


def local_to_te(state: Mapping[str, Any]) -> dict[str, Any]:
    """Local spec names -> transformer-engine spec names (norm weights into the fused linears)."""
    return _rename_suffixes(state, _TE_NORMS)


# ---------------------------------------------------------------------------------------------
# A Hugging Face model directory (save_pretrained: config.json + safetensors)

_MATCHED = ("vocab_size", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "norm_eps",
            "pooling", "pad_id")


def check_hf_text_dir(path: str, text: TextConfig, embed_dim: int) -> int:
    """HF's number of position rows Q, after checking that `text` and `embed_dim` describe the
    SigLIP(2) text tower saved in `path`; a mismatch is one sentence naming every difference."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"model.text.init_from={path} has no config.json: name a Hugging Face "
                              "SigLIP or SigLIP2 model directory (as save_pretrained writes it).")
    theirs, their_embed = text_config_from_hf(json.loads(config_file.read_text()))
    diffs = [f"{k} {getattr(text, k)} here, {getattr(theirs, k)} there" for k in _MATCHED
             if getattr(text, k) != getattr(theirs, k)]
    if embed_dim != their_embed:
        diffs.append(f"model.contrastive.embed_dim {embed_dim} here, projection_size {their_embed} there")
    if text.max_positions < theirs.max_positions:
        diffs.append(f"max_positions {text.max_positions} here, at least {theirs.max_positions} needed")
    if diffs:
        raise ConversionError(f"model.text does not match the text tower in {path}: {'; '.join(diffs)}.")
    return theirs.max_positions


def read_hf_text_dir(path: str) -> dict[str, torch.Tensor]:
    """The text tower's tensors from a model directory's safetensors (one file or an index of
    shards), reading only the text keys."""
    from finevit.convert.hf_dir import read_safetensors_dir

    return text_tower_state(read_safetensors_dir(path, lambda key: key.startswith(HF_PREFIX)))


@torch.no_grad()
def load_hf_text(model: torch.nn.Module, hf: Any) -> int:
    """Load a HF SigLIP(2) text tower into a `TextEncoder` (any TP rank, local or TE spec).

    hf: a HF model (text model or full SigLIP) or its state dict. Returns HF's number of position
    rows Q: the table's rows from Q on are zero, so before texts longer than Q call
    `model.extend_positions(Q, new_len)`.
    """
    from finevit.parallel.shards import load_full_state

    state = text_tower_state(hf.state_dict() if isinstance(hf, torch.nn.Module) else hf)
    canonical = hf_to_canonical(state, model.text, model.embed_dim)
    if any(name.endswith("layer_norm_weight") for name, _ in model.named_parameters()):
        canonical = local_to_te(canonical)
    tp = model.pg_collection.tp
    load_full_state([model], canonical, tp.rank(), tp.size())
    return state[_POS_HF].shape[0]
