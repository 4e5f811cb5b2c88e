"""Build the text tower for this rank, with the right spec and groups."""

from typing import Optional

from megatron.core.process_groups_config import ProcessGroupCollection

from finevit.config import ParallelConfig, TextConfig
from finevit.models.text.config import text_transformer_config
from finevit.models.text.encoder import TextEncoder
from finevit.models.text.layer_spec import text_block_spec
from finevit.models.vision.layer_spec import have_transformer_engine


def build_text_encoder(text: TextConfig, embed_dim: int, parallel: ParallelConfig,
                       pg_collection: ProcessGroupCollection, dtype: str = "fp32",
                       use_te: Optional[bool] = None) -> TextEncoder:
    """The whole text tower (tensor-parallel over pg_collection.tp; never pipeline-split).

    embed_dim is ContrastiveConfig.embed_dim, the width of the head. use_te=None picks
    transformer-engine when it is importable (and CUDA is present).
    """
    if use_te is None:
        use_te = have_transformer_engine()
    config = text_transformer_config(text, parallel, dtype)
    spec = text_block_spec(use_te, text.num_layers, masked=text.pooling == "eos")
    return TextEncoder(config, text, embed_dim, spec, pg_collection)
