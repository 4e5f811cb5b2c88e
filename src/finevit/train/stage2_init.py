"""Where stage 2's towers start: the encoder from a stage-1 run, a Hugging Face Qwen2.5-VL
directory or a bare Qwen2.5-VL vision tower directory such as an exported stage-1 run's vision/
(model.vision.init_from), the LLM from a Hugging Face Qwen2 / Qwen3 directory
(model.llm.init_from). Checked before anything is built (one sentence per difference); loaded
into any TP / PP layout.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch
import yaml
from megatron.core.utils import unwrap_model

from finevit.checkpointing import files
from finevit.checkpointing.dist import load_module_weights
from finevit.config import VisionConfig
from finevit.config.load import section_from_dict
from finevit.convert import qwen2_5_vl
from finevit.convert.hf_dir import read_safetensors_dir, safetensors_keys
from finevit.convert.qwen2 import load_hf_llm, read_hf_llm_dir
from finevit.parallel.shards import load_full_state

log = logging.getLogger("finevit.train")

# Fields that decide the encoder's weights' shapes and meaning (window layout and rope base do not
# change a weight's shape, but a different one would be another model: compared too).
ENCODER_FIELDS = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "patch_size", "temporal_patch_size",
                  "in_channels", "spatial_merge_size", "qkv_bias", "linear_bias", "rope_theta")
KEY = "model.vision.init_from"


def is_hf_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def _differences(ours: VisionConfig, theirs: VisionConfig, fields=ENCODER_FIELDS) -> list[str]:
    return [f"{k} {getattr(ours, k)} here, {getattr(theirs, k)} there" for k in fields
            if getattr(ours, k) != getattr(theirs, k)]


def is_vision_tower_dir(path: str) -> bool:
    """A bare Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel.save_pretrained`,
    e.g. the vision/ directory of an exported stage-1 run): its weights carry no "visual." prefix."""
    return _is_vision_tower(json.loads((Path(path) / "config.json").read_text()))


def _is_vision_tower(hf: dict) -> bool:
    return "vision_config" not in hf and VISION_TOWER in (hf.get("architectures") or [])


VISION_TOWER = "Qwen2_5_VisionTransformerPretrainedModel"


def source_vision(path: str) -> VisionConfig:
    """The encoder config stored with a stage-1 checkpoint, a Qwen2.5-VL directory or a bare
    Qwen2.5-VL vision tower directory (CheckpointError / ConversionError with one sentence when it
    is none of them). A tower saved without its merger says so (merger=False)."""
    if is_hf_dir(path):
        hf = json.loads((Path(path) / "config.json").read_text())
        if _is_vision_tower(hf):
            vision = qwen2_5_vl.vision_config_from_hf(hf)
            has_merger = any(k.startswith("merger.") for k in safetensors_keys(path))
            return vision if has_merger else dataclasses.replace(vision, merger=False)
        if "vision_config" not in hf:
            raise qwen2_5_vl.ConversionError(
                f"{KEY}={path} holds {', '.join(hf.get('architectures') or [hf.get('model_type', '?')])}, "
                f"not a Qwen2.5-VL model or vision tower ({VISION_TOWER}) nor a finevit stage-1 run")
        return qwen2_5_vl.vision_config_from_hf(hf)
    step = files.resolve(path, KEY)
    files.verify_loadable(step)
    saved = yaml.safe_load(files.read_state(step)["common"].get("config", "{}")) or {}
    if saved.get("task", "stage1") != "stage1" or "vision" not in saved.get("model", {}):
        raise files.CheckpointError(f"{KEY}={path} is not a stage-1 checkpoint (its config has task "
                                    f"'{saved.get('task')}')")
    return section_from_dict(VisionConfig, saved["model"]["vision"])


def vision_source_problems(vision: VisionConfig, llm_hidden: int) -> list[str]:
    """Problems of model.vision.init_from for this config (empty when it is unset or fits)."""
    if not vision.init_from:
        return []
    try:
        theirs = source_vision(vision.init_from)
    except (files.CheckpointError, qwen2_5_vl.ConversionError) as e:
        return [str(e)]
    diffs = _differences(vision, theirs)
    if vision.init_projector:
        if not theirs.merger:
            diffs.append("a merger here, none there (model.vision.init_projector=true)")
        elif theirs.out_hidden_size != llm_hidden:
            diffs.append(f"projector output {llm_hidden} here (model.llm.hidden_size), {theirs.out_hidden_size} "
                         "there: set model.vision.init_projector=false for a fresh projector")
    if diffs:
        return [f"model.vision does not match the encoder in {KEY}={vision.init_from}: {'; '.join(diffs)}"]
    return []


def load_vision(chunks: list, vision: VisionConfig, tp_rank: int, tp_size: int) -> None:
    """The encoder (and with init_projector its merger) from model.vision.init_from. Collective
    for a stage-1 checkpoint: every rank calls it, also one whose chunks hold no encoder."""
    path, keep_merger = vision.init_from, vision.init_projector
    modules = [unwrap_model(c).vision for c in chunks if unwrap_model(c).vision is not None]
    if not is_hf_dir(path):
        step = files.resolve(path, KEY)
        for module in modules or [None]:
            load_module_weights(step, module, "vision.", exclude=() if keep_merger else ("merger.",))
        return
    if is_vision_tower_dir(path):
        tower = read_safetensors_dir(path)
    else:
        tower = qwen2_5_vl.vision_tower_state(read_safetensors_dir(path, lambda k: "visual." in k))
    hf_vision = source_vision(path)
    canonical = qwen2_5_vl.hf_to_canonical(tower, _reading_config(vision, hf_vision), merger=hf_vision.merger)
    if any(n.endswith("layer_norm_weight") for m in modules for n, _ in m.named_parameters()):
        canonical = qwen2_5_vl.local_to_te(canonical)
    for module in modules:
        skip = () if keep_merger and hf_vision.merger else ("merger.",)
        load_full_state([module], canonical, tp_rank, tp_size, skip=skip)
    log.info("encoder%s initialised from %s", " and projector" if keep_merger else "", path)


def _reading_config(vision: VisionConfig, hf_vision: VisionConfig) -> VisionConfig:
    """Our encoder config with the directory's merger width (for reading its tensors; a merger
    that does not fit is not loaded)."""
    return dataclasses.replace(vision, out_hidden_size=hf_vision.out_hidden_size, merger=True)


def load_llm(chunks: list, llm, tp_rank: int, tp_size: int) -> None:
    """The LLM from model.llm.init_from (checked at preflight), into this rank's LLM chunks."""
    state = read_hf_llm_dir(llm.init_from)
    with torch.no_grad():
        load_hf_llm([unwrap_model(c).llm for c in chunks], state, llm, tp_rank, tp_size)
    log.info("LLM initialised from %s", llm.init_from)
