"""Which tower a parameter belongs to: the loop's per-tower LR multiplier, freezing and gradient
norm read it from the parameter itself (the `finevit_tower` attribute; untagged ones are vision)."""

from typing import Optional

import torch

TOWER_ATTR = "finevit_tower"


def tag(module: Optional[torch.nn.Module], tower: str) -> None:
    for p in module.parameters() if module is not None else ():
        setattr(p, TOWER_ATTR, tower)
