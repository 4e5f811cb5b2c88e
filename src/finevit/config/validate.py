"""One validation pass over a Config, before any process group exists.

Every problem found is reported (one sentence each, naming the offending keys and values), so a
user fixes a broken config in one round instead of one crash per launch.
"""

from typing import Optional

from finevit.config.errors import ConfigError
from finevit.config.schema import Config

RECOMPUTE = ("none", "selective", "full")
DTYPES = ("bf16", "fp16", "fp32")
DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
BACKENDS = ("auto", "nccl", "gloo")


def _vision(cfg: Config) -> list[str]:
    v, tp = cfg.model.vision, cfg.parallel.tensor
    out = []
    for key in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "patch_size",
                "temporal_patch_size", "in_channels", "spatial_merge_size", "out_hidden_size"):
        if getattr(v, key) < 1:
            out.append(f"model.vision.{key}={getattr(v, key)} must be a positive integer")
    if out:
        return out
    if v.hidden_size % v.num_heads:
        out.append(f"model.vision.hidden_size={v.hidden_size} is not divisible by model.vision.num_heads={v.num_heads}")
    elif v.head_dim % 4:
        out.append(f"model.vision head dim {v.head_dim} (hidden_size/num_heads) must be divisible by 4 for 2D rotary embeddings")
    if v.num_heads % tp:
        out.append(f"model.vision.num_heads={v.num_heads} is not divisible by parallel.tensor={tp}")
    if v.ffn_hidden_size % tp:
        out.append(f"model.vision.ffn_hidden_size={v.ffn_hidden_size} is not divisible by parallel.tensor={tp}")
    unit = v.patch_size * v.spatial_merge_size
    if v.window_layers and v.window_size % unit:
        out.append(f"model.vision.window_size={v.window_size} must be a multiple of patch_size x spatial_merge_size = {unit}")
    bad = [i for i in v.window_layers if not 0 <= i < v.num_layers]
    if bad:
        out.append(f"model.vision.window_layers {bad} are outside [0, num_layers={v.num_layers})")
    return out


def _parallel(cfg: Config, world_size: Optional[int]) -> list[str]:
    p, layers = cfg.parallel, cfg.model.vision.num_layers
    out = []
    for key in ("tensor", "pipeline"):
        if getattr(p, key) < 1:
            out.append(f"parallel.{key}={getattr(p, key)} must be a positive integer")
    if out:
        return out
    vpp = p.virtual_pipeline
    if vpp is not None:
        if vpp < 2:
            out.append(f"parallel.virtual_pipeline={vpp} must be at least 2 (or null to disable it)")
        elif p.pipeline < 2:
            out.append(f"parallel.virtual_pipeline={vpp} needs parallel.pipeline >= 2, got {p.pipeline}")
    chunks = p.pipeline * (vpp or 1)
    if layers % chunks:
        out.append(
            f"model.vision.num_layers={layers} is not divisible by the {chunks} pipeline chunks "
            f"(parallel.pipeline={p.pipeline} x parallel.virtual_pipeline={vpp or 1})")
    if p.sequence_parallel and p.tensor == 1:
        out.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if p.sequence_parallel and cfg.data.max_tokens % p.tensor:
        out.append(f"data.max_tokens={cfg.data.max_tokens} is not divisible by parallel.tensor={p.tensor}, which sequence parallelism requires")
    if p.recompute not in RECOMPUTE:
        out.append(f"parallel.recompute='{p.recompute}' is not one of {', '.join(RECOMPUTE)}")
    if p.backend not in BACKENDS:
        out.append(f"parallel.backend='{p.backend}' is not one of {', '.join(BACKENDS)}")
    if p.overlap_param_gather and not p.distributed_optimizer:
        out.append("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")
    if world_size is not None and world_size % p.model_parallel_size():
        out.append(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
            f"{p.tensor} x {p.pipeline}")
    return out


def _data(cfg: Config) -> list[str]:
    d, v = cfg.data, cfg.model.vision
    out = []
    side = v.patch_size * v.spatial_merge_size
    if not 0 < d.min_pixels <= d.max_pixels:
        out.append(f"data.min_pixels={d.min_pixels} and data.max_pixels={d.max_pixels} must satisfy 0 < min <= max")
    elif d.max_tokens * v.patch_size**2 < side * side:
        out.append(f"data.max_tokens={d.max_tokens} cannot hold even one {side}x{side} image")
    elif d.max_tokens < d.max_pixels // v.patch_size**2:
        out.append(
            f"data.max_tokens={d.max_tokens} is smaller than the {d.max_pixels // v.patch_size**2} patches "
            f"of an image at data.max_pixels={d.max_pixels}")
    if d.max_tokens % v.merge_unit:
        out.append(f"data.max_tokens={d.max_tokens} must be a multiple of {v.merge_unit} (one merged token)")
    return out


def _training(cfg: Config) -> list[str]:
    o, s = cfg.optimizer, cfg.schedule
    out = []
    if o.lr <= 0:
        out.append(f"optimizer.lr={o.lr} must be positive")
    if not 0 <= o.min_lr <= o.lr:
        out.append(f"optimizer.min_lr={o.min_lr} must lie in [0, optimizer.lr={o.lr}]")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        out.append(f"optimizer betas ({o.beta1}, {o.beta2}) must lie in [0, 1)")
    if s.global_batch_size < 1 or s.micro_batch_size < 1:
        out.append("schedule.global_batch_size and schedule.micro_batch_size must be positive")
    if s.warmup_samples > s.train_samples:
        out.append(f"schedule.warmup_samples={s.warmup_samples} exceeds schedule.train_samples={s.train_samples}")
    if s.decay_style not in DECAY_STYLES:
        out.append(f"schedule.decay_style='{s.decay_style}' is not one of {', '.join(DECAY_STYLES)}")
    if cfg.precision.dtype not in DTYPES:
        out.append(f"precision.dtype='{cfg.precision.dtype}' is not one of {', '.join(DTYPES)}")
    if cfg.checkpoint.keep_last < 1:
        out.append(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be at least 1")
    return out


def problems(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    return _vision(cfg) + _parallel(cfg, world_size) + _data(cfg) + _training(cfg)


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Raise ConfigError listing every problem; return cfg unchanged when there is none."""
    found = problems(cfg, world_size)
    if found:
        raise ConfigError(found)
    return cfg
