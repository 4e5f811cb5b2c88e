"""Token layout of a packed image sequence: patch coordinates, 2D rotary frequencies, windows.

Token order is Qwen2.5-VL's: patches are visited 2x2 merge-group by merge-group, groups in
raster order, so the merger's four inputs are always four consecutive tokens. Every function
here takes `grid_thw` ([n_images, 3] of (frames, rows, cols) in patches) and follows that order.
"""

import torch


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every token, [N, 2]."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).unsqueeze(1).expand(h, w)
        cols = torch.arange(w).unsqueeze(0).expand(h, w)
        # [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m]: merge groups become contiguous.
        pos = [x.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
               for x in (rows, cols)]
        out.append(torch.stack(pos, dim=-1).repeat(t, 1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def rotary_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Per-token rotary angles [N, 1, 1, head_dim] for megatron's non-interleaved RoPE.

    Half of the rotated pairs encode the row and half the column: angles are
    [row * inv_freq, col * inv_freq] (head_dim / 2 values), duplicated for the rotate-half form.
    """
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # [N, 2, head_dim/4]
    angles = angles.flatten(1)  # [N, head_dim/2]: rows' angles then columns'
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def segment_bounds(grid_thw: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """cu_seqlens over all tokens: one segment per frame of each image (as Qwen2.5-VL), plus a
    final segment of padding tokens, which then attend only among themselves."""
    lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    used = sum(lengths)
    if used > total_tokens:
        raise ValueError(f"grid_thw describes {used} tokens but the sequence holds {total_tokens}")
    if used < total_tokens:
        lengths.append(total_tokens - used)
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def window_layout(grid_thw: torch.Tensor, merge: int, window_groups: int,
                  total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder tokens so each attention window is contiguous.

    A window is `window_groups` x `window_groups` merge groups (window_size / patch / merge).
    Returns (order [total_tokens]: new position -> old token index, window cu_seqlens). Windows
    stay inside their image, merge groups stay whole, padding tokens stay last.
    """
    unit = merge * merge
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        for _ in range(t):
            groups = torch.arange(gh * gw).reshape(gh, gw)
            for r0 in range(0, gh, window_groups):
                for c0 in range(0, gw, window_groups):
                    win = groups[r0:r0 + window_groups, c0:c0 + window_groups].flatten()
                    # each merge group index -> its `unit` consecutive tokens
                    tokens = (win.unsqueeze(1) * unit + torch.arange(unit)).flatten()
                    order.append(tokens + offset)
                    lengths.append(tokens.numel())
            offset += gh * gw * unit
    if offset < total_tokens:
        order.append(torch.arange(offset, total_tokens))
        lengths.append(total_tokens - offset)
    order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    return order, torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
