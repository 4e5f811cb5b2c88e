"""Build the vision tower for this rank: its pipeline chunk(s), with the right spec and groups."""

from typing import Optional

from megatron.core.process_groups_config import ProcessGroupCollection

from finevit.config import ParallelConfig, VisionConfig
from finevit.models.vision.config import vision_transformer_config
from finevit.models.vision.encoder import FineViTEncoder
from finevit.models.vision.layer_spec import have_transformer_engine, vision_layer_spec


def build_vision_encoder(vision: VisionConfig, parallel: ParallelConfig,
                         pg_collection: ProcessGroupCollection, dtype: str = "fp32",
                         use_te: Optional[bool] = None) -> list[FineViTEncoder]:
    """One FineViTEncoder per virtual pipeline chunk held by this rank (a list of one without VPP).

    use_te=None picks transformer-engine when it is importable (and CUDA is present).
    """
    if use_te is None:
        use_te = have_transformer_engine()
    config = vision_transformer_config(vision, parallel, dtype, use_te)
    spec = vision_layer_spec(use_te)
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    chunks = parallel.virtual_pipeline or 1
    models = []
    for vp in range(chunks):
        models.append(FineViTEncoder(
            config, vision, spec, pg_collection,
            pre_process=pp_rank == 0 and vp == 0,
            post_process=pp_rank == pp_size - 1 and vp == chunks - 1,
            vp_stage=vp if parallel.virtual_pipeline else None,
        ))
    return models
