"""Unit-scale random weights for parity tests: megatron's init (std 0.02) leaves attention almost
uniform, which would hide a head split wrongly between ranks or a q/k/v mix-up."""

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights around 1, other vectors around 0, matrices at unit activation scale."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            p.copy_(("norm" in name and name.endswith("weight")) + 0.1 * noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)
