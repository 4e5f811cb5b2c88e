"""One validation pass over a Config, before any process group exists.

Every problem found is reported (one sentence each, naming the offending keys and values), so a
user fixes a broken config in one round instead of one crash per launch. Checks that divide by a
setting run only when that setting is itself valid, so a zero never crashes the validator.
"""

from typing import Optional

from finevit.config.errors import ConfigError
from finevit.config.model import LLM_FAMILIES
from finevit.config.schema import Config

RECOMPUTE = ("none", "selective", "full")
DTYPES = ("bf16", "fp16", "fp32")
DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
BACKENDS = ("auto", "nccl", "gloo")
OPTIMIZERS = ("adam", "sgd")  # megatron-core's names
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")  # megatron's, see checkpointing/dist.py
VISION_SIZES = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "patch_size",
                "temporal_patch_size", "in_channels", "spatial_merge_size", "out_hidden_size")


def one_of(key: str, value: str, allowed: tuple) -> list[str]:
    return [] if value in allowed else [f"{key}='{value}' is not one of {', '.join(allowed)}"]


def positive(section: str, obj, keys) -> list[str]:
    return [f"{section}.{k}={getattr(obj, k)} must be a positive integer" for k in keys if getattr(obj, k) < 1]


def vision_ok(cfg: Config) -> bool:
    return not positive("model.vision", cfg.model.vision, VISION_SIZES)


def parallel_ok(cfg: Config) -> bool:
    return cfg.parallel.tensor >= 1 and cfg.parallel.pipeline >= 1


def _vision(cfg: Config) -> list[str]:
    v = cfg.model.vision
    out = positive("model.vision", v, VISION_SIZES)
    for key in ("norm_eps", "rope_theta", "init_std"):
        if not getattr(v, key) > 0:
            out.append(f"model.vision.{key}={getattr(v, key)} must be positive")
    if out:
        return out
    if v.hidden_size % v.num_heads:
        out.append(f"model.vision.hidden_size={v.hidden_size} is not divisible by model.vision.num_heads={v.num_heads}")
    elif v.head_dim % 4:
        # 2D RoPE: half the rotated pairs encode the row, half the column.
        out.append(f"model.vision head dim {v.head_dim} (hidden_size/num_heads) must be divisible by 4 for 2D rotary embeddings")
    bad = sorted({i for i in v.window_layers if not 0 <= i < v.num_layers})
    if bad:
        out.append(f"model.vision.window_layers {bad} are outside [0, num_layers={v.num_layers})")
    if len(set(v.window_layers)) < len(v.window_layers):
        out.append(f"model.vision.window_layers {list(v.window_layers)} lists a layer more than once")
    unit = v.patch_size * v.spatial_merge_size
    if v.window_layers and (v.window_size < 1 or v.window_size % unit):
        out.append(f"model.vision.window_size={v.window_size} must be a positive multiple of patch_size x spatial_merge_size = {unit}")
    if parallel_ok(cfg):
        tp = cfg.parallel.tensor
        if v.num_heads % tp:
            out.append(f"model.vision.num_heads={v.num_heads} is not divisible by parallel.tensor={tp}")
        if v.ffn_hidden_size % tp:
            out.append(f"model.vision.ffn_hidden_size={v.ffn_hidden_size} is not divisible by parallel.tensor={tp}")
    return out


LLM_SIZES = ("vocab_size", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
             "max_positions")


def _llm(cfg: Config) -> list[str]:
    m = cfg.model.llm
    if m is None:
        return []
    out = positive("model.llm", m, LLM_SIZES) + one_of("model.llm.family", m.family, LLM_FAMILIES)
    if out:
        return out
    if m.num_heads % m.num_kv_heads:
        out.append(f"model.llm.num_heads={m.num_heads} is not divisible by model.llm.num_kv_heads={m.num_kv_heads}")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        out.append(f"model.llm.hidden_size={m.hidden_size} is not divisible by model.llm.num_heads={m.num_heads}: "
                   "set model.llm.head_dim")
    elif 2 * sum(m.mrope_section) != m.kv_channels:
        out.append(f"model.llm.mrope_section={m.mrope_section} must sum to head_dim / 2 = {m.kv_channels // 2}")
    if parallel_ok(cfg):
        tp = cfg.parallel.tensor
        for key in ("num_kv_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(m, key) % tp:
                out.append(f"model.llm.{key}={getattr(m, key)} is not divisible by parallel.tensor={tp}")
    return out


def _phases(cfg: Config) -> list[str]:
    out, phases = [], cfg.schedule.phases
    if phases and phases[0].start_samples != 0:
        out.append(f"schedule.phases[0].start_samples={phases[0].start_samples} must be 0 (the first phase starts the run)")
    for i in range(1, len(phases)):
        if phases[i].start_samples <= phases[i - 1].start_samples:
            out.append(f"schedule.phases[{i}].start_samples={phases[i].start_samples} must be larger than "
                       f"schedule.phases[{i - 1}].start_samples={phases[i - 1].start_samples}")
    for i, p in enumerate(phases[1:], 1):
        if p.start_samples >= cfg.schedule.train_samples:
            out.append(f"schedule.phases[{i}].start_samples={p.start_samples} is not below "
                       f"schedule.train_samples={cfg.schedule.train_samples}, so the phase would never run")
    lo, hi, text = cfg.data.min_pixels, cfg.data.max_pixels, cfg.data.max_text_len
    for i, p in enumerate(phases):
        lo, hi = p.min_pixels or lo, p.max_pixels or hi
        text = p.max_text_len or text
        if not 0 < lo <= hi:
            out.append(f"schedule.phases[{i}] pixel budget [{lo}, {hi}] must satisfy 0 < min <= max")
        elif vision_ok(cfg) and cfg.data.max_tokens < hi // cfg.model.vision.patch_size**2:
            out.append(f"schedule.phases[{i}].max_pixels={hi} gives images of {hi // cfg.model.vision.patch_size**2} "
                       f"patches, more than data.max_tokens={cfg.data.max_tokens}")
        if text > cfg.data.max_text_len:
            out.append(f"schedule.phases[{i}].max_text_len={text} exceeds data.max_text_len={cfg.data.max_text_len}, "
                       "the most tokens the loader keeps")
    return out


def _parallel(cfg: Config, world_size: Optional[int]) -> list[str]:
    p = cfg.parallel
    out = positive("parallel", p, ("tensor", "pipeline", "timeout_s"))
    if p.recompute == "full" and p.recompute_num_layers < 1:
        out.append(f"parallel.recompute_num_layers={p.recompute_num_layers} must be a positive integer")
    out += one_of("parallel.recompute", p.recompute, RECOMPUTE)
    out += one_of("parallel.backend", p.backend, BACKENDS)
    if p.overlap_param_gather and not p.distributed_optimizer:
        out.append("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")
    if world_size is not None and world_size < 1:
        out.append(f"world size {world_size} must be a positive integer")
    if not parallel_ok(cfg):
        return out
    vpp = p.virtual_pipeline
    if vpp is not None:
        if vpp < 2:
            out.append(f"parallel.virtual_pipeline={vpp} must be at least 2 (or null to disable it)")
        elif p.pipeline < 2:
            out.append(f"parallel.virtual_pipeline={vpp} needs parallel.pipeline >= 2, got {p.pipeline}")
    if p.sequence_parallel and p.tensor == 1:
        out.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    elif p.sequence_parallel and cfg.data.max_tokens % p.tensor:
        out.append(f"data.max_tokens={cfg.data.max_tokens} is not divisible by parallel.tensor={p.tensor}, which sequence parallelism requires")
    if world_size is not None and world_size >= 1:
        if world_size % p.model_parallel_size():
            out.append(
                f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                f"{p.tensor} x {p.pipeline}")
    return out


def _data(cfg: Config) -> list[str]:
    d, v = cfg.data, cfg.model.vision
    out = cfg.data.problems()
    if d.max_tokens < 1:
        return out + [f"data.max_tokens={d.max_tokens} must be a positive integer"]
    if not 0 < d.min_pixels <= d.max_pixels:
        out.append(f"data.min_pixels={d.min_pixels} and data.max_pixels={d.max_pixels} must satisfy 0 < min <= max")
    if not vision_ok(cfg):
        return out
    if d.max_tokens < v.merge_unit:
        side = v.patch_size * v.spatial_merge_size
        return out + [f"data.max_tokens={d.max_tokens} cannot hold even one {side}x{side} image"]
    if 0 < d.min_pixels <= d.max_pixels and d.max_tokens < d.max_pixels // v.patch_size**2:
        out.append(
            f"data.max_tokens={d.max_tokens} is smaller than the {d.max_pixels // v.patch_size**2} patches "
            f"of an image at data.max_pixels={d.max_pixels}")
    if d.max_tokens % v.merge_unit:
        out.append(f"data.max_tokens={d.max_tokens} must be a multiple of {v.merge_unit} (one merged token)")
    return out


def _optimizer(cfg: Config) -> list[str]:
    o = cfg.optimizer
    out = one_of("optimizer.name", o.name, OPTIMIZERS)
    if not o.lr > 0:
        out.append(f"optimizer.lr={o.lr} must be positive")
    elif not 0 <= o.min_lr <= o.lr:
        out.append(f"optimizer.min_lr={o.min_lr} must lie in [0, optimizer.lr={o.lr}]")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        out.append(f"optimizer betas ({o.beta1}, {o.beta2}) must lie in [0, 1)")
    if not o.eps > 0:
        out.append(f"optimizer.eps={o.eps} must be positive")
    for key in ("weight_decay", "clip_grad"):
        if not getattr(o, key) >= 0:
            out.append(f"optimizer.{key}={getattr(o, key)} must not be negative")
    return out


def _schedule(cfg: Config) -> list[str]:
    s = cfg.schedule
    out = positive("schedule", s, ("train_samples", "micro_batches_per_step", "max_bad_steps_in_a_row"))
    if s.stop_after_steps is not None and s.stop_after_steps < 1:
        out.append(f"schedule.stop_after_steps={s.stop_after_steps} must be a positive integer (or null)")
    if s.warmup_samples < 0:
        out.append(f"schedule.warmup_samples={s.warmup_samples} must not be negative")
    elif s.warmup_samples > s.train_samples:
        out.append(f"schedule.warmup_samples={s.warmup_samples} exceeds schedule.train_samples={s.train_samples}")
    out += one_of("schedule.decay_style", s.decay_style, DECAY_STYLES)
    if s.decay_style == "wsd" and not 0 < s.wsd_decay_fraction <= 1:
        out.append(f"schedule.wsd_decay_fraction={s.wsd_decay_fraction} must lie in (0, 1]")
    return out


def _runtime(cfg: Config) -> list[str]:
    out = one_of("precision.dtype", cfg.precision.dtype, DTYPES)
    out += positive("checkpoint", cfg.checkpoint, ("save_interval", "keep_last"))
    out += one_of("checkpoint.optimizer_format", cfg.checkpoint.optimizer_format, OPTIMIZER_FORMATS)
    out += positive("logging", cfg.logging, ("log_interval",))
    if not cfg.checkpoint.owner_stale_s > 0:
        out.append(f"checkpoint.owner_stale_s={cfg.checkpoint.owner_stale_s} must be positive (seconds)")
    if cfg.checkpoint.load_weights_only and not cfg.checkpoint.load:
        out.append("checkpoint.load_weights_only=true needs checkpoint.load (the checkpoint to take "
                   "the weights from)")
    if not cfg.logging.run_dir:
        out.append("logging.run_dir is empty")
    return out


def problems(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    """Problems of the sections every task shares; a task checks its own (config/stage1.py, ...)
    through train/task.py:task_problems."""
    return (_vision(cfg) + _llm(cfg) + _parallel(cfg, world_size) + _data(cfg) + _optimizer(cfg)
            + _schedule(cfg) + _phases(cfg) + _runtime(cfg))


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Raise ConfigError listing every problem; return cfg unchanged when there is none."""
    found = problems(cfg, world_size)
    if found:
        raise ConfigError(found)
    return cfg
