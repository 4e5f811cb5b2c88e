"""`finevit train` / `finevit eval` entry points: errors as one line, eval leaves the run alone."""

import logging

from finevit.train import main

from tiny_stage1 import DEMO_CONFIG, tiny_overrides


def test_eval_reads_the_run_and_needs_a_checkpoint(dist, stage1_corpus, tmp_path, caplog, capsys):
    corpus, tokenizer = stage1_corpus
    overrides = tiny_overrides(corpus, tokenizer, tmp_path / "run", **{"schedule.stop_after_steps": 1})
    with caplog.at_level(logging.ERROR, logger="finevit.train"):
        assert main.evaluate(DEMO_CONFIG, overrides) == 2
    assert "there is no checkpoint in" in caplog.text and not (tmp_path / "run" / "config.yaml").exists()
    assert main.train(DEMO_CONFIG, overrides) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert main.evaluate(DEMO_CONFIG, overrides + ["optimizer.lr=0.005", "eval.max_samples=7"]) == 0
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # still the training run's
    out = capsys.readouterr().out
    assert "i2t_r1=" in out and "pairs=7 " in out  # exactly eval.max_samples, though batches are packed


def test_a_missing_checkpoint_to_load_is_one_line(dist, stage1_corpus, tmp_path, caplog):
    corpus, tokenizer = stage1_corpus
    overrides = tiny_overrides(corpus, tokenizer, tmp_path / "run", **{"checkpoint.load": tmp_path / "nope"})
    with caplog.at_level(logging.ERROR, logger="finevit.train"):
        assert main.train(DEMO_CONFIG, overrides) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"checkpoint.load={tmp_path / 'nope'} is not a directory: name a checkpoint (a step_* directory "
        "or a checkpoints directory)"]
