"""Multi-rank: checkpoints resume exactly, survive a crash mid-save, reshard, and rotate.

Run through tests/parallel/test_multirank.py (4 gloo ranks), or alone:
python -m torch.distributed.run --standalone --nproc_per_node=4 -m pytest -q \
    -p no:cacheprovider tests/checkpointing/dist_checkpoint.py
"""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from megatron.core.utils import unwrap_model

from finevit.config import OptimizerConfig, ParallelConfig, ScheduleConfig, VisionConfig
from finevit.models.vision.build import build_vision_encoder
from finevit.parallel.shards import canonical_parameters, full_from_shards
from finevit.checkpointing.dist import (
    find_latest,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    saved_rank_state,
    set_rng_state,
)
from finevit.parallel.schedule import forward_backward
from finevit.train.optim import build_optimizer, wrap_ddp
from finevit.train.schedules import LRScheduler

VISION = VisionConfig(num_layers=4, hidden_size=64, num_heads=4, ffn_hidden_size=96,
                      patch_size=4, temporal_patch_size=1, out_hidden_size=32)
OPTIM = OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.1)
SCHEDULE = ScheduleConfig(train_samples=200, warmup_samples=50, decay_style="cosine")
SEQ = 32
GRIDS = [[[1, 4, 4], [1, 2, 4]], [[1, 4, 6], [1, 2, 2]]]


@pytest.fixture
def shared_dir(dist):
    """One fresh directory that every rank sees (rank 0 picks it)."""
    name = [tempfile.mkdtemp(prefix="finevit-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    yield Path(name[0])
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(name[0], ignore_errors=True)


def build(parallel_groups, tp, pp, vpp=None, seed=0, bf16=False):
    pg = parallel_groups(tp=tp, pp=pp, vpp=vpp)
    parallel = ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp,
                              distributed_optimizer=True)
    torch.manual_seed(seed)
    chunks = wrap_ddp(build_vision_encoder(VISION, parallel, pg, dtype="bf16" if bf16 else "fp32"),
                      parallel, pg)
    optimizer = build_optimizer(chunks, OPTIM, parallel, pg,
                                dtype=torch.bfloat16 if bf16 else torch.float32)
    return pg, chunks, optimizer


def batches(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for grid in map(torch.tensor, GRIDS):
        real = int(grid.prod(-1).sum())
        pixels = torch.zeros(SEQ, VISION.patch_dim)
        pixels[:real] = torch.randn(real, VISION.patch_dim, generator=g)
        out.append({"pixels": pixels, "grid": grid,
                    "target": torch.randn(real // 4, VISION.out_hidden_size, generator=g)})
    return out


def forward(chunk, batch):
    pixels = batch["pixels"] if chunk.module.pre_process else None
    out = chunk(pixels, batch["grid"], num_tokens=SEQ)

    def loss_func(output):
        loss = torch.nn.functional.mse_loss(output[: batch["target"].shape[0]], batch["target"])
        return loss, {"loss": loss.detach()}

    return out, loss_func


def train_step(chunks, optimizer, pg, seed):
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward(chunks, batches(seed), forward, pg, seq_length=SEQ)
    ok, _, _ = optimizer.step()
    assert ok


def full_weights(chunks, pg) -> dict:
    """Canonical (TP=1, PP=1) tensors of the whole model, on every rank."""
    mine = {}
    for chunk in chunks:
        for name, p in canonical_parameters(unwrap_model(chunk)):
            shards = [torch.empty_like(p) for _ in range(pg.tp.size())]
            torch.distributed.all_gather(shards, p.detach().contiguous(), group=pg.tp)
            mine[name] = full_from_shards(shards, p)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return {k: v for d in every for k, v in d.items()}


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def scheduled_step(chunks, optimizer, scheduler, pg, consumed, seed):
    lr = scheduler.apply(consumed, 32)
    groups = optimizer.param_groups
    assert {g["lr"] for g in groups} == {lr} and {g["weight_decay"] for g in groups} == {0.0, 0.1}
    train_step(chunks, optimizer, pg, seed)
    return consumed + 32


def test_resume_is_exact(parallel_groups, shared_dir):
    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=2)
    scheduler, consumed = LRScheduler(optimizer, OPTIM, SCHEDULE), 0
    for s in range(2):
        seed = 100 + pg.dp.rank() + s
        consumed = scheduled_step(chunks, optimizer, scheduler, pg, consumed, seed)
    torch.manual_seed(1000 + torch.distributed.get_rank())
    common = {"consumed_samples": consumed, "phase": 1, "scheduler": scheduler.state_dict()}
    path = save_checkpoint(shared_dir, 2, chunks, optimizer, common, pg, keep_last=3,
                           rank_state={"rng": rng_state()})
    expected_draw = torch.rand(3)
    scheduled_step(chunks, optimizer, scheduler, pg, consumed, 100 + pg.dp.rank() + 2)
    reference = full_weights(chunks, pg)

    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=2, seed=7)  # other initial weights
    assert find_latest(shared_dir) == path
    loaded = load_checkpoint(path, chunks, optimizer, pg)
    assert {k: loaded[k] for k in common} == common and loaded["step"] == 2
    set_rng_state(saved_rank_state(loaded, pg)["rng"])
    assert torch.equal(torch.rand(3), expected_draw)
    scheduler = LRScheduler(optimizer, OPTIM, SCHEDULE)
    scheduler.load_state_dict(loaded["scheduler"])
    scheduled_step(chunks, optimizer, scheduler, pg, loaded["consumed_samples"],
                   100 + pg.dp.rank() + 2)
    assert_same(full_weights(chunks, pg), reference)


class Crash(RuntimeError):
    pass


def test_crash_during_save_keeps_the_previous_checkpoint(parallel_groups, shared_dir):
    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=1)  # DP=2: a sharded optimizer
    train_step(chunks, optimizer, pg, seed=1 + pg.dp.rank())
    good = save_checkpoint(shared_dir, 1, chunks, optimizer, {"step": 1}, pg)
    at_good = full_weights(chunks, pg)
    train_step(chunks, optimizer, pg, seed=2 + pg.dp.rank())

    def crash():
        raise Crash("simulated crash after the tensors were written")

    with pytest.raises(Crash):
        save_checkpoint(shared_dir, 2, chunks, optimizer, {"step": 2}, pg,
                        _fail_after_model_save=crash)
    torch.distributed.barrier()
    assert (shared_dir / "latest").read_text().strip() == "step_000001"
    assert (shared_dir / "step_000002.tmp").is_dir() and not (shared_dir / "step_000002").exists()
    assert find_latest(shared_dir) == good

    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=1, seed=7)
    assert load_checkpoint(find_latest(shared_dir), chunks, optimizer, pg)["step"] == 1
    assert_same(full_weights(chunks, pg), at_good)
    save_checkpoint(shared_dir, 2, chunks, optimizer, {"step": 2}, pg)
    assert not (shared_dir / "step_000002.tmp").exists()
    assert find_latest(shared_dir) == shared_dir / "step_000002"


def test_optimizer_and_weights_reshard_tp2pp2_to_tp1pp1(parallel_groups, shared_dir):
    # Every data-parallel replica reads the same batches, so a step is layout independent.
    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=2)
    train_step(chunks, optimizer, pg, seed=1)
    train_step(chunks, optimizer, pg, seed=2)
    path = save_checkpoint(shared_dir, 2, chunks, optimizer, {}, pg)
    saved = full_weights(chunks, pg)
    train_step(chunks, optimizer, pg, seed=3)
    reference = full_weights(chunks, pg)

    pg, chunks, optimizer = build(parallel_groups, tp=1, pp=1, seed=7)  # DP=4
    loaded = load_checkpoint(path, chunks, optimizer, pg)
    assert saved_rank_state(loaded, pg) is None  # another layout: no per-rank owner
    assert_same(full_weights(chunks, pg), saved)
    train_step(chunks, optimizer, pg, seed=3)
    # Same update up to summation order (TP-split matmuls): Adam moments were restored.
    assert_same(full_weights(chunks, pg), reference, atol=1e-6)


def test_dp_reshardable_optimizer_state_resumes_exactly_and_only_in_its_layout(parallel_groups, shared_dir):
    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=1)  # DP=2: each rank owns a slice
    train_step(chunks, optimizer, pg, seed=1 + pg.dp.rank())
    path = save_checkpoint(shared_dir, 1, chunks, optimizer, {}, pg, optimizer_format="dp_reshardable")
    saved = full_weights(chunks, pg)
    train_step(chunks, optimizer, pg, seed=2 + pg.dp.rank())
    reference = full_weights(chunks, pg)

    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=1, seed=7)
    load_checkpoint(path, chunks, optimizer, pg)
    train_step(chunks, optimizer, pg, seed=2 + pg.dp.rank())
    assert_same(full_weights(chunks, pg), reference)  # moments and main weights restored exactly

    pg, chunks, optimizer = build(parallel_groups, tp=1, pp=2, seed=7)
    with pytest.raises(ValueError, match="dp_reshardable optimizer state, which loads only into the "
                                         "layout that saved it \\(tensor=2, pipeline=1"):
        load_checkpoint(path, chunks, optimizer, pg)
    load_checkpoint(path, chunks, optimizer, pg, load_optimizer=False)  # weights load anywhere
    assert_same(full_weights(chunks, pg), saved)


def test_weights_only_from_virtual_pipeline_into_tp2_bf16(parallel_groups, shared_dir):
    pg, chunks, optimizer = build(parallel_groups, tp=1, pp=2, vpp=2, bf16=True)  # model0, model1
    path = save_checkpoint(shared_dir, 5, chunks, optimizer, {}, pg)
    saved = full_weights(chunks, pg)

    pg, chunks, optimizer = build(parallel_groups, tp=2, pp=1, seed=7, bf16=True)
    load_checkpoint(path, chunks, optimizer, pg, load_optimizer=False)
    assert_same(full_weights(chunks, pg), saved)
    # bf16 weights train through fp32 copies in the optimizer: those must follow the load, or
    # this step would write the freshly initialised weights back (a change of ~0.1).
    train_step(chunks, optimizer, pg, seed=1)
    moved = full_weights(chunks, pg)
    assert max((moved[k].float() - saved[k].float()).abs().max() for k in saved) < 0.02


def test_keep_last_and_latest_fallback(parallel_groups, shared_dir):
    pg, chunks, optimizer = build(parallel_groups, tp=1, pp=1)
    for step in (20, 30, 40):
        save_checkpoint(shared_dir, step, chunks, optimizer, {"step": step}, pg, keep_last=2)
    names = sorted(p.name for p in shared_dir.iterdir())
    assert names == ["latest", "step_000030", "step_000040"]
    assert find_latest(shared_dir) == shared_dir / "step_000040"
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (shared_dir / "latest").write_text("step_000099\n")  # a bad pointer
    torch.distributed.barrier()
    assert find_latest(shared_dir) == shared_dir / "step_000040"
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (shared_dir / "latest").unlink()
        shutil.rmtree(shared_dir / "step_000040")
    torch.distributed.barrier()
    assert find_latest(shared_dir) == shared_dir / "step_000030"
    assert find_latest(shared_dir / "missing") is None


def test_a_tp2_stage1_checkpoint_loads_as_the_vlm_encoder_at_tp1(parallel_groups, shared_dir):
    """Stage 2 starts its encoder from stage 1: a SigLIP checkpoint saved at TP=2 gives the VLM
    built at TP=1 the same encoder (identical patch states); the merger, which stage 1 lacks, stays."""
    from finevit.config import ModelConfig
    from finevit.config.model import ContrastiveConfig, LLMConfig, TextConfig
    from finevit.models.siglip import build_siglip
    from finevit.models.vlm import build_vlm
    from finevit.checkpointing.dist import load_module_weights
    from unit_scale import randomize_

    llm = LLMConfig(vocab_size=64, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2,
                    ffn_hidden_size=48, mrope_section=[2, 3, 3])
    model = ModelConfig(vision=VISION, llm=llm, text=TextConfig(vocab_size=64, max_positions=8, num_layers=1,
                                                                 hidden_size=32, num_heads=2, ffn_hidden_size=48),
                        contrastive=ContrastiveConfig(embed_dim=16, pool_heads=2))
    pg2 = parallel_groups(tp=2)
    (stage1,) = build_siglip(model, ParallelConfig(tensor=2), pg2)
    randomize_(stage1.vision, seed=7)  # replicated weights agree across TP ranks; shards may repeat
    save_checkpoint(shared_dir, 1, [stage1], None, {}, pg2)
    grid = torch.tensor(GRIDS[0])
    pixels = batches(3)[0]["pixels"]
    with torch.no_grad():
        reference = stage1.vision(pixels, grid, SEQ)  # [S, h] patch states (no merger in stage 1)

    pg1 = parallel_groups(tp=1)
    vlm = build_vlm(model, ParallelConfig(), pg1)
    merger = {n: p.detach().clone() for n, p in vlm.vision.merger.named_parameters()}
    kept = load_module_weights(find_latest(shared_dir), vlm.vision, "vision.", exclude=("merger.",))
    assert sorted(kept) == sorted(f"merger.{n}" for n in merger)
    assert all(torch.equal(p, merger[n]) for n, p in vlm.vision.merger.named_parameters())
    vlm.vision.merger = None  # compare the patch states themselves
    vlm.vision.post_process = True
    with torch.no_grad():
        out = vlm.vision(pixels, grid, SEQ)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
