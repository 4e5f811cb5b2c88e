"""M-RoPE positions of a packed VLM row, as Hugging Face's Qwen2.5-VL `get_rope_index` computes
them for each sample on its own.

Within a sample, a text token takes the next position p in all three of (t, h, w); an image's
N = t x h' x w' tokens (h' = h / 2, w' = w / 2 after the 2x2 merge) take (p + 0, p + row, p + col):
a still image has one temporal index, 0 (Qwen2.5-VL scales it by seconds per frame, which is 0
for images). The token after the image continues at the image's largest position + 1. Positions
restart at 0 in every sample, and padding counts as a sample of text.
"""

import torch


def mrope_positions(image_mask: torch.Tensor, cu_seqlens: torch.Tensor, merged_grids: torch.Tensor) -> torch.Tensor:
    """image_mask [s] bool (True on image-placeholder tokens); cu_seqlens [n + 1] sample bounds;
    merged_grids [m, 3] (t, h', w') of the row's images in order -> positions [3, 1, s] int64.

    Each image's placeholders must be one contiguous run of exactly t * h' * w' tokens."""
    s = image_mask.shape[0]
    pos = torch.empty(3, s, dtype=torch.int64)
    is_image = image_mask.tolist()
    grids = merged_grids.tolist()
    image = 0
    for start, end in zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]):
        i, p = start, 0
        while i < end:
            if not is_image[i]:
                pos[:, i] = p
                i, p = i + 1, p + 1
                continue
            t, h, w = grids[image]
            n = t * h * w
            if i + n > end or not all(is_image[i:i + n]):
                raise ValueError(f"image {image} ({t}x{h}x{w} = {n} tokens) does not fill its placeholder run at {i}")
            # [n] -> (frame, row, column) of each token, raster order within a frame
            idx = torch.arange(n)
            pos[0, i:i + n] = p  # still images: one temporal index
            pos[1, i:i + n] = p + (idx % (h * w)) // w
            pos[2, i:i + n] = p + idx % w
            p = int(pos[:, i:i + n].max()) + 1
            i, image = i + n, image + 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} images given, {image} placeholder runs found")
    return pos.unsqueeze(1)  # [3, s] -> [3, 1, s]
