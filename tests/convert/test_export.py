"""`make convert-checkpoint` of a stage-1 run: Hugging Face directories that a process without
finevit loads with transformers + safetensors and that embed images and captions as finevit does;
every unusable source or destination is one sentence."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_stage1

HERE = Path(__file__).parent
VENV = Path(sys.executable).parent.parent


@pytest.fixture(scope="module")
def run_dir(dist, stage1_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage1")
    tiny_stage1.stage1_run(*map(str, stage1_corpus), run, steps=3)
    return run


def convert(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(["make", "-s", "-o", "install", "convert-checkpoint", f"VENV={VENV}", *args],
                          cwd=tiny_stage1.ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_an_exported_stage1_run_embeds_as_finevit_does_without_finevit(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from finevit.convert.export import load_stage1, source_checkpoint
    from finevit.config.load import config_from_yaml
    from finevit.checkpointing.files import read_state

    out = tmp_path / "export"
    proc = convert(f"RUN={run_dir}", f"OUT={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name for p in out.iterdir()} >= {"vision", "text", "head.safetensors", "README.md", "config.yaml"}
    card = (out / "README.md").read_text()
    assert "| step | 3 |" in card and "| stage | stage1 |" in card

    step = source_checkpoint(str(run_dir))
    cfg = config_from_yaml(read_state(step)["common"]["config"])
    model, _ = load_stage1(cfg, step)
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.model.vision.patch_dim, generator=g)
    captions = [torch.randint(4, 384, (n,), generator=g).tolist() + [3] for n in (5, 9)]  # ids, end-of-text
    lengths = torch.tensor([len(c) for c in captions])
    ids = torch.zeros(2, int(lengths.max()), dtype=torch.int64)
    for row, c in zip(ids, captions):
        row[:len(c)] = torch.tensor(c)
    cu = torch.tensor([0, 24, 28], dtype=torch.int32)
    with torch.no_grad():
        images, texts = model(pixels, grid, cu, 28, ids, lengths, None)
    images, texts = (torch.nn.functional.normalize(t, dim=-1) for t in (images, texts))

    inputs, result = tmp_path / "inputs.safetensors", tmp_path / "hf.safetensors"
    save_file({"pixel_values": pixels, "grid_thw": grid, **{f"text_{i}": torch.tensor(c) for i, c in enumerate(captions)}},
              str(inputs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    hf = subprocess.run([sys.executable, str(HERE / "hf_stage1_embed.py"), str(out), str(inputs), str(result)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert hf.returncode == 0, hf.stderr[-3000:]
    theirs = load_file(str(result))
    torch.testing.assert_close(theirs["images"], images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs["texts"], texts, atol=1e-4, rtol=1e-4)
    loss = model.loss
    expected = loss.logit_scale.exp() * images @ texts.T + loss.logit_bias
    torch.testing.assert_close(theirs["logits"], expected.detach(), atol=1e-3, rtol=1e-4)
    _round_trip_stage1(model, cfg, out)


def _round_trip_stage1(model, cfg, out):
    """finevit -> HF -> finevit is exact: stage 2 starts its encoder from the exported vision/
    (model.vision.init_from) and stage 1 its text tower from text/ (model.text.init_from)."""
    import dataclasses

    from megatron.core.process_groups_config import ProcessGroupCollection

    from finevit.config import ModelConfig, ParallelConfig
    from finevit.convert.siglip_text import check_hf_text_dir, load_hf_text, read_hf_text_dir
    from finevit.models.siglip import build_siglip
    from finevit.models.vlm import build_vlm
    from finevit.train.stage2_init import load_vision, vision_source_problems
    from tiny_llm import TINY

    pg = ProcessGroupCollection.use_mpu_process_groups()
    vision = dataclasses.replace(cfg.model.vision, init_from=str(out / "vision"), merger=True,
                                 out_hidden_size=TINY.hidden_size)
    assert vision_source_problems(vision, TINY.hidden_size) == []
    assert "a merger here, none there" in vision_source_problems(
        dataclasses.replace(vision, init_projector=True), TINY.hidden_size)[0]
    vlm = build_vlm(ModelConfig(vision=vision, llm=TINY), ParallelConfig(), pg, dtype="fp32", use_te=False)
    load_vision([vlm], vision, 0, 1)
    theirs = dict(vlm.vision.named_parameters())
    for name, p in model.vision.named_parameters():
        assert torch.equal(theirs[name], p), name
    check_hf_text_dir(str(out / "text"), cfg.model.text, cfg.model.contrastive.embed_dim)
    (fresh,) = build_siglip(cfg.model, ParallelConfig(), pg, dtype="fp32", use_te=False)
    load_hf_text(fresh.text, read_hf_text_dir(str(out / "text")))
    theirs = dict(fresh.text.named_parameters())
    for name, p in model.text.named_parameters():
        assert torch.equal(theirs[name], p), name


def test_what_cannot_be_exported_is_one_sentence(run_dir, tmp_path, capsys):
    from finevit.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "notarun").mkdir()
    unfinished = tmp_path / "unfinished" / "checkpoints" / "step_000004.tmp"
    unfinished.mkdir(parents=True)
    cases = {
        (str(tmp_path / "notarun"), "--out", str(tmp_path / "a")): "is not a finevit checkpoint",
        (str(unfinished), "--out", str(tmp_path / "a")): "unfinished",
        (str(run_dir), "--out", str(tmp_path / "b"), "--step", "7"): "step 7 of",
        (str(run_dir), "--out", str(tmp_path / "full")): "is not empty: choose another OUT or pass --overwrite",
    }
    for args, expected in cases.items():
        assert main(["convert", *args]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("finevit convert: ") and expected in line, line
    assert (tmp_path / "full" / "x").read_text() == "x" and not (tmp_path / "a").exists()  # nothing touched


def _exported_stage2_run(stage2_corpus, tmp_path, **overrides):
    """A tiny stage-2 run of a few steps exported with the make target: (export dir, the run's
    saved config, its model loaded back at TP=1 on new groups: the trainer's are gone)."""
    from finevit.checkpointing.files import read_state
    from finevit.config.load import config_from_yaml
    from finevit.convert.export import load_stage2, source_checkpoint
    from finevit.train.stage2 import Stage2Task
    from finevit.train.trainer import Trainer
    from tiny_stage2 import tiny_config

    cfg = tiny_config(*map(str, stage2_corpus), tmp_path / "run", **overrides)
    trainer = Trainer(cfg, Stage2Task(cfg)).setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    out = tmp_path / "export"
    proc = convert(f"RUN={tmp_path / 'run'}", f"OUT={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    step = source_checkpoint(str(tmp_path / "run"))
    saved = config_from_yaml(read_state(step)["common"]["config"])
    model, _ = load_stage2(saved, step)
    return out, saved, model


def test_an_exported_stage2_run_loads_in_transformers_and_answers_as_finevit_does(
        dist, stage2_corpus, tmp_path):
    """The VLM directory: AutoModelForImageTextToText + AutoProcessor load it in a process without
    finevit; on the processor's input, HF's logits equal finevit's within 1e-4 and HF's greedy
    `generate` writes the tokens finevit's own greedy decoding (eval/generate.py) writes."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from safetensors.torch import load_file

    from finevit.data.demo import demo_scene, render
    from finevit.eval.generate import Question, generate_row
    from finevit.models.llm.packing import segments
    from finevit.models.vlm import mrope_positions
    from finevit.train.stage2 import Stage2Task

    out, saved, model = _exported_stage2_run(stage2_corpus, tmp_path, **{"schedule.stop_after_steps": 3})
    image = tmp_path / "scene.png"
    render(demo_scene(0, "finecap", "heldout", 3)).save(image)
    result = tmp_path / "hf.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    hf = subprocess.run([sys.executable, str(HERE / "hf_vlm_generate.py"), str(out), str(image),
                         "Describe this image in detail.", str(result), "6"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert hf.returncode == 0, hf.stderr[-3000:]
    theirs = load_file(str(result))

    pg = ProcessGroupCollection.use_mpu_process_groups()
    task = Stage2Task(saved)
    task.pg = pg
    ids, grid, pixels = theirs["input_ids"][0], theirs["image_grid_thw"], theirs["pixel_values"]
    params = segments([len(ids)], len(ids))
    mask = ids == task.tokenizer.image_id
    with torch.no_grad():
        ours = model(pixels, grid, ids[None], mask, mrope_positions(mask, params.cu_seqlens, grid // torch.tensor([1, 2, 2])),
                     params, pixels.shape[0])
    torch.testing.assert_close(ours, theirs["logits"], atol=1e-4, rtol=1e-4)
    question = Question(ids.tolist(), pixels, tuple(grid[0].tolist()), "caption", "", [])
    generate_row(task, [model], pg, [question], 6, saved.data.max_tokens)
    end = task.tokenizer.ids["im_end"]
    generated = theirs["generated"].tolist()
    expected = question.answer[:question.answer.index(end) + 1] if end in question.answer else question.answer
    assert generated[:len(expected)] == expected and len(expected) > 0
    _round_trip_stage2(model, saved, out, pg)


def _round_trip_stage2(model, cfg, out, pg):
    """finevit -> HF -> finevit is exact: a VLM whose encoder, projector and LLM start from the
    exported directory (model.vision.init_from + init_projector, model.llm.init_from) is the run's."""
    import dataclasses

    from finevit.config import ParallelConfig
    from finevit.convert.qwen2 import check_hf_llm_dir
    from finevit.models.vlm import build_vlm
    from finevit.train.stage2_init import load_llm, load_vision, vision_source_problems

    vision = dataclasses.replace(cfg.model.vision, init_from=str(out), init_projector=True)
    llm = dataclasses.replace(cfg.model.llm, init_from=str(out))
    assert vision_source_problems(vision, llm.hidden_size) == []
    check_hf_llm_dir(str(out), llm)
    again = build_vlm(dataclasses.replace(cfg.model, vision=vision, llm=llm), ParallelConfig(), pg,
                      dtype="fp32", use_te=False)
    load_vision([again], vision, 0, 1)
    load_llm([again], llm, 0, 1)
    theirs = dict(again.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name


def test_a_qwen3_stage2_run_exports_as_a_vision_tower_and_a_causal_lm(dist, stage2_corpus, tmp_path):
    """No Hugging Face class pairs a Qwen3 LLM with this encoder: the export is vision/ (encoder +
    projector) and llm/ (Qwen3ForCausalLM + tokenizer), loaded without finevit, equal to finevit's
    projector rows and text logits within 1e-4; the model card says how they fit together."""
    from safetensors.torch import load_file, save_file

    from finevit.models.llm.packing import segments, text_positions

    out, saved, model = _exported_stage2_run(stage2_corpus, tmp_path, **{
        "schedule.stop_after_steps": 2, "model.llm.family": "qwen3", "model.llm.head_dim": 24,
        "model.llm.mrope_section": "[4, 4, 4]"})
    assert "Qwen3ForCausalLM" in (out / "README.md").read_text() and "M-RoPE" in (out / "README.md").read_text()
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), saved.model.vision.patch_dim, generator=g)
    ids = torch.randint(0, 300, (9,), generator=g)
    params = segments([len(ids)], len(ids))
    with torch.no_grad():
        images = model.vision(pixels, grid)
        logits = model(pixels, grid, ids[None], torch.zeros_like(ids, dtype=torch.bool), text_positions(params), params)
    inputs, result = tmp_path / "inputs.safetensors", tmp_path / "hf.safetensors"
    save_file({"pixel_values": pixels, "grid_thw": grid, "input_ids": ids}, str(inputs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    hf = subprocess.run([sys.executable, str(HERE / "hf_parts_forward.py"), str(out), str(inputs), str(result)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert hf.returncode == 0, hf.stderr[-3000:]
    theirs = load_file(str(result))
    torch.testing.assert_close(theirs["images"], images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs["logits"], logits, atol=1e-4, rtol=1e-4)
