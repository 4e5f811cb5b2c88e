"""SigLIP's multihead attention-pooling (MAP) head over packed images, and the vision head.

MAP: one learned probe query attends, per head, over the tokens of ONE image; the attended vector
goes through out-projection, then x + MLP(LayerNorm(x)). Here the images are packed into one
sequence [S, d] (real tokens first, `cu_seqlens` [n+1] marking each image, padding after
cu_seqlens[-1]), and the head is computed for all images at once, without a loop over images:

* one query, so its key projection folds into the weights: score_th = q_h . (W_k h_t + b_k)_h
  = h_t . (W_kh^T q_h) + q_h . b_kh. The second term is constant per head and cancels in the
  softmax, so scores are a single [S, d] x [d, heads] matmul and no [S, d] keys exist;
* the softmax is per segment: segment ids from searchsorted on cu_seqlens, the per-segment max by
  scatter_reduce, exp-sums and weighted value sums by index_add into [n + 1] buckets (the last
  bucket collects the padding and is dropped).

Why segments and not padding to [n, L_max] with a mask: native-resolution images range from tens
to many thousands of tokens, so [n, L_max] can be many times the real token count, and needs the
host to know L_max. The segment form costs O(S d) memory, like one linear layer, keeps shapes
static (no host sync) and padding rows (zeroed first) cannot reach any real image's output,
not even through NaN.

Parameter names follow HF's SiglipMultiheadAttentionPoolingHead (probe, attention.in_proj_*,
attention.out_proj, layernorm, mlp.fc1/fc2), which keeps checkpoint conversion a rename.
Plain torch modules: the head is small and replicated on every tensor-parallel rank.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from finevit.config import ContrastiveConfig


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's tanh GELU


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[S] image index of each token; tokens at or past cu_seqlens[-1] (padding) get n."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


class AttentionPool(nn.Module):
    """[S, d] packed tokens + cu_seqlens [n+1] -> [n, d], one pooled vector per image."""

    def __init__(self, width: int, num_heads: int, mlp_dim: Optional[int] = None,
                 eps: float = 1e-6):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"pooling width {width} is not divisible by {num_heads} heads")
        self.width, self.num_heads = width, num_heads
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        # Used as the weight container (and, in tests, as the unpacked reference).
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = _MLP(width, mlp_dim or 4 * width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # big_vision's MAPHead: xavier-uniform probe of shape (1, 1, d), i.e. variance 2/(1+d);
        # drawn normal with that variance. Attention and MLP kernels xavier-uniform, biases ~0.
        nn.init.normal_(self.probe, std=math.sqrt(2.0 / (1 + self.width)))
        nn.init.xavier_uniform_(self.attention.in_proj_weight)
        nn.init.zeros_(self.attention.in_proj_bias)
        for linear in (self.attention.out_proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(self.attention.out_proj.bias)
        for linear in (self.mlp.fc1, self.mlp.fc2):
            nn.init.normal_(linear.bias, std=1e-6)

    def attend(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The probe's multi-head attention, per image: [S, d] -> [n, d] (before out_proj)."""
        S, d = hidden.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        n = cu_seqlens.numel() - 1
        cu_seqlens = cu_seqlens.to(hidden.device)
        seg = segment_ids(cu_seqlens, S)  # [S] in 0..n
        # Zero the padding rows: finite scores, and no NaN from garbage can reach the weight
        # gradients (torch.where passes no gradient to, and reads no values of, the other side).
        hidden = torch.where((seg < n)[:, None], hidden, torch.zeros((), dtype=hidden.dtype,
                                                                     device=hidden.device))
        w_q, w_k, w_v = self.attention.in_proj_weight.chunk(3)  # [d, d] each
        b_q, _, b_v = self.attention.in_proj_bias.chunk(3)
        q = (F.linear(self.probe.reshape(1, d), w_q, b_q) * head_dim**-0.5).view(heads, head_dim)
        fold = torch.einsum("he,hek->hk", q, w_k.view(heads, head_dim, d))  # [heads, d]
        scores = (hidden @ fold.T).float()  # [S, heads]; the key bias term cancels (see above)

        idx = seg[:, None].expand(S, heads)
        peak = scores.new_full((n + 1, heads), -math.inf).scatter_reduce(
            0, idx, scores.detach(), "amax")  # softmax is shift-invariant: no gradient needed
        weight = torch.exp(scores - peak[seg])  # [S, heads], each <= 1
        denom = scores.new_zeros(n + 1, heads).index_add(0, seg, weight)
        values = F.linear(hidden, w_v, b_v).view(S, heads, head_dim).float()
        num = scores.new_zeros(n + 1, heads, head_dim).index_add(0, seg, weight[..., None] * values)
        # An image with no tokens (never produced by packing) would pool to 0 instead of NaN.
        pooled = num[:n] / denom[:n, :, None].clamp_min(torch.finfo(denom.dtype).tiny)
        return pooled.reshape(n, d).to(hidden.dtype)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = self.attention.out_proj(self.attend(hidden, cu_seqlens))  # [n, d]
        return x + self.mlp(self.layernorm(x))


class VisionHead(nn.Module):
    """LayerNorm, MAP pooling of each packed image, then a linear projection to the shared
    embedding. The norm is SigLIP's post-encoder LayerNorm: the Qwen2.5-VL-style encoder has no
    final norm (its merger brings one), and pooling raw residual-stream states lets their scale
    drift without bound."""

    def __init__(self, width: int, config: ContrastiveConfig, mlp_dim: Optional[int] = None,
                 eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.pool = AttentionPool(width, config.pool_heads, mlp_dim, eps)
        self.proj = nn.Linear(width, config.embed_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden [S, width], cu_seqlens [n+1] over real tokens -> [n, embed_dim]."""
        return self.proj(self.pool(self.norm(hidden), cu_seqlens))
