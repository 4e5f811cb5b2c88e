"""Stage 1's own config checks: the text tower, the contrastive head, the pipeline split of the
encoder, the phases' text lengths, the zero-shot prompts, and what its micro-batching means.

Called through the task registry (train/task.py:task_problems) after config/validate.py's checks
of the shared sections; light, imports no model code.
"""

from finevit.config.schema import Config
from finevit.config.validate import one_of, parallel_ok, positive, vision_ok

TEXT_SIZES = ("vocab_size", "max_positions", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size")
POOLINGS = ("last", "eos")
LOSSES = ("sigmoid", "softmax")


def _text(cfg: Config) -> list[str]:
    t, c = cfg.model.text, cfg.model.contrastive
    out = positive("model.text", t, TEXT_SIZES) + positive("model.contrastive", c, ("embed_dim", "pool_heads", "chunk_size"))
    out += one_of("model.text.pooling", t.pooling, POOLINGS) + one_of("model.contrastive.loss", c.loss, LOSSES)
    if out:
        return out
    if t.hidden_size % t.num_heads:
        out.append(f"model.text.hidden_size={t.hidden_size} is not divisible by model.text.num_heads={t.num_heads}")
    v = cfg.model.vision
    if vision_ok(cfg) and not v.hidden_size % v.num_heads and v.hidden_size % c.pool_heads:
        out.append(f"model.vision.hidden_size={v.hidden_size} is not divisible by model.contrastive.pool_heads={c.pool_heads}")
    if not 0 <= t.pad_id < t.vocab_size:
        out.append(f"model.text.pad_id={t.pad_id} is outside the vocabulary [0, {t.vocab_size})")
    if cfg.data.max_text_len > t.max_positions and cfg.data.tokenizer:
        out.append(f"data.max_text_len={cfg.data.max_text_len} exceeds model.text.max_positions={t.max_positions}")
    if parallel_ok(cfg):
        tp = cfg.parallel.tensor
        for key in ("num_heads", "ffn_hidden_size"):
            if getattr(t, key) % tp:
                out.append(f"model.text.{key}={getattr(t, key)} is not divisible by parallel.tensor={tp}")
    return out


def _pipeline(cfg: Config) -> list[str]:
    """The encoder's layers are what stage 1 splits over pipeline chunks."""
    p, layers = cfg.parallel, cfg.model.vision.num_layers
    if not parallel_ok(cfg) or layers < 1 or (p.virtual_pipeline is not None and p.virtual_pipeline < 2):
        return []
    chunks = p.pipeline * (p.virtual_pipeline or 1)
    if layers % chunks:
        return [f"model.vision.num_layers={layers} is not divisible by the {chunks} pipeline chunks "
                f"(parallel.pipeline={p.pipeline} x parallel.virtual_pipeline={p.virtual_pipeline or 1})"]
    return []


def _phase_texts(cfg: Config) -> list[str]:
    out, text = [], cfg.data.max_text_len
    for i, phase in enumerate(cfg.schedule.phases):
        text = phase.max_text_len or text
        if text > cfg.model.text.max_positions:
            out.append(f"schedule.phases[{i}].max_text_len={text} exceeds model.text.max_positions="
                       f"{cfg.model.text.max_positions}")
    return out


def _templates(cfg: Config) -> list[str]:
    templates = cfg.eval.templates
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        return [f"eval.templates={templates!r} must be a non-empty list of prompts, each with one {{}} "
                f"for the class name"]
    return []


def problems(cfg: Config) -> list[str]:
    return _text(cfg) + _pipeline(cfg) + _phase_texts(cfg) + _templates(cfg)


def notes(cfg: Config) -> list[str]:
    """Valid but consequential choices, logged once at the start of a run."""
    out = []
    m = cfg.schedule.micro_batches_per_step
    if m > 1:
        out.append(
            f"schedule.micro_batches_per_step={m}: each step holds {m} separate contrastive groups "
            "(one micro-batch across the data-parallel ranks each); the loss is the mean of their "
            f"losses, not the loss of one {m}x larger batch, whose negatives span all of them")
    return out
