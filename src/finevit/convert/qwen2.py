"""Hugging Face Qwen2 / Qwen2.5 / Qwen3 causal LMs <-> finevit's megatron-core LLM.

Canonical names are the LLM's parameter names at TP=1, PP=1 with the local spec (finevit's
parallel/shards.py slices them for any layout). The layouts that differ (measured exact,
../shared/notes/stage2.md):

    HF                                       megatron (canonical)
    model.embed_tokens                       embedding.word_embeddings
    layers.i.input_layernorm                 decoder.layers.i.input_layernorm
    layers.i.self_attn.{q,k,v}_proj          decoder.layers.i.self_attention.linear_qkv: rows per
                                             query group g: [q of g's heads; k_g; v_g]
    layers.i.self_attn.{q,k}_norm (Qwen3)    decoder.layers.i.self_attention.{q,k}_layernorm
    layers.i.self_attn.o_proj                decoder.layers.i.self_attention.linear_proj
    layers.i.post_attention_layernorm        decoder.layers.i.pre_mlp_layernorm
    layers.i.mlp.{gate,up}_proj              decoder.layers.i.mlp.linear_fc1 = [gate; up]
    layers.i.mlp.down_proj                   decoder.layers.i.mlp.linear_fc2
    model.norm                               decoder.final_layernorm
    lm_head (absent when tied)               output_layer

A plain [q; k; v] concatenation instead of the per-group one is off by ~5 in the logits, which the
parity test's control checks.
"""

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from finevit.config.model import LLMConfig
from finevit.convert.qwen2_5_vl import ConversionError, local_to_te  # the same fused-norm names

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


# ---------------------------------------------------------------------------------------------
# Configs


def llm_config_from_hf(hf: Mapping[str, Any]) -> LLMConfig:
    """The LLMConfig of a HF Qwen2 / Qwen3 config.json (as a dict)."""
    family = {"qwen2": "qwen2", "qwen3": "qwen3"}.get(hf.get("model_type"))
    if family is None:
        raise ConversionError(f"model_type={hf.get('model_type')!r} is not a Qwen2 / Qwen2.5 / Qwen3 LLM")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return LLMConfig(
        family=family, vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=head_dim if head_dim != hf["hidden_size"] // heads else None,
        ffn_hidden_size=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
        rope_theta=float(hf.get("rope_theta", 10000.0)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_positions=hf.get("max_position_embeddings", 32768))


def hf_config_from_llm(llm: LLMConfig) -> dict:
    """A HF config.json dict for `llm` (Qwen2ForCausalLM or Qwen3ForCausalLM)."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[llm.family]
    cfg = {"architectures": [arch], "model_type": llm.family, "vocab_size": llm.vocab_size,
           "num_hidden_layers": llm.num_layers, "hidden_size": llm.hidden_size,
           "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
           "intermediate_size": llm.ffn_hidden_size, "rms_norm_eps": llm.norm_eps,
           "rope_theta": llm.rope_theta, "tie_word_embeddings": llm.tie_embeddings,
           "max_position_embeddings": llm.max_positions, "hidden_act": "silu", "torch_dtype": "float32"}
    if llm.family == "qwen3":
        cfg["head_dim"] = llm.kv_channels
    return cfg


# Compared between model.llm and the directory; the first differing ones are named.
_MATCHED = ("family", "vocab_size", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "kv_channels",
            "ffn_hidden_size", "norm_eps", "rope_theta", "tie_embeddings")


def vlm_text_config(hf: Mapping[str, Any]):
    """The LLM's config.json fields of a Qwen2.5-VL directory (its text_config, or the top level
    in older files) as a Qwen2 config; None for any other directory."""
    if hf.get("model_type") != "qwen2_5_vl":
        return None
    text = dict(hf.get("text_config") or hf)
    text["model_type"] = "qwen2"
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    return text


def check_hf_llm_dir(path: str, llm: LLMConfig, key: str = "model.llm.init_from") -> None:
    """ConversionError (one sentence naming every difference) unless `path` holds a HF causal LM
    of the Qwen2 / Qwen3 family, or a Qwen2.5-VL model (its LLM), whose shape is `llm`'s."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{key}={path} has no config.json: name a Hugging Face Qwen2 / Qwen2.5 / "
                              "Qwen3 model directory (as save_pretrained writes it).")
    hf = json.loads(config_file.read_text())
    archs = hf.get("architectures") or []
    if vlm_text_config(hf) is not None:
        hf = vlm_text_config(hf)
    elif not any(a in ARCHITECTURES for a in archs):
        raise ConversionError(f"{key}={path} holds {', '.join(archs) or hf.get('model_type')}, not a "
                              f"Qwen2 / Qwen2.5 / Qwen3 causal LM ({' or '.join(ARCHITECTURES)}).")
    theirs = llm_config_from_hf(hf)
    diffs = [f"{k} {getattr(llm, k)} here, {getattr(theirs, k)} there" for k in _MATCHED
             if getattr(llm, k) != getattr(theirs, k)]
    if diffs:
        raise ConversionError(f"model.llm does not match the LLM in {path}: {'; '.join(diffs)}.")


# ---------------------------------------------------------------------------------------------
# Tensors


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, llm: LLMConfig) -> torch.Tensor:
    """HF's separate q [H*d, ...], k, v [G*d, ...] -> megatron's rows per query group."""
    g, d = llm.num_kv_heads, llm.kv_channels
    rest = q.shape[1:]
    # [H*d] -> [G, H/G * d]; [G*d] -> [G, d]; per group [q; k; v] -> [(H + 2G) * d]
    parts = [q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _qkv_to_hf(t: torch.Tensor, llm: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = llm.num_kv_heads, llm.kv_channels
    per_group = llm.num_heads // g * d
    rest = t.shape[1:]
    grouped = t.reshape(g, per_group + 2 * d, *rest)  # [(H + 2G) * d] -> [G, (H/G + 2) * d]
    q, k, v = grouped.split([per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _layer_map(i: int) -> dict[str, str]:
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {hf + "input_layernorm.weight": mc + "input_layernorm.weight",
            hf + "post_attention_layernorm.weight": mc + "pre_mlp_layernorm.weight",
            hf + "self_attn.o_proj.weight": mc + "self_attention.linear_proj.weight",
            hf + "self_attn.q_norm.weight": mc + "self_attention.q_layernorm.weight",
            hf + "self_attn.k_norm.weight": mc + "self_attention.k_layernorm.weight",
            hf + "mlp.down_proj.weight": mc + "mlp.linear_fc2.weight"}


def hf_to_canonical(hf: Mapping[str, torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    # Tied: the last pipeline stage holds its own copy of the embedding as the output layer.
    out["output_layer.weight"] = hf["model.embed_tokens.weight" if llm.tie_embeddings else "lm_head.weight"]
    for i in range(llm.num_layers):
        out.update({mc: hf[name] for name, mc in _layer_map(i).items() if name in hf})
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv = f"decoder.layers.{i}.self_attention.linear_qkv."
        out[qkv + "weight"] = _qkv_to_megatron(*(hf[a + f"{x}_proj.weight"] for x in "qkv"), llm)
        if llm.family == "qwen2":
            out[qkv + "bias"] = _qkv_to_megatron(*(hf[a + f"{x}_proj.bias"] for x in "qkv"), llm)
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
    return {k: v.clone() for k, v in out.items()}


def canonical_to_hf(state: Mapping[str, torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not llm.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(llm.num_layers):
        out.update({name: state[mc] for name, mc in _layer_map(i).items() if mc in state})
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv = f"decoder.layers.{i}.self_attention.linear_qkv."
        for p in ("weight", "bias") if llm.family == "qwen2" else ("weight",):
            for x, t in zip("qkv", _qkv_to_hf(state[qkv + p], llm)):
                out[a + f"{x}_proj.{p}"] = t
        out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = state[f"decoder.layers.{i}.mlp.linear_fc1.weight"].chunk(2)
    return {k: v.clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# A Hugging Face model directory (save_pretrained: config.json + safetensors, sharded or not)


def read_hf_llm_dir(path: str) -> dict[str, torch.Tensor]:
    """A causal LM directory's tensors; of a Qwen2.5-VL directory, its LLM's under the causal LM's
    names ("model.*", "lm_head.weight")."""
    from finevit.convert.hf_dir import read_safetensors_dir

    if vlm_text_config(json.loads((Path(path) / "config.json").read_text())) is None:
        return read_safetensors_dir(path)
    state = read_safetensors_dir(path, lambda k: "visual." not in k)
    # files keep the LLM at "model.*"; newer in-memory names nest it as "model.language_model.*"
    return {k.replace("model.language_model.", "model.", 1): v for k, v in state.items()}


@torch.no_grad()
def load_hf_llm(chunks: list, hf_state: Mapping[str, torch.Tensor], llm: LLMConfig, tp_rank: int, tp_size: int) -> None:
    """Load a HF state dict into this rank's LLM chunks (any TP / PP layout, local or TE spec)."""
    from finevit.parallel.shards import load_full_state

    canonical = hf_to_canonical(hf_state, llm)
    if any(n.endswith("layer_norm_weight") for c in chunks for n, _ in c.named_parameters()):
        canonical = local_to_te(canonical)
    load_full_state(chunks, canonical, tp_rank, tp_size)


# ---------------------------------------------------------------------------------------------
# The whole VLM: Hugging Face Qwen2_5_VLForConditionalGeneration <-> finevit's FineViTVLM

_VLM_LLM_PREFIXES = ("model.language_model.", "model.")  # transformers >= 4.52 in memory; saved files


def vlm_hf_to_canonical(hf: Mapping[str, torch.Tensor], vision, llm: LLMConfig) -> dict[str, torch.Tensor]:
    """A Qwen2.5-VL state dict -> FineViTVLM's canonical names ("vision.*", "llm.*")."""
    from finevit.convert import qwen2_5_vl

    tower = qwen2_5_vl.hf_to_canonical(qwen2_5_vl.vision_tower_state(hf), vision)
    prefix = next(p for p in _VLM_LLM_PREFIXES if f"{p}embed_tokens.weight" in hf)
    text = {"model." + k[len(prefix):]: v for k, v in hf.items() if k.startswith(prefix) and not k.startswith("model.visual.")}
    if "lm_head.weight" in hf:
        text["lm_head.weight"] = hf["lm_head.weight"]
    return {**{f"vision.{k}": v for k, v in tower.items()},
            **{f"llm.{k}": v for k, v in hf_to_canonical(text, llm).items()}}
