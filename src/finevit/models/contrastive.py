"""Image-text contrastive losses over the data-parallel global batch, without a B x B matrix.

The global batch is the concatenation, in rank order, of every data-parallel rank's pairs:
image i goes with text i. Ranks may hold different numbers of pairs (packing puts a variable
number of images on each rank; a rank may hold none), so the per-rank counts are gathered first.
With x_i, y_j the L2-normalised embeddings, s = exp(t) and B the global number of pairs:

* sigmoid (SigLIP):  L = -(1/B) sum_i sum_j log sigmoid(z_ij (s x_i.y_j + b)),  z_ii = +1, else -1
* softmax (InfoNCE): L = (1/2B) sum_i [lse_j(s x_i.y_j) - s x_i.y_i]      (image -> text)
                               + [lse_j(s x_j.y_i) - s x_i.y_i]      (text -> image)

Work split: rank r owns the rows of its local images (and, for InfoNCE's text->image direction,
its local texts), scores them against the all-gathered other modality, and computes
L_r = (that rows' share of the sum) / B, so that sum_r L_r = L.

Memory: a rank scores its b_local rows against the B gathered columns `chunk_size` columns at a
time and keeps only reductions (a running sum, or a running logsumexp per row). The custom
autograd functions below save just their inputs (and the [b_local] logsumexp) and recompute each
chunk in backward, so peak memory is O(b_local * chunk + B * d): linear in the global batch.
Everything is computed in fp32.

Gradients: the all-gather's backward all-reduces (sums) the [B, d] column gradient over the group
and keeps the local rows, so each rank's embedding gradient is the exact gradient of the global
L; see `ContrastiveLoss` for how that meets megatron DDP's averaging.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from finevit.config import ContrastiveConfig

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def gather_sizes(n: int, device: torch.device, group: Group) -> list[int]:
    """Every rank's local count, in rank order (one tiny all-gather and a host sync)."""
    world = group_size(group)
    if world == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.cat(out).tolist()


class _GatherRows(torch.autograd.Function):
    """[n_r, d] on each rank -> [sum_r n_r, d] in rank order; backward: sum over ranks + slice."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.n = group, sum(sizes[:rank]), x.shape[0]
        # all_gather needs equal shapes: pad every rank to the largest count, then trim.
        padded = x.new_zeros(max(sizes), x.shape[1])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss share depends on every gathered row: the gradient of a row is the sum
        # of all ranks' partial gradients. (A reduce-scatter would move less data but needs equal
        # blocks; gloo has none. All-reduce of [B, d] is small next to the towers' traffic.)
        grad = grad.contiguous().clone()  # all_reduce is in place; never write autograd's buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start: ctx.start + ctx.n], None, None


def gather_rows(x: torch.Tensor, sizes: list[int], group: Group) -> torch.Tensor:
    # Every rank sees the same sizes, so all of them skip (or none does) the collective.
    return x if len(sizes) == 1 or max(sizes) == 0 else _GatherRows.apply(x, sizes, group)


def _chunks(total: int, chunk: int):
    for c0 in range(0, total, chunk):
        yield c0, min(c0 + chunk, total)


def _signed_logits(q, k, scale, bias, diag: int):
    """dot [b, c] and the logits s*dot + b with the positive pairs negated, so that each pair's
    sigmoid loss is softplus(signed). Row i's positive is column diag + i (if inside the chunk)."""
    dot = q @ k.T
    signed = scale * dot + bias
    # The rows whose positive falls in this chunk, from host ints: index lists rather than a
    # [b, c] mask, and no device-to-host sync (a boolean mask select would need one).
    lo, hi = max(0, -diag), min(q.shape[0], k.shape[0] - diag)
    rows = torch.arange(lo, max(lo, hi), device=q.device)
    cols = rows + diag
    signed[rows, cols] = -signed[rows, cols]
    return dot, signed, rows, cols


class _SigmoidPairSum(torch.autograd.Function):
    """sum over local rows i and all columns j of -log sigmoid(z_ij (exp(t) q_i.k_j + b)).

    q: [b, d] local rows whose positives are columns offset..offset+b of keys: [B, d].
    """

    @staticmethod
    def forward(ctx, q, keys, t, bias, offset, chunk):
        scale = t.exp()
        total = q.new_zeros(())
        for c0, c1 in _chunks(keys.shape[0], chunk):
            _, signed, _, _ = _signed_logits(q, keys[c0:c1], scale, bias, offset - c0)
            total = total + F.softplus(signed).sum()
        ctx.save_for_backward(q, keys, t, bias)
        ctx.offset, ctx.chunk = offset, chunk
        return total

    @staticmethod
    def backward(ctx, grad_out):
        q, keys, t, bias = ctx.saved_tensors
        scale = t.exp()
        dq, dkeys = torch.zeros_like(q), torch.zeros_like(keys)
        dt, db = torch.zeros_like(t), torch.zeros_like(bias)
        for c0, c1 in _chunks(keys.shape[0], ctx.chunk):
            k = keys[c0:c1]
            dot, signed, rows, cols = _signed_logits(q, k, scale, bias, ctx.offset - c0)
            # d softplus(signed) / d logit = sigmoid(signed), sign flipped for the positives.
            g = torch.sigmoid(signed)
            g[rows, cols] = -g[rows, cols]
            g = g * grad_out  # [b, c]
            dq += scale * (g @ k)
            dkeys[c0:c1] = scale * (g.T @ q)
            dt += scale * (g * dot).sum()
            db += g.sum()
        return dq, dkeys, dt, db, None, None


class _LogSumExpSum(torch.autograd.Function):
    """sum over local rows i of logsumexp_j(exp(t) q_i.k_j), the InfoNCE normaliser.

    The logsumexp is accumulated online over column chunks; backward recomputes each chunk's
    softmax from the saved per-row logsumexp.
    """

    @staticmethod
    def forward(ctx, q, keys, t, chunk):
        scale = t.exp()
        lse = q.new_full((q.shape[0],), -math.inf)  # [b]
        for c0, c1 in _chunks(keys.shape[0], chunk):
            lse = torch.logaddexp(lse, (scale * (q @ keys[c0:c1].T)).logsumexp(-1))
        ctx.save_for_backward(q, keys, t, lse)
        ctx.chunk = chunk
        return lse.sum()

    @staticmethod
    def backward(ctx, grad_out):
        q, keys, t, lse = ctx.saved_tensors
        scale = t.exp()
        dq, dkeys, dt = torch.zeros_like(q), torch.zeros_like(keys), torch.zeros_like(t)
        for c0, c1 in _chunks(keys.shape[0], ctx.chunk):
            k = keys[c0:c1]
            dot = q @ k.T  # [b, c]
            p = torch.exp(scale * dot - lse[:, None]) * grad_out  # softmax rows, chunk slice
            dq += scale * (p @ k)
            dkeys[c0:c1] = scale * (p.T @ q)
            dt += scale * (p * dot).sum()
        return dq, dkeys, dt, None


class ContrastiveOutput(NamedTuple):
    loss: torch.Tensor  # backpropagate this: see ContrastiveLoss for its scaling
    value: torch.Tensor  # detached global loss L, identical on every rank: log this
    num_pairs: int  # B, the global number of pairs


class ContrastiveLoss(torch.nn.Module):
    """SigLIP sigmoid or InfoNCE softmax loss over the data-parallel global batch.

    Parameters: `logit_scale` t (logits use exp(t)) and, for the sigmoid loss only, `logit_bias`
    b. They are replicated on every data-parallel rank like any other weight.

    forward(image_emb [b_local, d], text_emb [b_local, d], group) -> ContrastiveOutput, with
    `group` the data-parallel group the trainer's DDP reduces gradients over (None or size 1:
    single process). Every rank of `group` must call it (it runs collectives), also with b_local=0.

    Gradient convention. Rank r computes L_r (its rows' share, sum_r L_r = L) and the gather's
    backward sums over ranks, so after backward(L_r):
      * each rank's embedding gradient is exactly dL/d(its embeddings);
      * each rank's weight gradients (towers, t, b) are its *contribution*; the dense gradient
        dL/dw is their SUM over the group.
    megatron's DDP instead AVERAGES over dp (it scales by 1/dp before a sum, or averages in the
    collective, unless TransformerConfig.calculate_per_token_loss). So with the default
    grad_reduction="mean" the returned `loss` is |group| * L_r: after DDP's average every weight
    gradient equals the dense dL/dw, and embedding gradients are |group| * dL/d(embedding).
    With grad_reduction="sum" (a trainer that sums gradients over dp) `loss` is L_r.
    Megatron's schedules then divide the loss by the number of micro-batches, i.e. the step
    gradient is the mean over micro-batches of each micro-batch's global-batch loss.
    """

    def __init__(self, config: ContrastiveConfig, grad_reduction: str = "mean"):
        super().__init__()
        if config.loss not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown contrastive loss '{config.loss}' (sigmoid | softmax)")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got '{grad_reduction}'")
        self.kind, self.chunk_size = config.loss, config.chunk_size
        self.grad_reduction = grad_reduction
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        # InfoNCE has no bias; not creating it keeps DDP free of a parameter without gradient.
        self.logit_bias = (torch.nn.Parameter(torch.tensor(float(config.init_logit_bias)))
                           if self.kind == "sigmoid" else None)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                group: Group = None) -> ContrastiveOutput:
        if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
            raise ValueError(f"expected paired [b, d] embeddings, got {tuple(image_emb.shape)} "
                             f"and {tuple(text_emb.shape)}")
        world = group_size(group)
        sizes = gather_sizes(image_emb.shape[0], image_emb.device, group)
        offset = sum(sizes[: dist.get_rank(group)]) if world > 1 else 0
        total = sum(sizes)
        x = F.normalize(image_emb.float(), dim=-1)  # [b, d]
        y = F.normalize(text_emb.float(), dim=-1)  # [b, d]
        t = self.logit_scale.float()
        all_y = gather_rows(y, sizes, group)  # [B, d]
        if self.kind == "sigmoid":
            share = _SigmoidPairSum.apply(x, all_y, t, self.logit_bias.float(), offset,
                                          self.chunk_size)
        else:
            all_x = gather_rows(x, sizes, group)  # [B, d]
            positives = t.exp() * (x * y).sum()  # the diagonal, O(b d) through plain autograd
            share = 0.5 * (_LogSumExpSum.apply(x, all_y, t, self.chunk_size)
                           + _LogSumExpSum.apply(y, all_x, t, self.chunk_size)) - positives
        local = share / max(total, 1)  # B = 0 (nobody holds a pair): loss 0, zero gradients
        value = local.detach().clone()
        if world > 1:
            dist.all_reduce(value, group=group)
        scale = world if self.grad_reduction == "mean" else 1
        return ContrastiveOutput(local * scale, value, total)
