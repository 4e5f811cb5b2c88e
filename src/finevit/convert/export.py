"""A trained run -> Hugging Face directories that load with no custom code (`finevit convert`,
`make convert-checkpoint`).

Stage 2 writes a `Qwen2_5_VLForConditionalGeneration` directory (Qwen2 / Qwen2.5 LLMs) with its
processor and tokenizer files; a Qwen3 LLM, which no HF class pairs with this encoder, becomes
vision/ (encoder + projector as a Qwen2.5-VL vision tower) and llm/ (a `Qwen3ForCausalLM`).

Stage 1 writes, under OUT:
    vision/      the encoder as a Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel`,
                 what a Qwen2.5-VL-style VLM loads as its `visual`); stage 1 trains no merger, so
                 the directory holds none and `from_pretrained` initialises it (and says so)
    text/        the text tower as a `SiglipTextModel` (its pooler output is the text embedding),
                 with the captions' sentencepiece model as tokenizer.model
    head.safetensors  what turns the encoder's patch states into the image embedding and scores
                 pairs: norm.{weight,bias} (LayerNorm), pool.* (a `SiglipMultiheadAttentionPoolingHead`),
                 proj.{weight,bias} (Linear to the shared embedding), logit_scale, logit_bias
    README.md    the model card: stage, step, samples seen, the recipe, how to compute embeddings
Written into a fresh directory (`--overwrite` to replace one), moved into place when complete.
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from finevit.checkpointing import files
from finevit.config import Config, ParallelConfig
from finevit.config.load import config_from_yaml
from finevit.config.stage2 import llm_tokenizer_dir

log = logging.getLogger("finevit.convert")


class ExportError(ValueError):
    """A run or checkpoint that cannot be exported as asked; one sentence."""


def source_checkpoint(path: str, step: Optional[int] = None) -> Path:
    """The step directory to export: `path` is a run, checkpoints or step directory."""
    try:
        if step is None:
            return files.resolve(path, "RUN")
        root = Path(path)
        ckpts = root / "checkpoints" if (root / "checkpoints").is_dir() else root
        return files.check_complete(ckpts / files.step_dir_name(step), f"step {step} of {path}")
    except files.CheckpointError as e:
        raise ExportError(str(e)) from None


def _single_process_groups():
    """A world of one (gloo) for megatron's modules and the checkpoint reader."""
    from finevit.parallel.dist import init_distributed
    from finevit.parallel.groups import init_model_parallel

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        init_distributed("gloo", 600)
    return init_model_parallel(ParallelConfig(backend="gloo"), seed=0)


def load_stage1(cfg: Config, step_dir: Path):
    """The stage-1 model of `cfg` at TP=1, PP=1 in fp32 with the checkpoint's weights (any layout)."""
    from finevit.models.siglip import build_siglip

    pg = _single_process_groups()
    (model,) = build_siglip(cfg.model, ParallelConfig(), pg, dtype="fp32", use_te=False)
    return _load_weights(model, step_dir, pg)


def _load_weights(model, step_dir: Path, pg):
    from finevit.checkpointing.dist import load_checkpoint

    try:
        common = load_checkpoint(step_dir, [model], None, pg, load_optimizer=False)
    except Exception as e:  # a checkpoint whose shapes differ from its config
        raise ExportError(f"{step_dir} does not load into the model its config describes "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return model.eval(), common


def _state(module) -> dict:
    return {k: v.detach().float().contiguous() for k, v in module.state_dict().items()
            if not k.endswith("_extra_state")}


def write_stage1(model, cfg: Config, out: Path, max_shard_size: str) -> None:
    from safetensors.torch import save_file
    from transformers import SiglipTextModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from finevit.convert import qwen2_5_vl, siglip_text

    vision_cfg = cfg.model.vision
    tower = qwen2_5_vl.canonical_to_hf(_state(model.vision), vision_cfg, merger=False)
    # canonical_to_hf checked every name and shape; the model only carries the config to save
    with torch.device("meta"):  # weights come from the run: no random init, no second copy
        hf_vision = Qwen2_5_VisionTransformerPretrainedModel(qwen2_5_vl.hf_config_from_vision(vision_cfg))
    hf_vision.save_pretrained(out / "vision", max_shard_size=max_shard_size,
                              state_dict=tower)  # the trained weights only: no merger
    text_cfg, embed = cfg.model.text, cfg.model.contrastive.embed_dim
    with torch.device("meta"):
        hf_text = SiglipTextModel(siglip_text.hf_config_from_text(text_cfg, embed, eos_as_last=True))
    hf_text.load_state_dict(assign=True, state_dict=siglip_text.text_tower_state(
        siglip_text.canonical_to_hf(_state(model.text), text_cfg, embed)), strict=True)
    hf_text.save_pretrained(out / "text", max_shard_size=max_shard_size)
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file():
        shutil.copyfile(cfg.data.tokenizer, out / "text" / "tokenizer.model")
    head = {f"norm.{k}": v for k, v in _state(model.head.norm).items()}
    head.update({f"pool.{k}": v for k, v in _state(model.head.pool).items()})
    head.update({f"proj.{k}": v for k, v in _state(model.head.proj).items()})
    head.update({k: v.reshape(1) for k, v in _state(model.loss).items()})
    save_file(head, str(out / "head.safetensors"), metadata={
        "pool_heads": str(cfg.model.contrastive.pool_heads), "norm_eps": str(vision_cfg.norm_eps),
        "loss": cfg.model.contrastive.loss, "text_pooling": text_cfg.pooling})


def load_stage2(cfg: Config, step_dir: Path):
    """The stage-2 VLM of `cfg` at TP=1, PP=1 in fp32 with the checkpoint's weights (any layout)."""
    from finevit.models.vlm import build_vlm

    pg = _single_process_groups()
    return _load_weights(build_vlm(cfg.model, ParallelConfig(), pg, dtype="fp32", use_te=False), step_dir, pg)


def hf_vlm_config(cfg: Config, ids: dict):
    """Qwen2_5_VLConfig of the run's VLM, with the tokenizer's image and video token ids (`ids`:
    chat_format.SPECIAL_TOKENS' names -> ids)."""
    import dataclasses

    from transformers import Qwen2_5_VLConfig

    from finevit.convert import qwen2, qwen2_5_vl

    llm = cfg.model.llm
    text = qwen2.hf_config_from_llm(llm)
    text.pop("architectures"), text.pop("model_type")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": list(llm.mrope_section)}
    vision = dataclasses.replace(cfg.model.vision, merger=True, out_hidden_size=llm.hidden_size)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=qwen2_5_vl.hf_config_from_vision(vision).to_dict(),
                              image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                              vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                              tie_word_embeddings=llm.tie_embeddings)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config, vision


def _run_tokenizer(cfg: Config):
    """(the run's LLM tokenizer as a Qwen2 tokenizer with the chat template training rendered,
    special token name -> id)."""
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    from finevit.chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS, as_qwen2_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_tokenizer_dir(cfg))
    if not isinstance(tokenizer, Qwen2TokenizerFast):  # e.g. a tokenizer trained for the demo earlier
        tokenizer = as_qwen2_tokenizer(tokenizer.backend_tokenizer)
    system = cfg.data.llm.system_prompt
    tokenizer.chat_template = CHAT_TEMPLATE if not system else CHAT_TEMPLATE.replace(
        "{% for message in messages %}",
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}"
        "{% for message in messages %}", 1)
    return tokenizer, {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}


def write_stage2(model, cfg: Config, out: Path, max_shard_size: str) -> None:
    """A Qwen2_5_VLForConditionalGeneration directory with its processor (the run's pixel budget,
    a chat template rendering conversations as training did); a Qwen3 LLM: write_stage2_parts."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from finevit.convert import qwen2, qwen2_5_vl

    if cfg.model.llm.family != "qwen2":
        return write_stage2_parts(model, cfg, out, max_shard_size)
    tokenizer, ids = _run_tokenizer(cfg)
    config, vision = hf_vlm_config(cfg, ids)
    with torch.device("meta"):  # weights come from the run: no random init, no second copy
        hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    hf.model.visual.load_state_dict(qwen2_5_vl.canonical_to_hf(_state(model.vision), vision), strict=True, assign=True)
    text = qwen2.canonical_to_hf(_state(model.llm), cfg.model.llm)
    hf.model.language_model.load_state_dict({k[len("model."):]: v for k, v in text.items() if k.startswith("model.")},
                                            strict=True, assign=True)
    if "lm_head.weight" in text:
        hf.lm_head.weight = torch.nn.Parameter(text["lm_head.weight"])
    hf.tie_weights()  # a tied head takes the assigned embedding
    hf.save_pretrained(out, max_shard_size=max_shard_size)
    Qwen2_5_VLProcessor(image_processor=_image_processor(cfg), tokenizer=tokenizer,
                        video_processor=Qwen2VLVideoProcessor(),
                        chat_template=tokenizer.chat_template).save_pretrained(out)


def _image_processor(cfg: Config):
    """Qwen2-VL's image processor with the run's pixel budget and patch layout."""
    from transformers import Qwen2VLImageProcessor

    m = cfg.model.vision
    return Qwen2VLImageProcessor(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                                 patch_size=m.patch_size, merge_size=m.spatial_merge_size, temporal_patch_size=2)


def write_stage2_parts(model, cfg: Config, out: Path, max_shard_size: str) -> None:
    """A stage-2 run whose LLM no Hugging Face VLM class pairs with this encoder (Qwen3):
    vision/ (the encoder and its merger, the projector, as a Qwen2.5-VL vision tower whose output
    has the LLM's width, with the image processor) and llm/ (a Qwen3ForCausalLM with the run's
    tokenizer and chat template)."""
    import dataclasses

    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from finevit.convert import qwen2, qwen2_5_vl

    llm = cfg.model.llm
    vision = dataclasses.replace(cfg.model.vision, merger=True, out_hidden_size=llm.hidden_size)
    tower = qwen2_5_vl.canonical_to_hf(_state(model.vision), vision)
    with torch.device("meta"):
        hf_vision = Qwen2_5_VisionTransformerPretrainedModel(qwen2_5_vl.hf_config_from_vision(vision))
    hf_vision.save_pretrained(out / "vision", max_shard_size=max_shard_size, state_dict=tower)
    _image_processor(cfg).save_pretrained(out / "vision")
    hf_cfg = qwen2.hf_config_from_llm(llm)
    arch = hf_cfg.pop("architectures")[0]
    with torch.device("meta"):
        lm = getattr(transformers, arch)(transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg))
    missing, unexpected = lm.load_state_dict(qwen2.canonical_to_hf(_state(model.llm), llm), strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if llm.tie_embeddings else set()):
        raise ExportError(f"the LLM does not map onto {arch}: missing {missing}, unexpected {unexpected}")
    lm.tie_weights()
    lm.save_pretrained(out / "llm", max_shard_size=max_shard_size)
    tokenizer, _ = _run_tokenizer(cfg)
    tokenizer.save_pretrained(out / "llm")


CARD = """# {name}

A FineViT {what}, exported by `finevit convert` from `{source}`.

| | |
|---|---|
| stage | {task} |
| step | {step} |
| samples seen | {samples} |
| recipe | `config.yaml` (the run's resolved config) |

{body}
"""

STAGE1_BODY = """Files: `vision/` (the encoder, a `Qwen2_5_VisionTransformerPretrainedModel` without merger:
stage 1 trains none), `text/` (a `SiglipTextModel`, tokenizer: `text/tokenizer.model`, a
sentencepiece model; a caption is its ids followed by end-of-text id 3, not padded), and
`head.safetensors` (the image head and the loss's temperature and bias).

Image embedding: the encoder's patch states (the input of its merger), per image: LayerNorm
(`norm.*`, eps in the file's metadata) -> attention pooling (`pool.*`, a
`SiglipMultiheadAttentionPoolingHead` with `pool_heads` heads) -> Linear (`proj.*`) -> L2 norm.
Text embedding: `SiglipTextModel(ids).pooler_output` -> L2 norm. A pair's logit:
`exp(logit_scale) * cos + logit_bias`. docs/convert.md has the code, with `transformers` and
`safetensors` only.
"""


STAGE2_PARTS_BODY = """Transformers has no class pairing a {family} LLM with this encoder, so the model is two
directories: `vision/` (the encoder with its 2x2-merge projector, a
`Qwen2_5_VisionTransformerPretrainedModel` whose output rows are LLM embeddings, and the image
processor with the run's pixel budget) and `llm/` (a `{arch}`, with the run's tokenizer and chat
template). A prompt's image block is `<|vision_start|>`, one `<|image_pad|>` per row of the
vision output, `<|vision_end|>`; those rows replace the `<|image_pad|>` embeddings. The LLM was
trained with Qwen2-VL's 3-D rotary positions (M-RoPE, sections {mrope}) on image tokens: a plain
`{arch}` applies 1-D positions, which equal M-RoPE's on text without images, so a VLM built from
these parts must compute M-RoPE's positions (Qwen2-VL's `get_rope_index`) to see images as
training did. Boxes in answers are `[x0, y0, x1, y1]` ({boxes}).
"""


STAGE2_BODY = """A `Qwen2_5_VLForConditionalGeneration` (the FineViT encoder, its 2x2-merge projector and the
LLM) with its processor: `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load it without `trust_remote_code`. The processor resizes images
into the run's pixel budget; its chat template renders conversations as training did. Boxes in
answers are `[x0, y0, x1, y1]` ({boxes}).
"""


def _card(cfg: Config, step_dir: Path, common: dict) -> str:
    train = common.get("train", {})
    if cfg.task == "stage2":
        boxes = ("pixels of the resized image" if cfg.data.llm.box_format == "absolute"
                 else "0..1000 of the image's width and height")
        what = "vision-language model (stage 2)"
        llm = cfg.model.llm
        body = (STAGE2_BODY.format(boxes=boxes) if llm.family == "qwen2" else STAGE2_PARTS_BODY.format(
            family=llm.family.capitalize(), arch=f"{llm.family.capitalize()}ForCausalLM", mrope=list(llm.mrope_section),
            boxes=boxes))
    else:
        what, body = "stage-1 encoder and text tower", STAGE1_BODY
    return CARD.format(name=Path(cfg.logging.run_dir).name, what=what, source=step_dir, task=cfg.task,
                       step=train.get("step", common.get("step")), samples=train.get("consumed_samples", "?"),
                       body=body)


def export_run(path: str, out: str, step: Optional[int] = None, overwrite: bool = False,
               max_shard_size: str = "5GB") -> Path:
    """Export a run's checkpoint (its latest, or `step`) to `out`; returns `out`."""
    step_dir = source_checkpoint(path, step)
    files.verify_loadable(step_dir)
    common = files.read_state(step_dir)["common"]
    cfg = config_from_yaml(common.get("config", "{}"), f"the config saved in {step_dir}")
    if cfg.task not in ("stage1", "stage2"):
        raise ExportError(f"{step_dir} is a {cfg.task} checkpoint, which has no export")
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty: choose another OUT or pass --overwrite")
    tmp = target.with_name(target.name + ".exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    load, write = (load_stage1, write_stage1) if cfg.task == "stage1" else (load_stage2, write_stage2)
    model, loaded = load(cfg, step_dir)
    log.info("exporting %s (step %s) to %s", step_dir, loaded.get("step"), out)
    try:
        with torch.no_grad():
            write(model, cfg, tmp, max_shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "config.yaml").write_text(common.get("config", ""))
    (tmp / "README.md").write_text(_card(cfg, step_dir, common))
    (tmp / "finevit_export.json").write_text(json.dumps({"task": cfg.task, "source": str(step_dir)}))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
