"""Parallelism configuration: how the model and data are split over ranks."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Virtual pipeline stages (model chunks) per pipeline rank: interleaved 1F1B when set.
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Activation recomputation: "none", "selective" (core attention only) or "full" (whole layers).
    recompute: str = "none"
    recompute_num_layers: int = 1  # with recompute="full": layers per recomputed block
    # Backend for torch.distributed; "auto" is NCCL with CUDA, gloo without.
    backend: str = "auto"
    # Stage 2 under pipeline parallelism: LLM layers on the first stage, which also holds the
    # encoder and projector (default: an even split of the LLM's layers; fewer balances the encoder).
    first_stage_layers: Optional[int] = None
    timeout_s: int = 600

    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline
