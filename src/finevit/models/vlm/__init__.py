"""Stage 2's model: the FineViT encoder + its merger (the projector) feeding a decoder LLM."""

import dataclasses
from typing import Optional

from megatron.core.process_groups_config import ProcessGroupCollection

from finevit.config import ModelConfig, ParallelConfig
from finevit.models.llm import build_llm
from finevit.models.siglip import singleton_pipeline
from finevit.models.vision.build import build_vision_encoder
from finevit.models.vlm.model import FineViTVLM
from finevit.models.vlm.positions import mrope_positions


def build_vlm(model: ModelConfig, parallel: ParallelConfig, pg_collection: ProcessGroupCollection,
              dtype: str = "fp32", use_te: Optional[bool] = None,
              first_stage_layers: Optional[int] = None) -> FineViTVLM:
    """This rank's part of the VLM (tensor / sequence / pipeline parallel). The encoder and its
    merger (output width: the LLM's hidden size) live whole on the first pipeline stage, with the
    LLM's embedding and its first `first_stage_layers` layers (default: an even split); the other
    stages hold LLM layers only. Collective (builds a pipeline group of one)."""
    if parallel.virtual_pipeline:
        raise NotImplementedError("the VLM does not support virtual pipeline stages yet")
    if model.llm is None:
        raise ValueError("model.llm is not set: the VLM needs a decoder LLM")
    first = pg_collection.pp.rank() == 0
    last = pg_collection.pp.rank() == pg_collection.pp.size() - 1
    vision_pg = singleton_pipeline(pg_collection)  # on every rank: it makes a group
    encoder = None
    if first:
        vision = dataclasses.replace(model.vision, merger=True, out_hidden_size=model.llm.hidden_size)
        (encoder,) = build_vision_encoder(vision, dataclasses.replace(parallel, pipeline=1), vision_pg, dtype, use_te)
    llm = build_llm(model.llm, parallel, pg_collection, dtype, pre_process=first, post_process=last,
                    use_te=use_te, first_stage_layers=first_stage_layers, scatter_embeddings=False)
    return FineViTVLM(encoder, llm)


__all__ = ["FineViTVLM", "build_vlm", "mrope_positions"]
