"""Multi-rank: the distributed contrastive losses equal the dense loss on the same global batch.

Run through tests/parallel/test_multirank.py (4 gloo ranks). Each group of ranks (two 2-rank
groups side by side, then all 4) splits one global batch unevenly between its ranks, one rank
possibly empty. Embeddings come from tiny linear "towers" replicated on every rank; megatron
DDP's gradient averaging over the group is simulated, and every rank compares its loss, its
embedding gradients and the averaged weight, t and b gradients with a dense single-process
reference (materialised B x B logits) computed on the whole global batch.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from finevit.config import ContrastiveConfig
from finevit.models.contrastive import ContrastiveLoss

FEAT, DIM = 6, 8
ATOL = 1e-5
# Per-rank pair counts of each layout (group ranks in order); they differ, and some are 0.
LAYOUTS = {2: ([4, 1], [0, 3]), 4: ([3, 5, 0, 2],)}


@pytest.fixture(scope="module")
def groups(dist):
    """{2: this rank's 2-rank group, 4: the 4-rank group} with each group's index."""
    if dist.get_world_size() != 4:
        pytest.skip("needs the 4-rank launch of tests/parallel/test_multirank.py")
    rank = dist.get_rank()
    # new_group is collective: every rank creates every group, in the same order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    world = dist.new_group([0, 1, 2, 3])
    return {2: (pairs[rank // 2], rank // 2), 4: (world, 0)}


def dense_loss(img, txt, t, b, kind):
    x, y = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = t.exp() * x @ y.T
    if kind == "sigmoid":
        z = 2 * torch.eye(len(x)) - 1
        return -F.logsigmoid(z * (logits + b)).sum() / len(x)
    labels = torch.arange(len(x))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class Towers(torch.nn.Module):
    """Stand-ins for the two encoders: replicated weights, as under DDP."""

    def __init__(self, kind):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = torch.nn.Parameter(torch.randn(FEAT, DIM, generator=g))
        self.text = torch.nn.Parameter(torch.randn(FEAT, DIM, generator=g))
        self.loss = ContrastiveLoss(ContrastiveConfig(loss=kind, chunk_size=3))
        with torch.no_grad():  # trained-looking values, so every term matters
            self.loss.logit_scale.fill_(math.log(16.0))
            if self.loss.logit_bias is not None:
                self.loss.logit_bias.fill_(-8.0)


def global_batch(total, seed):
    g = torch.Generator().manual_seed(seed)
    img_in, txt_in = torch.randn(total, FEAT, generator=g), torch.randn(total, FEAT, generator=g)
    txt_in[: total // 2] += img_in[: total // 2]  # some pairs agree
    return img_in, txt_in


def check_layout(dist, group, index, sizes, kind):
    rank = dist.get_rank(group)
    world = len(sizes)
    start, n = sum(sizes[:rank]), sizes[rank]
    img_in, txt_in = global_batch(sum(sizes), seed=10 * world + index)

    # Distributed: this rank's rows only.
    model = Towers(kind)
    img = (img_in[start:start + n] @ model.image).requires_grad_()
    txt = (txt_in[start:start + n] @ model.text)
    img.retain_grad(), txt.retain_grad()
    out = model.loss(img, txt, group)
    out.loss.backward()
    for p in model.parameters():  # megatron DDP: sum over the group, then divide by its size
        dist.all_reduce(p.grad, group=group)
        p.grad /= world

    # Dense reference on the whole global batch.
    ref = Towers(kind)
    ref_img, ref_txt = img_in @ ref.image, txt_in @ ref.text
    ref_img.retain_grad(), ref_txt.retain_grad()
    bias = ref.loss.logit_bias if kind == "sigmoid" else None
    loss = dense_loss(ref_img, ref_txt, ref.loss.logit_scale, bias, kind)
    loss.backward()

    assert out.num_pairs == sum(sizes)
    torch.testing.assert_close(out.value, loss.detach(), atol=ATOL, rtol=0)
    # Embedding gradients are the dense ones times the group size (the "mean" convention).
    rows = slice(start, start + n)
    torch.testing.assert_close(img.grad / world, ref_img.grad[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(txt.grad / world, ref_txt.grad[rows], atol=ATOL, rtol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=0, msg=name)


def test_sigmoid_matches_dense(dist, groups):
    for world, layouts in LAYOUTS.items():
        group, index = groups[world]
        check_layout(dist, group, index, layouts[index], "sigmoid")


def test_softmax_matches_dense(dist, groups):
    for world, layouts in LAYOUTS.items():
        group, index = groups[world]
        check_layout(dist, group, index, layouts[index], "softmax")


def test_sum_reduction_and_empty_global_batch(dist, groups):
    group, _ = groups[4]
    world = dist.get_world_size(group)
    # grad_reduction="sum": the loss is the rank's share; the shares add up to the global loss.
    torch.manual_seed(0)  # same weights everywhere
    module = ContrastiveLoss(ContrastiveConfig(chunk_size=2), grad_reduction="sum")
    sizes = [2, 0, 3, 1]
    img_all, txt_all = global_batch(sum(sizes), seed=7)
    rank = dist.get_rank(group)
    start, n = sum(sizes[:rank]), sizes[rank]
    out = module(img_all[start:start + n], txt_all[start:start + n], group)
    total = out.loss.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, out.value, atol=ATOL, rtol=0)

    # No rank holds a pair: the loss is 0 and backward runs (and agrees) on every rank.
    empty = torch.zeros(0, FEAT, requires_grad=True)
    out = module(empty, empty, group)
    out.loss.backward()
    assert out.value.item() == 0 and out.num_pairs == 0 and world == 4
    assert module.logit_scale.grad.item() == 0 and module.logit_bias.grad.item() == 0
