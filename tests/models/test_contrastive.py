"""The chunked contrastive losses (single process) against plain dense references."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from finevit.config import ContrastiveConfig
from finevit.models.contrastive import ContrastiveLoss

ATOL = 1e-5


def dense_sigmoid(img, txt, t, b):
    """SigLIP as written in the paper: the full B x B logits."""
    x, y = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = t.exp() * x @ y.T + b
    z = 2 * torch.eye(len(x)) - 1
    return -F.logsigmoid(z * logits).sum() / len(x)


def dense_softmax(img, txt, t):
    x, y = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = t.exp() * x @ y.T
    labels = torch.arange(len(x))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def make_batch(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    # Make some pairs agree so that positives are not just noise.
    txt[: n // 2] += 2 * img[: n // 2]
    return img.requires_grad_(), txt.requires_grad_()


def loss_module(kind, chunk, t=None, b=None):
    module = ContrastiveLoss(ContrastiveConfig(loss=kind, chunk_size=chunk))
    with torch.no_grad():
        if t is not None:
            module.logit_scale.fill_(t)
        if b is not None and module.logit_bias is not None:
            module.logit_bias.fill_(b)
    return module


def test_init_values():
    sig = ContrastiveLoss(ContrastiveConfig(loss="sigmoid"))
    assert sig.logit_scale.item() == pytest.approx(math.log(10))
    assert sig.logit_bias.item() == pytest.approx(-10.0)
    soft = ContrastiveLoss(ContrastiveConfig(loss="softmax"))
    assert soft.logit_scale.item() == pytest.approx(math.log(10))
    assert soft.logit_bias is None  # InfoNCE has no bias


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 13, 64])  # < B, B % chunk != 0, == B (13), > B
def test_matches_dense(kind, chunk):
    B, d = 13, 8
    img, txt = make_batch(B, d)
    # A trained-looking temperature / bias, so the logits span a realistic range.
    module = loss_module(kind, chunk, t=math.log(16.0), b=-8.0)
    out = module(img, txt)
    out.loss.backward()
    got = (img.grad.clone(), txt.grad.clone(), module.logit_scale.grad.clone())
    if kind == "sigmoid":
        got += (module.logit_bias.grad.clone(),)

    ref_img, ref_txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    t = module.logit_scale.detach().clone().requires_grad_()
    if kind == "sigmoid":
        b = module.logit_bias.detach().clone().requires_grad_()
        ref = dense_sigmoid(ref_img, ref_txt, t, b)
        ref.backward()
        want = (ref_img.grad, ref_txt.grad, t.grad, b.grad)
    else:
        ref = dense_softmax(ref_img, ref_txt, t)
        ref.backward()
        want = (ref_img.grad, ref_txt.grad, t.grad)

    assert out.num_pairs == B
    torch.testing.assert_close(out.value, ref.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss.detach(), ref.detach(), atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_default_init_matches_dense():
    """At SigLIP's init (t = log 10, b = -10) the loss is dominated by the bias."""
    img, txt = make_batch(10, 6, seed=1)
    module = ContrastiveLoss(ContrastiveConfig(loss="sigmoid", chunk_size=3))
    out = module(img, txt)
    ref = dense_sigmoid(img, txt, module.logit_scale.detach(), module.logit_bias.detach())
    torch.testing.assert_close(out.value, ref.detach(), atol=ATOL, rtol=0)


def test_bf16_inputs_are_computed_in_fp32():
    img, txt = make_batch(6, 4, seed=2)
    module = loss_module("sigmoid", 4)
    out = module(img.detach().bfloat16(), txt.detach().bfloat16())
    assert out.loss.dtype == torch.float32
    ref = dense_sigmoid(img.detach().bfloat16().float(), txt.detach().bfloat16().float(),
                        module.logit_scale.detach(), module.logit_bias.detach())
    torch.testing.assert_close(out.value, ref, atol=ATOL, rtol=0)


def test_empty_batch():
    module = loss_module("softmax", 4)
    img, txt = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4, requires_grad=True)
    out = module(img, txt)
    out.loss.backward()
    assert out.value.item() == 0 and out.num_pairs == 0
    assert module.logit_scale.grad.item() == 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward): a memory check
    that needs no allocator statistics and no clock."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_no_global_logits(kind):
    B, d, chunk = 96, 8, 16
    img, txt = make_batch(B, d)
    module = loss_module(kind, chunk)
    with LargestTensor() as probe:
        module(img, txt).loss.backward()
    # Largest allowed: a [b_local, chunk] chunk or a [B, d] embedding matrix (here b_local = B).
    assert probe.numel <= max(B * chunk, B * d) < B * B, probe.numel

    # The probe does see a B x B matrix when one exists.
    with LargestTensor() as dense_probe:
        dense_sigmoid(img, txt, module.logit_scale, torch.tensor(-10.0)).backward()
    assert dense_probe.numel >= B * B


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        ContrastiveLoss(dataclasses.replace(ContrastiveConfig(), loss="hinge"))
    with pytest.raises(ValueError, match="grad_reduction"):
        ContrastiveLoss(ContrastiveConfig(), grad_reduction="avg")
