"""Model FLOPs of the encoder for a packed batch (for throughput and MFU logging).

Counted per image from its own token count, so packing padding is not counted as useful work,
and attention is quadratic in the image's (or window's) length, not the packed length. A
multiply-add is 2 FLOPs; training is forward + backward = 3x forward (activation recomputation
is hardware work, not model work, and is deliberately not counted, as in MFU conventions).
"""

import torch

from finevit.config import VisionConfig


def _attention_lengths(vision: VisionConfig, h: int, w: int, window: bool) -> list[int]:
    if not window:
        return [h * w]
    side = vision.window_size // vision.patch_size  # window side in patches
    return [min(side, h - r) * min(side, w - c) for r in range(0, h, side) for c in range(0, w, side)]


def encoder_forward_flops(vision: VisionConfig, grid_thw: torch.Tensor) -> int:
    d, f = vision.hidden_size, vision.ffn_hidden_size
    total = 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        total += 2 * n * vision.patch_dim * d  # patch embedding
        per_layer = 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * 2 * f + 2 * n * f * d  # qkv, proj, MLP
        total += vision.num_layers * per_layer
        for layer in range(vision.num_layers):
            window = layer in vision.window_layers
            lengths = _attention_lengths(vision, h, w, window)
            total += t * sum(4 * l * l * d for l in lengths)  # QK^T and AV
        if vision.merger:
            m, width = n // vision.merge_unit, d * vision.merge_unit
            total += 2 * m * width * width + 2 * m * width * vision.out_hidden_size
    return total


def encoder_train_flops(vision: VisionConfig, grid_thw: torch.Tensor) -> int:
    return 3 * encoder_forward_flops(vision, grid_thw)
