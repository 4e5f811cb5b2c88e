"""The stage-1 dual tower: the FineViT encoder against a text tower, trained with a SigLIP loss.

Pipeline layout. The vision layers are split over the pipeline stages (and virtual chunks) like
the encoder alone; the last chunk of the last stage also holds everything that is small next to
a native-resolution image: the attention-pooling head and projection, the whole text tower and
the loss's temperature and bias. So only the vision activations ([max_tokens, 1, hidden], static)
travel between stages, and the contrastive loss runs where both embeddings are.

The text tower is never pipeline-split: it gets its own process-group collection in which the
pipeline group is this rank alone (tensor parallelism is shared with the vision tower).
"""

import dataclasses
from typing import Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from finevit.config import ModelConfig, ParallelConfig
from finevit.models.contrastive import ContrastiveLoss
from finevit.models.pooling import VisionHead
from finevit.models.text.build import build_text_encoder
from finevit.models.text.encoder import TextEncoder, pad_to_length
from finevit.models.towers import tag
from finevit.models.vision.build import build_vision_encoder
from finevit.models.vision.encoder import FineViTEncoder
from finevit.parallel.groups import solo_collection

# "vision" | "text" | "loss" on every parameter (models/towers.py). The loss's temperature and bias
# are their own tower so that they keep learning while a tower is frozen.


class SigLIPChunk(MegatronModule):
    """One pipeline chunk: vision layers, plus pooling head, text tower and loss on the last."""

    model_type = ModelType.encoder_or_decoder
    share_embeddings_and_output_weights = False

    def __init__(self, vision: FineViTEncoder, head: Optional[VisionHead] = None,
                 text: Optional[TextEncoder] = None, loss: Optional[ContrastiveLoss] = None):
        super().__init__(config=vision.config)
        self.vision = vision
        self.pre_process, self.post_process = vision.pre_process, vision.post_process
        self.head, self.text, self.loss = head, text, loss
        self.text_frozen = False
        for module, tower in ((vision, "vision"), (head, "vision"), (text, "text"), (loss, "loss")):
            tag(module, tower)

    def set_input_tensor(self, input_tensor) -> None:
        self.vision.set_input_tensor(input_tensor)

    def forward(self, pixel_values: Optional[torch.Tensor], grid_thw: torch.Tensor,
                cu_seqlens: torch.Tensor, num_tokens: int, text_ids: Optional[torch.Tensor] = None,
                text_lengths: Optional[torch.Tensor] = None, text_len: Optional[int] = None):
        """Between stages: vision activations. On the last: (image_emb [n, d], text_emb [n, d]),
        text_emb None without text_ids."""
        hidden = self.vision(pixel_values if self.pre_process else None, grid_thw, num_tokens)
        if not self.post_process:
            return hidden
        images = self.head(hidden, cu_seqlens.to(hidden.device))  # [S, h] -> [n, embed]
        return images, self.encode_text(text_ids, text_lengths, text_len)

    def encode_text(self, text_ids: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                    text_len: Optional[int]) -> Optional[torch.Tensor]:
        if text_ids is None:  # images alone (evaluating a labelled corpus)
            return None
        if text_len is not None:  # "last" pooling reads the phase's final position
            text_ids = pad_to_length(text_ids, text_len, self.text.text.pad_id)
        # A frozen tower builds no graph: cheaper, and its gradients stay exactly zero. Detached
        # as well: megatron re-enables grad around each layer's bias-dropout-add, which would
        # otherwise hang the biases and every later layer on a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_frozen):
            out = self.text(text_ids, lengths)
        return out.detach() if self.text_frozen else out


def singleton_pipeline(pg: ProcessGroupCollection) -> ProcessGroupCollection:
    """The same groups, except a pipeline group of this rank alone (collective: call on all ranks)."""
    out = ProcessGroupCollection()
    for name, value in vars(pg).items():
        setattr(out, name, value)
    out.pp = solo_collection().pp
    return out


def build_siglip(model: ModelConfig, parallel: ParallelConfig, pg: ProcessGroupCollection,
                 dtype: str = "fp32", use_te: Optional[bool] = None) -> list[SigLIPChunk]:
    """This rank's chunks of the dual tower (one per virtual pipeline stage)."""
    vision = dataclasses.replace(model.vision, merger=False)  # stage 1 pools the patch states
    chunks = build_vision_encoder(vision, parallel, pg, dtype=dtype, use_te=use_te)
    text_pg = singleton_pipeline(pg)
    out = []
    for chunk in chunks:
        if not chunk.post_process:
            out.append(SigLIPChunk(chunk))
            continue
        text_parallel = dataclasses.replace(parallel, pipeline=1, virtual_pipeline=None,
                                            sequence_parallel=False)
        text = build_text_encoder(model.text, model.contrastive.embed_dim, text_parallel, text_pg,
                                  dtype=dtype, use_te=use_te)
        head = VisionHead(vision.hidden_size, model.contrastive, eps=vision.norm_eps)
        head.to(dtype=chunk.config.params_dtype)
        out.append(SigLIPChunk(chunk, head, text, ContrastiveLoss(model.contrastive)))
    return out
