"""Model FLOPs of a VLM step: the encoder's (with its merger) on the row's images plus the LLM's on
its samples (conventions of models/vision/flops.py and models/llm/flops.py)."""

import dataclasses

import torch

from finevit.config import ModelConfig
from finevit.models.llm.flops import llm_train_flops
from finevit.models.vision.flops import encoder_train_flops


def vlm_train_flops(model: ModelConfig, grid_thw: torch.Tensor, lengths: list[int]) -> int:
    """grid_thw [n, 3] of the images (in patches); lengths: the LLM samples' token counts."""
    vision = dataclasses.replace(model.vision, merger=True, out_hidden_size=model.llm.hidden_size)
    return encoder_train_flops(vision, grid_thw) + llm_train_flops(model.llm, lengths)
