"""Stage 2 on the one loop: a frozen tower unfrozen later, an exact resume across it, the encoder
from a stage-1 run (any layout) or a Hugging Face Qwen2.5-VL directory, one sentence for a source
that does not fit, and a VLM started from Hugging Face weights scoring like Hugging Face's own."""

import json

import pytest
import torch

from finevit.train.stage2 import Stage2Task
from finevit.train.trainer import Trainer

import tiny_stage1
from tiny_runs import losses, tower_params
from tiny_stage2 import DEMO_CONFIG, tiny_config, tiny_overrides


def run(cfg):
    trainer = Trainer(cfg, Stage2Task(cfg)).setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


@pytest.fixture
def make(dist, stage2_corpus, tmp_path):
    corpus, tokenizer = stage2_corpus
    return lambda name, **extra: tiny_config(corpus, tokenizer, tmp_path / name, **extra)


def test_frozen_towers_wait_for_their_phase_and_a_resume_across_it_is_exact(make, tmp_path):
    cfg = make("full", **{"schedule.stop_after_steps": 4})
    trainer = Trainer(cfg, Stage2Task(cfg)).setup()
    try:
        before = {t: tower_params(trainer, t) for t in ("vision", "projector", "llm")}
        trainer.train()  # phase 0: only the projector trains
        assert trainer.state.phase == 0
        during = {t: tower_params(trainer, t) for t in before}
        for tower in ("vision", "llm"):
            assert all(torch.equal(before[tower][n], during[tower][n]) for n in before[tower]), tower
        assert all(not torch.equal(before["projector"][n], during["projector"][n]) for n in before["projector"])
        cfg.schedule.stop_after_steps = None
        trainer.train()
        assert trainer.state.phase == 1
        after = {t: tower_params(trainer, t) for t in before}
        for tower in ("vision", "llm"):  # unfrozen in the same run (DDP kept their gradients)
            assert any(not torch.equal(during[tower][n], after[tower][n]) for n in during[tower]), tower
    finally:
        trainer.close()
    reference = losses(tmp_path / "full")
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert {"loss", "grad_norm_vision", "grad_norm_projector", "grad_norm_llm", "answer_tokens", "tokens_per_s",
            "padding", "tflops_per_gpu", "images_per_s"} <= rows[0].keys()
    assert any(r["kind"] == "eval" and r["answer_loss"] > 0 for r in rows)

    switch = min(step for step, (_, phase, _) in reference.items() if phase == 1)
    run(make("split", **{"schedule.stop_after_steps": switch - 1}))
    run(make("split", **{"schedule.stop_after_steps": 2}))
    run(make("split"))
    assert losses(tmp_path / "split") == reference  # bit for bit, across the unfreezing


def stage1_run(stage1_corpus, run_dir) -> dict:
    """A 2-step stage-1 run whose encoder has the tiny stage-2 encoder's shape; its encoder weights."""
    from finevit.train.stage1 import Stage1Task

    corpus, tokenizer = stage1_corpus
    cfg = tiny_stage1.tiny_config(corpus, tokenizer, run_dir, **{"schedule.stop_after_steps": 2})
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.chunks[0].vision.named_parameters()}
    finally:
        trainer.close()


def test_the_encoder_starts_from_a_stage1_run(make, stage1_corpus, tmp_path):
    """The stage-1 run's encoder loads into the stage-2 VLM (every encoder weight equal; a TP=2
    source is tests/checkpointing/dist_checkpoint.py's); the projector stays fresh."""
    theirs = stage1_run(stage1_corpus, tmp_path / "stage1")
    cfg = make("from_stage1", **{"model.vision.init_from": str(tmp_path / "stage1"), "schedule.stop_after_steps": 1})
    trainer = Trainer(cfg, Stage2Task(cfg)).setup()
    try:
        ours = dict(trainer.chunks[0].vision.named_parameters())
        assert theirs.keys() < ours.keys() and all(k.startswith("merger.") for k in ours.keys() - theirs.keys())
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    finally:
        trainer.close()


def test_a_source_that_does_not_fit_is_one_sentence_before_anything_starts(dist, stage2_corpus, stage1_corpus,
                                                                           tmp_path, caplog):
    from finevit.train import main
    from tiny_llm import TINY, hf_model

    stage1_run(stage1_corpus, tmp_path / "stage1")
    source = tmp_path / "stage1"
    hf_model(TINY).save_pretrained(tmp_path / "qwen2")
    args = tiny_overrides(*map(str, stage2_corpus), tmp_path / "s2")
    cases = {f"model.vision.init_from={source}": f"model.vision does not match the encoder in "
                                                 f"model.vision.init_from={source}: num_layers 3 here, 2 there",
             f"model.vision.init_from={tmp_path / 'qwen2'}": f"model.vision.init_from={tmp_path / 'qwen2'} holds "
                                                             "Qwen2ForCausalLM, not a Qwen2.5-VL model (no "
                                                             "vision_config) nor a finevit stage-1 run"}
    for override, expected in cases.items():
        caplog.clear()
        assert main.train(DEMO_CONFIG, args + [override, "model.vision.num_layers=3"]) == 2
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [expected]
    assert not (tmp_path / "s2").exists()
