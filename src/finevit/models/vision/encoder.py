"""FineViT: a native-resolution ViT on megatron-core blocks (Qwen2.5-VL vision architecture).

Input is one packed sequence: the patches of many images of different sizes, concatenated, then
padded to a fixed token budget (static shapes for pipeline parallelism). Per image, attention is
full (or windowed in window layers) and never crosses into another image; padding forms its own
segment. The output is either the per-patch hidden states or, with the merger, one token per
2x2 patch group projected to the LLM width.

Parallelism enters only through the layer spec and the process groups passed in: TP splits
heads / MLP inside megatron's linears, PP builds a slice of the layers (pre_process: patch
embedding, post_process: merger), sequence parallelism splits the token axis between them.
"""

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from finevit.config import VisionConfig
from finevit.models.norm import RMSNorm
from finevit.models.packing import make_packed_seq_params
from finevit.models.vision.config import VisionTransformerConfig
from finevit.models.vision.rope import patch_positions, rotary_freqs, segment_bounds, window_layout


class PatchMerger(MegatronModule):
    """RMSNorm, then a 2-layer GELU MLP over each 2x2 group of patches (4*hidden -> out)."""

    def __init__(self, config: VisionTransformerConfig, vision: VisionConfig,
                 pg_collection: ProcessGroupCollection):
        # The merger sees full (gathered) sequences, so its linears never scatter/gather tokens.
        config = dataclasses.replace(config, sequence_parallel=False)
        super().__init__(config=config)
        width = vision.hidden_size * vision.merge_unit
        self.norm = RMSNorm(config, vision.hidden_size, eps=vision.norm_eps)
        self.linear_fc1 = ColumnParallelLinear(
            width, width, config=config, init_method=config.init_method, bias=True,
            gather_output=False, tp_group=pg_collection.tp)
        self.linear_fc2 = RowParallelLinear(
            width, vision.out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=pg_collection.tp)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).reshape(-1, self.width)  # [s, h] -> [s/4, 4h]: each group is 4 rows
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class FineViTEncoder(MegatronModule):
    # Read by megatron's pipeline schedules and finalize_model_grads: no weights are tied
    # between the first and last pipeline stage.
    model_type = ModelType.encoder_or_decoder
    share_embeddings_and_output_weights = False

    def __init__(self, config: VisionTransformerConfig, vision: VisionConfig, spec: ModuleSpec,
                 pg_collection: ProcessGroupCollection, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None):
        super().__init__(config=config)
        self.vision = vision
        self.pg_collection = pg_collection
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        if pre_process:
            # A Conv3d with stride == kernel is a linear map of each flattened patch.
            self.patch_embed = torch.nn.Linear(vision.patch_dim, vision.hidden_size, bias=False,
                                               dtype=config.params_dtype)
            config.init_method(self.patch_embed.weight)
        self.decoder = TransformerBlock(config, spec, post_layer_norm=False, pre_process=pre_process,
                                        post_process=post_process, pg_collection=pg_collection,
                                        vp_stage=vp_stage)
        self.merger = PatchMerger(config, vision, pg_collection) if post_process and vision.merger else None
        # A frozen encoder builds no graph (its merger, the projector tower, still does): a
        # stage-2 warm-up then costs the encoder's forward only.
        self.frozen = False

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def layout(self, grid_thw: torch.Tensor, num_tokens: int):
        """Rotary angles, attention segments and (window layers only) the token order."""
        v = self.vision
        cu_seqlens = segment_bounds(grid_thw, num_tokens)
        pos = patch_positions(grid_thw, v.spatial_merge_size)
        pad = num_tokens - pos.shape[0]
        pos = torch.cat([pos, pos.new_zeros(pad, 2)])  # padding tokens: position (0, 0)
        rope = rotary_freqs(pos, v.head_dim, v.rope_theta)
        order = window_cu = None
        if v.window_layers:
            groups = v.window_size // (v.patch_size * v.spatial_merge_size)
            order, window_cu = window_layout(grid_thw, v.spatial_merge_size, groups, num_tokens)
            rope = rope[order]
        return rope, make_packed_seq_params(cu_seqlens, window_cu), order

    def forward(self, pixel_values: Optional[torch.Tensor], grid_thw: torch.Tensor,
                num_tokens: Optional[int] = None) -> torch.Tensor:
        """pixel_values: [S, patch_dim] on the first stage (None elsewhere); grid_thw: [n, 3].

        Returns [S, 1, hidden] between pipeline stages; on the last stage [S/4, out_hidden]
        with the merger, else [S, hidden] (padding rows included, real ones first).
        """
        if num_tokens is None:
            num_tokens = pixel_values.shape[0]
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        rope, packed, order = self.layout(grid_thw, num_tokens)
        rope = rope.to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self._encode(pixel_values, rope, packed, order)
        if self.frozen:  # megatron re-enables grad around bias-dropout-add: cut what that hung on
            out = out.detach()
        if not self.post_process:
            return out
        if self.config.sequence_parallel:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False,
                                                       group=self.pg_collection.tp)
        out = out.squeeze(1)
        if order is not None:
            out = out[torch.argsort(order).to(out.device)]
        return self.merger(out) if self.merger is not None else out

    def _encode(self, pixel_values, rope, packed, order) -> torch.Tensor:
        """Patch embedding (first stage) and this stage's layers: [S, 1, hidden] (S / tp with SP)."""
        hidden = None
        if self.pre_process:
            hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
            if order is not None:
                hidden = hidden[order.to(hidden.device)]
            hidden = hidden.unsqueeze(1)  # [S, h] -> [S, b=1, h], megatron's layout
            if self.config.sequence_parallel:
                hidden = scatter_to_sequence_parallel_region(hidden, group=self.pg_collection.tp)
        return self.decoder(hidden, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=packed)
