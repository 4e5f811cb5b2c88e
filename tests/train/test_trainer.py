"""The training loop on one process: exact resume across a phase switch, frozen towers, a crash
during a checkpoint save, the non-finite loss guard, evaluation."""

import json
import math
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

from finevit.train.stage1 import Stage1Task
from finevit.train.trainer import Trainer, TrainingError

from tiny_runs import losses, tower_params, train_in_process
from tiny_stage1 import tiny_config


def run(cfg, **hooks):
    return train_in_process(cfg, Stage1Task, **hooks)


@pytest.fixture
def make(dist, stage1_corpus, tmp_path):
    corpus, tokenizer = stage1_corpus
    return lambda name, **extra: tiny_config(corpus, tokenizer, tmp_path / name, **extra)


def test_stopped_and_resumed_run_reproduces_the_uninterrupted_loss_curve(make, tmp_path):
    full = run(make("full"))
    reference = losses(tmp_path / "full")
    row = next(r for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl")) if r["kind"] == "train")
    assert {  # what the logs promise (mfu needs a GPU's known peak)
        "loss", "lr", "grad_norm", "grad_norm_vision", "grad_norm_text", "grad_norm_loss", "temperature",
        "bias", "images_per_s", "tokens_per_s", "padding", "tflops_per_gpu", "contrastive_batch",
        "contrastive_groups", "samples", "phase", "skipped_steps"} <= row.keys()
    assert full.state.consumed_samples >= 80 and {p for _, p, _ in reference.values()} == {0, 1}
    first = run(make("split", **{"schedule.stop_after_steps": 3}))
    assert first.state.step == 3 and first.state.phase == 0  # stopped before the phase switch
    switch = min(step for step, (_, phase, _) in reference.items() if phase == 1)
    second = run(make("split", **{"schedule.stop_after_steps": switch - 3 + 1}))
    assert second.state.phase == 1 and second.state.step == switch + 1  # and once after it
    resumed = run(make("split"))
    assert resumed.state.step == full.state.step
    assert losses(tmp_path / "split") == reference  # same losses, phases and samples, bit for bit


def test_resume_with_a_changed_learning_rate(make):
    run(make("relr", **{"schedule.stop_after_steps": 2}))
    cfg = make("relr", **{"schedule.stop_after_steps": 1, "optimizer.lr": 1e-3, "optimizer.lr_mult": "{text: 0.5}"})
    trainer = run(cfg)
    assert trainer.state.step == 3
    groups = [g for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
              for g in o.optimizer.param_groups]
    assert {g["max_lr"] for g in groups} == {1e-3}
    assert {g["tower"]: g["lr_mult"] for g in groups} == {"vision": 1.0, "text": 0.5, "loss": 1.0}


def largest_in_batches(trainer, n=8) -> tuple[int, int]:
    """(pixels of the largest image, tokens of the longest caption) in the next n batches."""
    pixels, tokens = 0, 0
    for _ in range(n):
        batch = next(trainer.loader)
        pixels = max(pixels, int((batch.grid_thw[:, 1] * batch.grid_thw[:, 2]).max()) * 14 * 14)
        tokens = max(tokens, int(batch.text_lengths.max()))
    return pixels, tokens


# overlap_grad_reduce: megatron reduces a bucket when all its parameters' hooks have fired, and the
# frozen tower's never fire (the FineViT recipe runs frozen text with overlap on).
@pytest.mark.parametrize("overlap", [False, True], ids=["sync_reduce", "overlap_reduce"])
def test_frozen_text_tower_gets_no_update_until_it_is_unfrozen(make, overlap):
    phases = ("[{start_samples: 0, max_pixels: 6272, max_text_len: 32, freeze: [text]},"
              " {start_samples: 40, freeze: [], max_pixels: 12544, max_text_len: 64}]")
    cfg = make("frozen", **{"schedule.phases": phases, "schedule.stop_after_steps": 3,
                            "parallel.overlap_grad_reduce": overlap})
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        text0, vision0, loss0 = (tower_params(trainer, t) for t in ("text", "vision", "loss"))
        trainer.train()
        assert trainer.state.phase == 0
        text1, vision1, loss1 = (tower_params(trainer, t) for t in ("text", "vision", "loss"))
        assert all(torch.equal(text0[n], text1[n]) for n in text0), "a frozen parameter moved"
        assert any(not torch.equal(vision0[n], vision1[n]) for n in vision0)
        # The temperature and bias learn while the text tower is frozen (LiT).
        assert sorted(n.split(".")[-1] for n in loss0) == ["logit_bias", "logit_scale"]
        assert all(not torch.equal(loss0[n], loss1[n]) for n in loss0)
        # Entering the long-text phase stretches the 32 trained position rows over 64.
        table = next(c.text for c in trainer.chunks if c.text is not None).position_embeddings.weight
        rows = table[:32].detach().t().unsqueeze(0)  # [32, h] -> [1, h, 32]
        expected = F.interpolate(rows, size=64, mode="linear", align_corners=True)[0].t()
        pixels, tokens = largest_in_batches(trainer)
        assert 3136 < pixels <= 6272 and tokens == 32  # demo captions are longer than 32 tokens
        trainer._enter_phase(1)
        assert trainer.state.task["text_positions"] == 64
        torch.testing.assert_close(table[:64].detach(), expected, rtol=0, atol=1e-6)
        pixels, tokens = largest_in_batches(trainer)  # the loader follows the phase
        assert 6272 < pixels <= 12544 and 32 < tokens <= 64
        cfg.schedule.stop_after_steps = None
        trainer.train()
        assert trainer.state.phase == 1
        text2 = tower_params(trainer, "text")
        assert any(not torch.equal(text1[n], text2[n]) for n in text1 if "position" not in n)
    finally:
        trainer.close()


def test_crash_during_save_leaves_the_previous_checkpoint_in_use(make, tmp_path):
    run(make("crash", **{"checkpoint.save_interval": 2, "schedule.stop_after_steps": 2}))

    def crash():
        raise RuntimeError("simulated crash while writing a checkpoint")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make("crash", **{"checkpoint.save_interval": 2}), _fail_after_model_save=crash)
    assert (tmp_path / "crash" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    # A crash while saving step 2 again, between setting the old copy aside and moving the new
    # one in: the old copy is used, and put back by the next save.
    ckpts = tmp_path / "crash" / "checkpoints"
    (ckpts / "step_000002").rename(ckpts / "step_000002.trash")
    resumed = Trainer(make("crash", **{"schedule.stop_after_steps": 1}), None)
    resumed.task = Stage1Task(resumed.cfg)
    resumed.setup()
    try:
        assert resumed.state.step == 2
        resumed.train()
    finally:
        resumed.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000003"]


def test_non_finite_loss_skips_steps_then_stops_with_a_checkpoint(make, tmp_path, monkeypatch):
    cfg = make("nan", **{"schedule.max_bad_steps_in_a_row": 3})
    task = Stage1Task(cfg)
    forward = task.forward

    def poisoned(chunk, mb, collect=None):
        out, loss_func = forward(chunk, mb, collect)

        def nan_loss(output):
            loss, logs = loss_func(output)
            return loss * math.nan, {k: v * math.nan for k, v in logs.items()}
        return out, nan_loss

    monkeypatch.setattr(task, "forward", poisoned)
    trainer = Trainer(cfg, task).setup()
    try:
        before = tower_params(trainer, "vision")
        with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss"):
            trainer.train()
        assert trainer.state.skipped_steps == 3
        after = tower_params(trainer, "vision")
        assert all(torch.equal(before[n], after[n]) for n in before)
    finally:
        trainer.close()
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_a_non_finite_gradient_skips_that_step_only(make):
    cfg = make("infgrad", **{"schedule.stop_after_steps": 3})  # 1 + 3 steps
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        name, param = next((n, p) for n, p in trainer.chunks[0].named_parameters() if "linear_fc1.weight" in n)
        calls = []
        # The loss stays finite; one vision gradient overflows in the first step's backward.
        param.register_hook(lambda g: (calls.append(1), g * math.inf if len(calls) == 1 else g)[1])
        before = {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()}
        trainer.train_step()
        assert (trainer.state.skipped_steps, trainer.state.bad_in_a_row) == (1, 1)
        assert all(torch.equal(before[n], p) for n, p in trainer.chunks[0].named_parameters())  # no tower moved
        trainer.train()
        assert (trainer.state.step, trainer.state.skipped_steps, trainer.state.bad_in_a_row) == (4, 1, 0)
        assert not torch.equal(before[name], param)
    finally:
        trainer.close()
    rows = losses(Path(trainer.run_dir))
    assert all(math.isfinite(loss) for loss, _, _ in rows.values())


def test_evaluation_reports_recall_on_the_heldout_split(make):
    cfg = make("eval", **{"schedule.stop_after_steps": 1})
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        result = trainer.evaluate()
    finally:
        trainer.close()
    assert result["pairs"] == 24 and 0 <= result["i2t_r1"] <= result["i2t_r5"] <= 1


def test_own_checkpoint_wins_over_checkpoint_load_and_weights_only_starts_afresh(make, tmp_path):
    source = run(make("source", **{"schedule.stop_after_steps": 2}))
    given = str(tmp_path / "source" / "checkpoints")
    # Started from the source's step 2, then relaunched with the same command (a requeued job):
    # the second launch resumes from its own step 4, not again from the source.
    assert run(make("child", **{"checkpoint.load": given, "schedule.stop_after_steps": 2})).state.step == 4
    assert run(make("child", **{"checkpoint.load": given, "schedule.stop_after_steps": 1})).state.step == 5
    # Weights only: the source's weights, and a new run (step, samples, optimizer, schedule).
    cfg = make("fresh", **{"checkpoint.load": given, "checkpoint.load_weights_only": True,
                           "schedule.stop_after_steps": 1})
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        assert (trainer.state.step, trainer.state.consumed_samples) == (0, 0)
        assert trainer.state.task["text_positions"] == 32  # the source's trained rows
        mine = {n: p for c in trainer.chunks for n, p in c.named_parameters()}
        theirs = {n: p for c in source.chunks for n, p in c.named_parameters()}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
        assert all(not s for opt in trainer.optimizer.chained_optimizers for s in opt.optimizer.state.values())
        trainer.train()
        assert trainer.state.step == 1
    finally:
        trainer.close()
