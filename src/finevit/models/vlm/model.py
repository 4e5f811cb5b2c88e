"""The FineViT VLM: the encoder (with its 2x2 merger = the 2-layer MLP projector) feeding a
decoder LLM, Qwen2.5-VL's architecture.

    pixel_values [S, patch_dim] --encoder--> [S, h_v] --merger--> images [S/4, h]
    input_ids [1, s] --LLM embedding--> [s, 1, h]; rows where image_mask is set are replaced by
    the image tokens, in order --(sequence parallel: scatter)--> decoder --> logits [1, s, V / tp]

Positions are M-RoPE's [3, 1, s] (models/vlm/positions.py), samples are packed in one row
(LLMPackedSeqParams). Both towers are tensor-parallel over the same group.
"""

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from finevit.models.llm.packing import LLMPackedSeqParams
from finevit.models.towers import tag


class FineViTVLM(MegatronModule):
    def __init__(self, vision, llm):
        """vision: the encoder with its merger (None on all but the first pipeline stage)."""
        super().__init__(config=llm.config)
        self.vision, self.llm = vision, llm
        self.pre_process, self.post_process = llm.pre_process, llm.post_process
        # Read by megatron's schedules and finalize_model_grads (tied embeddings across stages).
        self.model_type = llm.model_type
        self.share_embeddings_and_output_weights = llm.share_embeddings_and_output_weights
        self.sequence_parallel = llm.config.sequence_parallel
        self.tp_group = llm.pg_collection.tp
        # Towers "vision" (the encoder), "projector" (its merger), "llm": each its own LR
        # multiplier and freezing (e.g. a projector-only warm-up).
        tag(vision, "vision")
        tag(vision.merger if vision is not None else None, "projector")
        tag(llm, "llm")

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.llm.shared_embedding_or_output_weight()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, input_ids: torch.Tensor,
                image_mask: torch.Tensor, position_ids: torch.Tensor, packed_seq_params: LLMPackedSeqParams,
                vit_tokens: int = None, labels: torch.Tensor = None) -> torch.Tensor:
        """image_mask [s] bool; vit_tokens: the encoder's padded patch count (default: all of
        pixel_values). Returns logits [1, s, V / tp] on the last pipeline stage, or with `labels`
        [1, s] (valid token ids) the per-token cross-entropy [1, s] (vocabulary-parallel, never
        gathering the logits); the hidden states [s, 1, h] for the next stage elsewhere (every
        stage needs the positions: M-RoPE's table is computed per stage)."""
        if not self.pre_process:  # the previous stage's hidden states arrive by set_input_tensor
            return self.llm(input_ids, position_ids, None, labels=labels, packed_seq_params=packed_seq_params)
        images = self.vision(pixel_values, grid_thw, vit_tokens)  # [S/4, h]: real rows first
        embeds = self.llm.embedding(input_ids=input_ids, position_ids=None)  # [s, 1, h], not scattered
        mask = image_mask.to(embeds.device).view(-1, 1, 1).expand_as(embeds)
        n = int(image_mask.sum())
        embeds = embeds.masked_scatter(mask, images[:n].to(embeds.dtype))
        if self.sequence_parallel:  # the spliced sequence is cut only now
            embeds = tensor_parallel.scatter_to_sequence_parallel_region(embeds, group=self.tp_group)
        return self.llm(input_ids, position_ids, None, decoder_input=embeds, labels=labels,
                        packed_seq_params=packed_seq_params)
