"""Stage 2 on the one loop: a frozen tower unfrozen later, an exact resume across it, the encoder
from a stage-1 run (any layout) or a Hugging Face Qwen2.5-VL directory, one sentence for a source
that does not fit, and a VLM started from Hugging Face weights scoring like Hugging Face's own."""

import json

import pytest
import torch

from finevit.train.stage2 import Stage2Task
from finevit.train.trainer import Trainer

import tiny_stage1
from tiny_runs import losses, tower_params, train_in_process
from tiny_stage2 import DEMO_CONFIG, tiny_config, tiny_overrides


def run(cfg):
    return train_in_process(cfg, Stage2Task)


@pytest.fixture
def make(dist, stage2_corpus, tmp_path):
    corpus, tokenizer = stage2_corpus
    return lambda name, **extra: tiny_config(corpus, tokenizer, tmp_path / name, **extra)


def test_frozen_towers_wait_for_their_phase_and_a_resume_across_it_is_exact(make, stage2_corpus, tmp_path, capsys):
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
    assert {"loss", "grad_norm_vision", "grad_norm_projector", "grad_norm_llm", "answer_tokens",
            "answer_tokens_per_s", "tokens_per_s",
            "padding", "tflops_per_gpu", "images_per_s"} <= rows[0].keys()
    (evaluation,) = [r for r in rows if r["kind"] == "eval"]
    assert evaluation["answer_loss"] > 0 and evaluation["samples"] >= 8
    from finevit.eval.vlm import METRICS

    assert any(m in evaluation for m in METRICS)  # generated answers were scored

    from finevit.train import main  # `finevit eval` of the finished run: the same held-out metrics

    assert main.evaluate(DEMO_CONFIG, tiny_overrides(*map(str, stage2_corpus), tmp_path / "full")) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("answer_loss=") and f"answer_loss={evaluation['answer_loss']:.4f}" in printed

    switch = min(step for step, (_, phase, _) in reference.items() if phase == 1)
    run(make("split", **{"schedule.stop_after_steps": switch - 1}))
    run(make("split", **{"schedule.stop_after_steps": 2}))
    run(make("split"))
    assert losses(tmp_path / "split") == reference  # bit for bit, across the unfreezing


def stage1_run(stage1_corpus, run_dir) -> dict:
    return tiny_stage1.stage1_run(*map(str, stage1_corpus), run_dir)


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
                                                             "Qwen2ForCausalLM, not a Qwen2.5-VL model or vision "
                                                             "tower (Qwen2_5_VisionTransformerPretrainedModel) nor "
                                                             "a finevit stage-1 run"}
    for override, expected in cases.items():
        caplog.clear()
        assert main.train(DEMO_CONFIG, args + [override, "model.vision.num_layers=3"]) == 2
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [expected]
    assert not (tmp_path / "s2").exists()


def test_the_loss_is_the_mean_over_every_answer_token_of_the_step(make):
    """Two rows with different answer counts in one step: the loss and every gradient are those of
    (all answer tokens' losses summed) / (their number), not the mean of the two rows' means."""
    from finevit.parallel.schedule import forward_backward

    cfg = make("per_token", **{"schedule.micro_batches_per_step": 2})
    task = Stage2Task(cfg)
    trainer = Trainer(cfg, task).setup()
    try:
        batches = [next(trainer.loader) for _ in range(2)]
        counts = [b.num_answer_tokens for b in batches]
        assert counts[0] != counts[1]
        params = [p for c in trainer.ddp for p in c.parameters()]

        def grads(fn):
            for c in trainer.ddp:
                c.zero_grad_buffer()
            value = fn()
            return value, [p.main_grad.clone() for p in params]

        def step():
            task.start_step(batches)
            logs = forward_backward(trainer.ddp, [task.inputs(b) for b in batches], task.forward, trainer.pg,
                                    seq_length=task.seq_length)
            return sum(float(d["loss"]) for d in logs) / len(logs)

        def dense(per_row_mean: bool):
            sums = []
            for b in batches:
                mb = task.inputs(b)
                losses = trainer.ddp[0](mb["pixel_values"], mb["grid_thw"], mb["input_ids"], mb["image_mask"],
                                        mb["position_ids"], mb["params"], mb["vit_tokens"],
                                        labels=mb["labels"].clamp(min=0))
                sums.append((losses * (mb["labels"] != -100)).sum())
            loss = (sums[0] / counts[0] + sums[1] / counts[1]) / 2 if per_row_mean else sum(sums) / sum(counts)
            loss.backward()
            return float(loss)

        logged, ours = grads(step)
        expected, reference = grads(lambda: dense(False))
        _, biased = grads(lambda: dense(True))
        assert logged == pytest.approx(expected, rel=1e-5)
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert max(float((a - b).abs().max()) for a, b in zip(reference, biased)) > 1e-4  # the test can fail
    finally:
        trainer.close()


def hugging_face_pair(cfg, tok, out):
    """A random Qwen2.5-VL of the config's shape saved to out/vlm, and its language model saved as
    a Qwen2ForCausalLM to out/llm; returns the VLM."""
    import dataclasses

    from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    from finevit.convert import qwen2 as conv
    from finevit.convert.qwen2_5_vl import hf_config_from_vision
    from unit_scale import randomize_

    text = conv.hf_config_from_llm(cfg.model.llm)
    causal = dict(text)
    text.pop("architectures"), text.pop("model_type")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": list(cfg.model.llm.mrope_section)}
    vision = dataclasses.replace(cfg.model.vision, out_hidden_size=cfg.model.llm.hidden_size)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=hf_config_from_vision(vision).to_dict(),
                              image_token_id=tok.image_id, vision_start_token_id=tok.ids["vision_start"],
                              vision_end_token_id=tok.ids["vision_end"], video_token_id=tok.ids["pad"],
                              tie_word_embeddings=cfg.model.llm.tie_embeddings)
    vlm = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    randomize_(vlm, seed=3)
    vlm.save_pretrained(out / "vlm")
    llm_config = AutoConfig.for_model(causal.pop("model_type"), **{k: v for k, v in causal.items()
                                                                   if k != "architectures"})
    llm = Qwen2ForCausalLM(llm_config)
    llm.model.load_state_dict(vlm.model.language_model.state_dict())
    llm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    llm.config.architectures = ["Qwen2ForCausalLM"]
    llm.save_pretrained(out / "llm")
    return vlm


def test_a_vlm_started_from_hugging_face_scores_answers_as_hugging_face_does(make, tmp_path):
    """Encoder + projector from a Qwen2.5-VL directory, LLM from a Qwen2 directory: on a packed
    row from the loader, each sample's answer-token loss equals HF's `labels=` loss (which shifts
    the labels itself) on that sample alone, within 1e-5."""
    from finevit.data.llm_tokenizer import LLMTokenizer

    probe = make("probe")
    tok = LLMTokenizer(probe.data.llm.tokenizer)
    hf = hugging_face_pair(probe, tok, tmp_path)
    cfg = make("from_hf", **{"model.vision.init_from": str(tmp_path / "vlm"), "model.vision.init_projector": True,
                             "model.llm.init_from": str(tmp_path / "llm"), "data.llm.max_tokens": 384})
    task = Stage2Task(cfg)
    trainer = Trainer(cfg, task).setup()
    try:
        batch = next(b for b in trainer.loader if b.num_images > 1)
        mb = task.inputs(batch)
        with torch.no_grad():
            ours = trainer.chunks[0](mb["pixel_values"], mb["grid_thw"], mb["input_ids"], mb["image_mask"],
                                     mb["position_ids"], mb["params"], mb["vit_tokens"],
                                     labels=mb["labels"].clamp(min=0))[0]
        targets = mb["labels"][0]
        bounds, patches = batch.llm_cu_seqlens.tolist(), batch.cu_seqlens.tolist()
        for i in range(batch.num_images):
            a, b = bounds[i], bounds[i + 1]
            mine = float(ours[a:b][targets[a:b] != -100].mean())
            with torch.no_grad():
                theirs = hf(input_ids=batch.llm_ids[None, a:b], labels=batch.llm_labels[None, a:b],
                            pixel_values=batch.pixel_values[patches[i]:patches[i + 1]],
                            image_grid_thw=batch.grid_thw[i:i + 1]).loss
            assert mine == pytest.approx(float(theirs), abs=1e-5), f"sample {i}"
    finally:
        trainer.close()


def test_generated_answers_do_not_depend_on_what_else_shares_the_row(make):
    """Greedy answers of questions packed into one row equal each question's answer asked alone
    (sample bounds and M-RoPE positions keep them apart while they grow)."""
    import copy

    from finevit.eval.generate import generate_row, questions_of, rows_of

    cfg = make("generate", **{"data.llm.max_tokens": 384})
    task = Stage2Task(cfg)
    trainer = Trainer(cfg, task).setup()
    try:
        questions = [q for b in [next(trainer.loader) for _ in range(3)] for q in questions_of(b, task.tokenizer)]
        row = rows_of(questions, task.seq_length, cfg.data.max_tokens, max_new=5)[0]
        assert len(row) >= 2
        alone = [copy.deepcopy(q) for q in row]
        generate_row(task, trainer.ddp, trainer.pg, row, 5, cfg.data.max_tokens)
        for q in alone:
            generate_row(task, trainer.ddp, trainer.pg, [q], 5, cfg.data.max_tokens)
        assert [q.answer for q in row] == [q.answer for q in alone]
        assert all(0 < len(q.answer) <= 5 for q in row)
    finally:
        trainer.close()
