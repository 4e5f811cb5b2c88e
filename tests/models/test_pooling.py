"""The packed attention-pooling head against torch's MultiheadAttention run on each image alone."""

import pytest
import torch

from finevit.config import ContrastiveConfig
from finevit.models.pooling import AttentionPool, VisionHead, segment_ids

WIDTH, HEADS = 32, 4
LENGTHS = [5, 1, 12, 7]  # tokens per image
PAD = 6
ATOL = 1e-5


def packed(seed=0, pad_value=0.0):
    g = torch.Generator().manual_seed(seed)
    real = sum(LENGTHS)
    hidden = torch.full((real + PAD, WIDTH), pad_value)
    hidden[:real] = torch.randn(real, WIDTH, generator=g)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    return hidden, cu


def pool_alone(pool: AttentionPool, image: torch.Tensor) -> torch.Tensor:
    """The MAP head as written for one unpacked image: [L, d] -> [d]."""
    probe = pool.probe.expand(1, 1, WIDTH)
    x, _ = pool.attention(probe, image[None], image[None], need_weights=False)
    x = x + pool.mlp(pool.layernorm(x))
    return x[0, 0]


@pytest.fixture
def pool():
    torch.manual_seed(0)
    module = AttentionPool(WIDTH, HEADS)
    with torch.no_grad():  # non-zero biases, so that every term of the projections is tested
        for p in (module.attention.in_proj_bias, module.attention.out_proj.bias):
            p.normal_(std=0.5)
    return module


def test_segment_ids():
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert segment_ids(cu, 7).tolist() == [0, 0, 2, 2, 2, 3, 3]


def test_packed_equals_each_image_alone(pool):
    hidden, cu = packed()
    out = pool(hidden, cu)
    assert out.shape == (len(LENGTHS), WIDTH)
    bounds = cu.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        torch.testing.assert_close(out[i], pool_alone(pool, hidden[s:e]), atol=ATOL, rtol=0)


def test_padding_does_not_matter(pool):
    hidden, cu = packed()
    clean = pool(hidden, cu)
    garbage = hidden.clone()
    garbage[sum(LENGTHS):] = torch.randn(PAD, WIDTH) * 1e3
    garbage[-1, 0] = float("nan")
    torch.testing.assert_close(pool(garbage, cu), clean, atol=0, rtol=0)
    # No padding at all gives the same result too.
    torch.testing.assert_close(pool(hidden[: sum(LENGTHS)], cu), clean, atol=ATOL, rtol=0)

    # Gradients stay finite and padding rows get none, whatever they hold.
    garbage.requires_grad_()
    pool(garbage, cu).sum().backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[sum(LENGTHS):] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_gradients_flow_and_match(pool):
    hidden, cu = packed()
    hidden.requires_grad_()
    pool(hidden, cu).square().sum().backward()
    got = {n: p.grad.clone() for n, p in pool.named_parameters()}
    got_hidden = hidden.grad.clone()
    # Every parameter except the key bias (it cancels in the softmax) receives gradient.
    for name, g in got.items():
        assert g.abs().sum() > 0, name

    pool.zero_grad()
    ref_hidden = hidden.detach().clone().requires_grad_()
    bounds = cu.tolist()
    ref = torch.stack([pool_alone(pool, ref_hidden[s:e])
                       for s, e in zip(bounds[:-1], bounds[1:])])
    ref.square().sum().backward()
    torch.testing.assert_close(got_hidden, ref_hidden.grad, atol=ATOL, rtol=0)
    for name, p in pool.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=ATOL, rtol=ATOL, msg=name)


def test_vision_head_shapes():
    torch.manual_seed(0)
    head = VisionHead(WIDTH, ContrastiveConfig(embed_dim=24, pool_heads=HEADS))
    hidden, cu = packed()
    assert head(hidden, cu).shape == (len(LENGTHS), 24)
    with pytest.raises(ValueError, match="divisible"):
        AttentionPool(WIDTH, 5)
