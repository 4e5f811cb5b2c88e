"""Stage 2's own config checks: the LLM and its sequences, the pipeline split of the VLM.

Called through the task registry (train/task.py:task_problems) after config/validate.py's checks
of the shared sections; light, imports no model code.
"""

from finevit.config.schema import Config
from finevit.config.validate import parallel_ok, vision_ok

# Chat-template tokens around an image and a turn that a row must hold besides the image's own.
TEMPLATE_TOKENS = 16


def llm_tokenizer_dir(cfg: Config):
    """Stage 2's tokenizer directory: data.llm.tokenizer, else the LLM directory model.llm.init_from."""
    return (cfg.data.llm and cfg.data.llm.tokenizer) or (cfg.model.llm and cfg.model.llm.init_from) or None


def _needs(cfg: Config) -> list[str]:
    out = []
    if cfg.model.llm is None:
        out.append("model.llm is not set: stage 2 trains the encoder with a decoder LLM (see "
                   "configs/model/llm/ for presets)")
    if cfg.data.llm is None:
        out.append("data.llm is not set: stage 2 needs its LLM sequences described (data.llm.max_tokens, "
                   "data.llm.tokenizer or model.llm.init_from)")
    elif not cfg.data.llm.tokenizer and (cfg.model.llm is None or not cfg.model.llm.init_from):
        out.append("data.llm.tokenizer is not set and model.llm.init_from names no directory to take "
                   "the LLM's tokenizer from")
    if cfg.model.vision.init_projector and not cfg.model.vision.init_from:
        out.append("model.vision.init_projector=true needs model.vision.init_from (where the projector comes from)")
    return out


def _pipeline(cfg: Config) -> list[str]:
    """The LLM's layers are what stage 2 splits over pipeline stages; the first stage also holds
    the encoder and projector, and may take fewer LLM layers (parallel.first_stage_layers)."""
    p, llm = cfg.parallel, cfg.model.llm
    if not parallel_ok(cfg) or llm is None or llm.num_layers < 1:
        return []
    out = []
    if p.virtual_pipeline:
        out.append("parallel.virtual_pipeline is not supported by stage 2's VLM yet: leave it unset")
    first = p.first_stage_layers
    if first is not None:
        if p.pipeline < 2:
            out.append(f"parallel.first_stage_layers={first} needs parallel.pipeline >= 2")
        elif not 0 <= first <= llm.num_layers or (llm.num_layers - first) % (p.pipeline - 1):
            out.append(f"parallel.first_stage_layers={first} must leave model.llm.num_layers={llm.num_layers} "
                       f"minus it divisible by the other {p.pipeline - 1} pipeline stages")
    elif llm.num_layers % p.pipeline:
        out.append(f"model.llm.num_layers={llm.num_layers} is not divisible by parallel.pipeline={p.pipeline}: "
                   "set parallel.first_stage_layers for an uneven split")
    return out


def _rows(cfg: Config) -> list[str]:
    d = cfg.data
    if d.llm is None or d.llm.max_tokens < 1 or not vision_ok(cfg) or not parallel_ok(cfg):
        return []
    out, v = [], cfg.model.vision
    if cfg.parallel.sequence_parallel and d.llm.max_tokens % cfg.parallel.tensor:
        out.append(f"data.llm.max_tokens={d.llm.max_tokens} is not divisible by parallel.tensor="
                   f"{cfg.parallel.tensor}, which sequence parallelism requires")
    hi = max([d.max_pixels] + [p.max_pixels or 0 for p in cfg.schedule.phases])
    image = hi // (v.patch_size * v.spatial_merge_size) ** 2
    if d.llm.max_tokens < image + TEMPLATE_TOKENS:
        out.append(f"data.llm.max_tokens={d.llm.max_tokens} cannot hold an image at max_pixels={hi} "
                   f"({image} LLM tokens) and a turn around it")
    return out


def problems(cfg: Config) -> list[str]:
    return _needs(cfg) + _pipeline(cfg) + _rows(cfg)


def notes(cfg: Config) -> list[str]:
    return []
