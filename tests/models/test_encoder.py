"""Single-process behaviour of the FineViT encoder."""

import pytest
import torch

from finevit.config import ParallelConfig, VisionConfig
from finevit.models.vision.build import build_vision_encoder
from finevit.models.vision.flops import encoder_forward_flops, encoder_train_flops
from finevit.models.vision.rope import patch_positions, segment_bounds, window_layout

TINY = VisionConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96, out_hidden_size=48)


@pytest.fixture(scope="module")
def groups(dist, parallel_groups):
    return parallel_groups()


def build(vision, groups):
    torch.manual_seed(0)
    return build_vision_encoder(vision, ParallelConfig(), groups)[0].eval()


@pytest.mark.parametrize("vision", [TINY, VisionConfig(**{**TINY.__dict__, "merger": False}),
                                    VisionConfig(**{**TINY.__dict__, "window_layers": [0], "window_size": 56})],
                         ids=["merger", "hidden", "window"])
def test_packed_images_equal_each_image_alone(groups, vision):
    model = build(vision, groups)
    grids = [[1, 4, 6], [1, 2, 2], [1, 6, 8], [1, 2, 10]]
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(h * w, vision.patch_dim, generator=g) for _, h, w in grids]
    pad = 12  # padding tokens form their own segment and must not leak into real ones
    packed = torch.cat(images + [torch.randn(pad, vision.patch_dim, generator=g)])
    with torch.no_grad():
        out = model(packed, torch.tensor(grids))
        alone = [model(x, torch.tensor([grid])) for x, grid in zip(images, grids)]
    per_token = vision.merge_unit if vision.merger else 1
    start = 0
    for one in alone:
        torch.testing.assert_close(out[start:start + one.shape[0]], one, atol=1e-5, rtol=1e-5)
        start += one.shape[0]
    assert out.shape[0] == (packed.shape[0]) // per_token


def test_token_order_groups_2x2_patches():
    pos = patch_positions(torch.tensor([[1, 2, 4]]), merge=2)
    # first merged token = patches (0,0) (0,1) (1,0) (1,1); then the group to its right
    assert pos.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_segments_include_padding_and_reject_overflow():
    grid = torch.tensor([[1, 2, 2], [1, 4, 2]])
    assert segment_bounds(grid, 16).tolist() == [0, 4, 12, 16]
    assert segment_bounds(grid, 12).tolist() == [0, 4, 12]
    with pytest.raises(ValueError, match="grid_thw describes 12 tokens"):
        segment_bounds(grid, 10)


def test_window_layout_is_a_permutation_of_whole_windows():
    grid = torch.tensor([[1, 6, 10], [1, 2, 2]])  # 3x5 merge groups, windows of 2x2 groups
    order, cu = window_layout(grid, merge=2, window_groups=2, total_tokens=64 + 8)
    assert sorted(order.tolist()) == list(range(72))
    sizes = (cu[1:] - cu[:-1]).tolist()
    # image 1: windows of 2x2, 2x2, 2x1 | 1x2, 1x2, 1x1 merge groups (4 tokens each);
    # image 2: one group; then the 8 padding tokens
    assert sizes == [16, 16, 8, 8, 8, 4, 4, 8]
    # the second window starts at merge group (0, 2) = tokens 8..11 of the raster order
    assert order[16:20].tolist() == [8, 9, 10, 11]


def test_flops_match_hand_count():
    v = VisionConfig(num_layers=1, hidden_size=8, num_heads=2, ffn_hidden_size=16, patch_size=14,
                     temporal_patch_size=1, in_channels=3, out_hidden_size=4)
    grid = torch.tensor([[1, 2, 2]])  # 4 tokens, one merged token
    patch_dim = 3 * 14 * 14
    embed = 2 * 4 * patch_dim * 8
    qkv, proj = 2 * 4 * 8 * 24, 2 * 4 * 8 * 8
    mlp = 2 * 4 * 8 * 32 + 2 * 4 * 16 * 8
    attention = 2 * (2 * 4 * 4 * 8)  # scores and weighted sum over 4x4 pairs, width 8
    merger = 2 * 1 * 32 * 32 + 2 * 1 * 32 * 4
    want = embed + qkv + proj + mlp + attention + merger
    assert encoder_forward_flops(v, grid) == want
    assert encoder_train_flops(v, grid) == 3 * want
    # padding tokens are not model work: flops depend only on the images
    two = torch.tensor([[1, 2, 2], [1, 2, 2]])
    assert encoder_forward_flops(v, two) == 2 * want
