"""Stage 2's model: the FineViT encoder + its merger (the projector) feeding a decoder LLM."""

import dataclasses
from typing import Optional

from megatron.core.process_groups_config import ProcessGroupCollection

from finevit.config import ModelConfig, ParallelConfig
from finevit.models.llm import build_llm
from finevit.models.vision.build import build_vision_encoder
from finevit.models.vlm.model import FineViTVLM
from finevit.models.vlm.positions import mrope_positions


def build_vlm(model: ModelConfig, parallel: ParallelConfig, pg_collection: ProcessGroupCollection,
              dtype: str = "fp32", use_te: Optional[bool] = None) -> FineViTVLM:
    """The VLM on this rank (tensor / sequence parallel; one pipeline stage for now). The
    merger's output width is the LLM's hidden size."""
    if parallel.pipeline > 1 or parallel.virtual_pipeline:
        raise NotImplementedError("the VLM does not split over pipeline stages yet")
    if model.llm is None:
        raise ValueError("model.llm is not set: the VLM needs a decoder LLM")
    vision = dataclasses.replace(model.vision, merger=True, out_hidden_size=model.llm.hidden_size)
    (encoder,) = build_vision_encoder(vision, parallel, pg_collection, dtype, use_te)
    llm = build_llm(model.llm, parallel, pg_collection, dtype, use_te=use_te, scatter_embeddings=False)
    return FineViTVLM(encoder, llm)


__all__ = ["FineViTVLM", "build_vlm", "mrope_positions"]
