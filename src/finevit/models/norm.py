"""RMSNorm for the local (non-TE) layer spec.

megatron's WrappedTorchNorm refuses sequence parallelism; the only thing sequence parallelism
needs from a norm is that its weight is marked, so that megatron all-reduces the weight's
gradient over the tensor-parallel group (each rank saw a different slice of the sequence).
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for bf16 stability, as Qwen2.5-VL does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
