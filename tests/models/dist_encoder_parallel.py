"""Multi-rank: the encoder under TP / SP / PP / VPP equals the TP=1, PP=1 encoder.

Run through tests/parallel/test_multirank.py (4 gloo ranks). Each test builds a full-size
reference beside the parallel model in the same process (on singleton process groups), loads
the same weights into both, and compares outputs, losses and every local gradient shard.
"""

import pytest
import torch

from finevit.config import ParallelConfig, VisionConfig
from finevit.models.vision.build import build_vision_encoder
from finevit.parallel.shards import canonical_parameters, load_full_state, local_shard
from finevit.parallel.schedule import forward_backward

VISION = VisionConfig(num_layers=4, hidden_size=64, num_heads=4, ffn_hidden_size=96,
                      out_hidden_size=48)
SEQ = 48  # token budget: every packed micro-batch is padded to this
GRIDS = [[[1, 4, 6], [1, 2, 4]], [[1, 6, 4], [1, 2, 2]], [[1, 2, 2]], [[1, 4, 4], [1, 4, 2]]]
ATOL = 1e-5


def micro_batches(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for grid in GRIDS:
        grid = torch.tensor(grid)
        real = int(grid.prod(-1).sum())
        pixels = torch.zeros(SEQ, VISION.patch_dim)
        pixels[:real] = torch.randn(real, VISION.patch_dim, generator=g)
        target = torch.randn(real // VISION.merge_unit, VISION.out_hidden_size, generator=g)
        out.append({"pixels": pixels, "grid": grid, "target": target})
    return out


def regression_loss(batch, output):
    """Mean squared error over the merged tokens of real images (padding excluded)."""
    n = batch["target"].shape[0]
    return torch.nn.functional.mse_loss(output[:n], batch["target"])


def encoder_forward(chunk, batch):
    out = chunk(batch["pixels"] if chunk.pre_process else None, batch["grid"], num_tokens=SEQ)

    def loss_func(output):
        loss = regression_loss(batch, output)
        # clone: megatron scales the returned loss in place by 1 / num_microbatches
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


@pytest.fixture(scope="module")
def reference(solo_groups):
    """Weights, per-micro-batch outputs / losses and gradients of the TP=1, PP=1 encoder."""
    torch.manual_seed(0)
    model = build_vision_encoder(VISION, ParallelConfig(), solo_groups)[0]
    full = {name: p.detach().clone() for name, p in canonical_parameters(model)}
    outputs, losses = [], []
    for batch in micro_batches():
        out = model(batch["pixels"], batch["grid"])
        loss = regression_loss(batch, out) / len(GRIDS)
        loss.backward()
        outputs.append(out.detach())
        losses.append(loss.detach() * len(GRIDS))
    grads = {name: p.grad.clone() for name, p in canonical_parameters(model)}
    return full, outputs, losses, grads


def assert_grads_match(chunks, ref_grads, pg):
    tp_rank, tp_size = pg.tp.rank(), pg.tp.size()
    checked = 0
    for chunk in chunks:
        for name, param in canonical_parameters(chunk):
            grad = param.grad
            if getattr(param, "sequence_parallel", False):
                # Each TP rank saw part of the sequence; megatron sums these in finalize_model_grads.
                grad = grad.clone()
                torch.distributed.all_reduce(grad, group=pg.tp)
            want = local_shard(ref_grads[name], param, tp_rank, tp_size)
            torch.testing.assert_close(grad, want, atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_equals_tp1(parallel_groups, reference, sequence_parallel):
    full, ref_out, _, ref_grads = reference
    pg = parallel_groups(tp=2)
    parallel = ParallelConfig(tensor=2, sequence_parallel=sequence_parallel)
    model = build_vision_encoder(VISION, parallel, pg)[0]
    load_full_state([model], full, pg.tp.rank(), 2)
    for batch, want in zip(micro_batches(), ref_out):
        out = model(batch["pixels"], batch["grid"])
        torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-4)
        (regression_loss(batch, out) / len(GRIDS)).backward()
    assert_grads_match([model], ref_grads, pg)


@pytest.mark.parametrize("tp,pp,vpp", [(1, 2, None), (1, 2, 2), (2, 2, None)],
                         ids=["pp2", "pp2-vpp2", "tp2pp2"])
def test_pipeline_equals_single_stage(parallel_groups, reference, tp, pp, vpp):
    full, _, ref_losses, ref_grads = reference
    pg = parallel_groups(tp=tp, pp=pp, vpp=vpp)
    chunks = build_vision_encoder(VISION, ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp), pg)
    assert len(chunks) == (vpp or 1)
    load_full_state(chunks, full, pg.tp.rank(), tp)
    logs = forward_backward(chunks, micro_batches(), encoder_forward, pg, seq_length=SEQ)
    if pg.pp.rank() == pg.pp.size() - 1:
        losses = torch.stack([log["loss"] for log in logs])
        torch.testing.assert_close(losses, torch.stack(ref_losses), atol=ATOL, rtol=1e-5)
    else:
        assert logs == []
    assert_grads_match(chunks, ref_grads, pg)
