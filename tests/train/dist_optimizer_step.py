"""Multi-rank: encoder training steps under megatron DDP + distributed optimizer reduce a loss.

Run through tests/parallel/test_multirank.py (4 gloo ranks).
"""

import pytest
import torch

from finevit.config import OptimizerConfig, ParallelConfig, VisionConfig
from finevit.models.vision.build import build_vision_encoder
from finevit.parallel.schedule import forward_backward
from finevit.train.optim import build_optimizer, wrap_ddp

VISION = VisionConfig(num_layers=4, hidden_size=64, num_heads=4, ffn_hidden_size=96,
                      out_hidden_size=32)
SEQ = 32
GRIDS = [[[1, 4, 4], [1, 2, 4]], [[1, 4, 6], [1, 2, 2]]]


def micro_batches(dp_rank: int) -> list[dict]:
    # Different data-parallel replicas read different samples; TP/PP peers read the same.
    g = torch.Generator().manual_seed(100 + dp_rank)
    out = []
    for grid in GRIDS:
        grid = torch.tensor(grid)
        real = int(grid.prod(-1).sum())
        pixels = torch.zeros(SEQ, VISION.patch_dim)
        pixels[:real] = torch.randn(real, VISION.patch_dim, generator=g)
        target = torch.randn(real // 4, VISION.out_hidden_size, generator=g)
        out.append({"pixels": pixels, "grid": grid, "target": target})
    return out


def encoder_forward(chunk, batch):
    out = chunk(batch["pixels"] if chunk.module.pre_process else None, batch["grid"], num_tokens=SEQ)

    def loss_func(output):
        loss = torch.nn.functional.mse_loss(output[: batch["target"].shape[0]], batch["target"])
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


@pytest.mark.parametrize("tp,pp", [(2, 2), (2, 1)], ids=["tp2pp2-dp1", "tp2-dp2"])
def test_distributed_optimizer_reduces_loss(parallel_groups, tp, pp):
    pg = parallel_groups(tp=tp, pp=pp)
    parallel = ParallelConfig(tensor=tp, pipeline=pp, distributed_optimizer=True)
    torch.manual_seed(0)
    chunks = wrap_ddp(build_vision_encoder(VISION, parallel, pg), parallel, pg)
    optimizer = build_optimizer(chunks, OptimizerConfig(lr=3e-3, weight_decay=0.0), parallel, pg)
    batches = micro_batches(pg.dp.rank())
    losses = []
    for _ in range(6):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        logs = forward_backward(chunks, batches, encoder_forward, pg, seq_length=SEQ)
        ok, grad_norm, _ = optimizer.step()
        assert ok and grad_norm is not None and grad_norm > 0
        loss = torch.tensor(sum(float(l["loss"]) for l in logs) / len(batches) if logs else 0.0)
        torch.distributed.all_reduce(loss, group=pg.pp)  # only the last stage has it
        torch.distributed.all_reduce(loss, group=pg.dp)
        losses.append(float(loss) / pg.dp.size())
    assert losses[-1] < 0.7 * losses[0], losses
    # Replicas must hold identical weights after the sharded update and all-gather.
    for chunk in chunks:
        for p in chunk.parameters():
            ref = p.detach().clone()
            torch.distributed.broadcast(ref, group=pg.dp, group_src=0)
            torch.testing.assert_close(p.detach(), ref, atol=0, rtol=0)
