"""Stage 1 as a task: what it says about its contrastive batch; a text tower imported from HF."""

import dataclasses
import re

import torch

from finevit.convert.siglip_text import hf_config_from_text, hf_to_canonical
from finevit.train.stage1 import Stage1Task
from finevit.train.trainer import Trainer

from tiny_stage1 import tiny_config


def test_batch_note_names_the_contrastive_batch_and_groups(tmp_path):
    one = Stage1Task(tiny_config(tmp_path, tmp_path / "t.model", tmp_path)).batch_note(4)
    assert "on each of 4 data-parallel ranks" in one and "one contrastive group per step" in one
    cfg = tiny_config(tmp_path, tmp_path / "t.model", tmp_path, **{"schedule.micro_batches_per_step": 3})
    assert "3 separate contrastive groups per step" in Stage1Task(cfg).batch_note(2)


def _save_hf_text(cfg, path, positions=16, **changes):
    """A random SigLIP2 text tower shaped like cfg.model.text (with `changes`), saved as HF does."""
    from transformers import Siglip2TextModel

    torch.manual_seed(5)
    text = dataclasses.replace(cfg.model.text, **changes)
    config = hf_config_from_text(text, cfg.model.contrastive.embed_dim, siglip2=True, hf_positions=positions)
    hf = Siglip2TextModel(config)
    hf.save_pretrained(path)
    return hf


def test_text_tower_starts_from_a_hugging_face_siglip2_directory(dist, stage1_corpus, tmp_path):
    corpus, tokenizer = stage1_corpus
    extra = {"model.text.pooling": "last", "model.text.init_from": tmp_path / "hf", "schedule.stop_after_steps": 1,
             "schedule.phases": "[{start_samples: 0, max_text_len: 32, freeze: [text]}]"}
    cfg = tiny_config(corpus, tokenizer, tmp_path / "run", **extra)
    hf = _save_hf_text(cfg, tmp_path / "hf", positions=16)
    expected = hf_to_canonical(hf.state_dict(), cfg.model.text, cfg.model.contrastive.embed_dim)
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        text = trainer.chunks[-1].text
        for name, value in text.state_dict().items():
            if name in expected and "position" not in name:
                assert torch.equal(value, expected[name]), name
        # HF's 16 trained position rows, stretched over the first phase's 32 (ends kept).
        assert trainer.state.task["text_positions"] == 32
        rows = text.position_embeddings.weight.detach()
        hf_rows = hf.state_dict()["text_model.embeddings.position_embedding.weight"]
        assert torch.equal(rows[0], hf_rows[0]) and torch.allclose(rows[31], hf_rows[15], atol=1e-6)
        trainer.train()  # frozen: still HF's weights after a step
        assert torch.equal(text.word_embeddings.weight, expected["word_embeddings.weight"])
    finally:
        trainer.close()
    # Another shape is refused before anything is built, naming each difference.
    _save_hf_text(cfg, tmp_path / "other", num_layers=2, hidden_size=64)
    cfg = tiny_config(corpus, tokenizer, tmp_path / "run2", **{**extra, "model.text.init_from": tmp_path / "other"})
    (problem,) = Stage1Task(cfg).preflight()
    assert re.match(r"^model.text does not match the text tower in .*other: "
                    r"num_layers 1 here, 2 there; hidden_size 32 here, 64 there\.$", problem)
