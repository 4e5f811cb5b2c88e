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
        f"checkpoint.load={tmp_path / 'nope'} is not a directory: name a checkpoint (a step_* directory"
        ", a checkpoints directory or a run directory)"]


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_every_named_file_is_checked_before_the_run_starts(dist, stage1_corpus, tmp_path, caplog):
    corpus, tokenizer = stage1_corpus
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    overrides = tiny_overrides(corpus, tokenizer, tmp_path / "run", **{
        "data.tokenizer": "/nonexistent.model", "eval.corpora": f"[{{path: {tmp_path}/nowhere}}]",
        "checkpoint.load": tmp_path / "not_a_checkpoint", "eval.at_start": True})
    with caplog.at_level(logging.ERROR, logger="finevit.train"):
        assert main.train(DEMO_CONFIG, overrides) == 2
    assert errors_of(caplog) == [
        f"eval.corpora: {tmp_path}/nowhere is not a finevit corpus (no finevit_corpus.json); build it with "
        "data_tools/build_shards.py",
        "data.tokenizer=/nonexistent.model does not exist: name a sentencepiece .model file "
        "(data_tools/train_tokenizer.py trains one from a corpus)",
        f"checkpoint.load={tmp_path}/not_a_checkpoint is not a finevit checkpoint: it holds no meta.json and no "
        "complete step_* checkpoint (a step_* directory, a checkpoints directory or a run directory)"]
    assert not (tmp_path / "run").exists()  # nothing started
    caplog.clear()
    bad = {"data.tokenizer": tmp_path / "garbage.model"}
    with caplog.at_level(logging.ERROR, logger="finevit.train"):
        assert main.train(DEMO_CONFIG, tiny_overrides(corpus, tokenizer, tmp_path / "run", **bad)) == 2
        assert main.train(DEMO_CONFIG, tiny_overrides(corpus, tokenizer, tmp_path / "run", **{
            "model.text.vocab_size": 300})) == 2
    (garbage, small) = errors_of(caplog)
    assert garbage.startswith(f"data.tokenizer={tmp_path}/garbage.model is not a sentencepiece model (")
    assert small == f"data.tokenizer={tokenizer} has 384 pieces but model.text.vocab_size=300: set " \
                    "model.text.vocab_size to at least that"


def test_a_corpus_that_goes_bad_stops_the_run_with_a_checkpoint_and_the_reasons(
        dist, stage1_corpus, tmp_path, caplog):
    from finevit.data.corpus import CorpusWriter, open_corpus

    corpus, tokenizer = stage1_corpus
    # The demo corpus's first 40 records, then records whose images are cut short (a shard that
    # went bad on the filesystem), in stream order.
    path = tmp_path / "corpus" / "recaption" / "train"
    with open_corpus(f"{corpus}/recaption/train") as good, CorpusWriter(str(path), "recaption") as w:
        for i in range(96):
            rec = dict(good[i])
            if i >= 40:
                rec["image"] = rec["image"][:100]
            w.write({k: rec[k] for k in ("id", "image", "width", "height", "captions", "source")})
    overrides = tiny_overrides(tmp_path / "corpus", tokenizer, tmp_path / "run", **{
        "data.shuffle_algo": "none", "data.bad_samples.window": 20, "data.bad_samples.max_fraction": 0.5,
        "eval.corpora": f"[{{path: {corpus}/recaption/heldout}}]"})
    with caplog.at_level(logging.ERROR, logger="finevit.train"):
        assert main.train(DEMO_CONFIG, overrides) == 1
    (error,) = errors_of(caplog)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert error.startswith("data: 11 of the last 20 samples on data-parallel rank 0 could not be used "
                            "(corrupt_image 11; last: re-train-0000050: corrupt_image: cannot decode image")
    assert error.endswith(f"or change data.bad_samples.max_fraction; stopped with a checkpoint of step "
                          f"{int(latest.split('_')[1])} in {tmp_path}/run/checkpoints")
