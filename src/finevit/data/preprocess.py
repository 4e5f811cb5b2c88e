"""Native-resolution preprocessing: smart resize, normalisation, patchify in Qwen2.5-VL token order.

An image of H x W pixels is resized (aspect ratio kept, both sides multiples of
patch_size * merge_size = 28, pixel count within [min_pixels, max_pixels], Qwen2-VL's
`smart_resize` rule), normalised with the CLIP mean / std, and cut into 14 x 14 patches:

    grid (t, h, w) = (1, H'/14, W'/14)
    pixel_values [h * w, C * T * 14 * 14]   (T = temporal_patch_size: the still image repeated)

Rows are ordered (h/2, w/2, 2, 2): each 2x2 group the merger fuses is 4 consecutive rows, groups
in raster order; each row is flattened in (C, T, 14, 14) order. This equals
`transformers.Qwen2VLImageProcessor(...)(images)["pixel_values"]` (tests/data/test_preprocess.py
checks it), so a converted Qwen2.5-VL checkpoint sees what it was trained on.

Region boxes follow the image: scaled to the resized pixel grid, mirrored under a flip.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from finevit.config.data import AugmentConfig
from finevit.data.schema import RecordError, load_pixels, open_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(H', W'): multiples of `factor`, close to the aspect ratio, pixels in [min, max].

    The same arithmetic as Qwen2-VL's smart_resize (including Python's round-half-even), so the
    resize targets agree with the Hugging Face processor to the pixel.
    """
    if max(height, width) / min(height, width) > 200:
        raise RecordError("aspect", f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class PatchSpec:
    """The encoder's patch geometry (model.vision's patch_size / temporal_patch_size / merge)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    in_channels: int = 3

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.merge_size ** 2

    @classmethod
    def from_vision(cls, vision) -> "PatchSpec":
        return cls(vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size, vision.in_channels)


_SCALE = torch.tensor([1 / (255.0 * s) for s in CLIP_STD], dtype=torch.float32)
_SHIFT = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=torch.float32)


def patchify(rgb: np.ndarray, spec: PatchSpec = PatchSpec()) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [H, W, 3] (sides multiples of spec.factor) -> (pixel_values, (1, h, w)); see module doc."""
    H, W, C = rgb.shape
    p, m, T = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if H % spec.factor or W % spec.factor or C != spec.in_channels:
        raise ValueError(f"patchify needs [H, W, {spec.in_channels}] with sides multiples of {spec.factor}, got {rgb.shape}")
    h, w = H // p, W // p
    # Reorder while still uint8 (the permuted copy moves a quarter of the bytes it would in
    # float32), then normalise the contiguous result into the output in one pass.
    # PIL's arrays are read-only and torch warns about wrapping those; the uint8 copy is cheap.
    rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb, order="C")
    x = torch.from_numpy(rgb).view(h // m, m, p, w // m, m, p, C)  # [h/2, 2, 14, w/2, 2, 14, C]
    x = x.permute(0, 3, 1, 4, 6, 2, 5).reshape(h * w, C, 1, p * p)  # [h*w, C, 1, 14*14]
    out = torch.empty(h * w, C, T, p * p)
    first = out[:, :, :1]
    torch.mul(x, _SCALE.view(1, C, 1, 1), out=first)  # (x / 255 - mean) / std as x * a - b
    first -= _SHIFT.view(1, C, 1, 1)
    out[:, :, 1:] = first  # the still image is every one of the T frames
    return out.view(h * w, spec.patch_dim), (1, h, w)


@dataclass
class Processed:
    pixel_values: torch.Tensor  # [h*w, patch_dim] float32
    grid_thw: tuple  # (1, h, w)
    size: tuple  # resized (height, width) in pixels
    boxes: torch.Tensor  # [n_regions, 4] float32, resized-pixel edge coordinates
    flipped: bool = False


class Preprocessor:
    """Encoded image bytes (+ boxes) -> Processed; cheap to pickle into DataLoader workers."""

    def __init__(self, spec: PatchSpec = PatchSpec(), min_pixels: int = 336 * 336,
                 max_pixels: int = 448 * 448, jpeg_draft: bool = True,
                 augment: Optional[AugmentConfig] = None):
        self.spec, self.min_pixels, self.max_pixels = spec, min_pixels, max_pixels
        self.jpeg_draft = jpeg_draft
        self.augment = augment or AugmentConfig()

    def target_size(self, height: int, width: int, rng: Optional[np.random.Generator] = None) -> tuple[int, int]:
        lo, hi = self.min_pixels, self.max_pixels
        if self.augment.scale_jitter and rng is not None:
            lo = hi = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return smart_resize(height, width, self.spec.factor, lo, hi)

    def resize(self, img: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """Decoded, RGB, bicubic-resized to size = (H', W'), as uint8 [H', W', 3]."""
        th, tw = size
        if self.jpeg_draft and img.format == "JPEG" and img.width >= 2 * tw and img.height >= 2 * th:
            img.draft("RGB", (tw, th))  # DCT-domain downscale by 2/4/8, staying >= the target
        img = load_pixels(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.BICUBIC)
        return np.asarray(img)

    def __call__(self, data: bytes, boxes: Optional[np.ndarray] = None,
                 rng: Optional[np.random.Generator] = None,
                 expect_size: Optional[tuple[int, int]] = None) -> Processed:
        """`boxes` [n, 4] in source pixels; `expect_size` (width, height) the record states."""
        img = open_image(data)
        W, H = img.size
        if expect_size is not None and tuple(expect_size) != (W, H):
            raise RecordError("size_mismatch", f"record says {expect_size[0]}x{expect_size[1]}, image is {W}x{H}")
        size = self.target_size(H, W, rng)
        rgb = self.resize(img, size)
        flip = bool(rng is not None and self.augment.hflip_prob > 0 and rng.random() < self.augment.hflip_prob)
        if flip:
            rgb = rgb[:, ::-1]
        out = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
        out = out * np.array([size[1] / W, size[0] / H] * 2, np.float32)
        if flip:
            out = np.stack([size[1] - out[:, 2], out[:, 1], size[1] - out[:, 0], out[:, 3]], axis=1)
        pixel_values, grid = patchify(rgb, self.spec)
        return Processed(pixel_values, grid, size, torch.from_numpy(np.ascontiguousarray(out)), flip)
