"""Checkpoint files: what `checkpoint.load` may name, and that no file of a handed-over
checkpoint runs code when it is read (each refusal has a control showing the payload is live)."""

import io
import logging
import os
import pickle
import re
import shutil

import pytest
import torch

from finevit.checkpointing import files
from finevit.train import main

from tiny_stage1 import DEMO_CONFIG, tiny_overrides


class Payload:
    """Unpickling it creates a directory: the visible trace of code run from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def source(dist, stage1_corpus, tmp_path_factory):
    """A run directory with one complete checkpoint (step 1), written by the trainer."""
    corpus, tokenizer = stage1_corpus
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main.train(DEMO_CONFIG, tiny_overrides(corpus, tokenizer, run, **{"schedule.stop_after_steps": 1})) == 0
    return run


@pytest.fixture
def copy(source, tmp_path):
    """A fresh copy of the source's step directory (to tamper with)."""
    step = tmp_path / "checkpoints" / "step_000001"
    shutil.copytree(source / "checkpoints" / "step_000001", step)
    return step


def test_load_names_a_step_a_checkpoints_or_a_run_directory(source, tmp_path):
    step = source / "checkpoints" / "step_000001"
    for given in (step, source / "checkpoints", source):
        assert files.resolve(given) == step
    (tmp_path / "empty").mkdir()
    shutil.copytree(step, tmp_path / "step_000002.tmp")
    shutil.copytree(step, tmp_path / "partial" / "step_000003")
    os.remove(tmp_path / "partial" / "step_000003" / files.STATE_FILE)
    cases = {
        tmp_path / "nowhere": "is not a directory: name a checkpoint (a step_* directory, a checkpoints "
                              "directory or a run directory)",
        tmp_path / "empty": "is not a finevit checkpoint: it holds no meta.json and no complete step_* "
                            "checkpoint (a step_* directory, a checkpoints directory or a run directory)",
        tmp_path / "step_000002.tmp": "is an unfinished save (a .tmp directory)",
        tmp_path / "partial": "step_000003 is not a complete finevit checkpoint (trainer_state.pt missing)",
    }
    for given, message in cases.items():
        with pytest.raises(files.CheckpointError, match=re.escape(message)):
            files.resolve(given)


def test_a_trainer_state_with_a_pickle_payload_is_refused_not_run(copy, tmp_path):
    state = files.read_state(copy)
    state["common"]["extra"] = Payload(tmp_path / "ran")
    torch.save(state, copy / files.STATE_FILE)
    with pytest.raises(files.CheckpointError, match="holds objects other than tensors and plain data"):
        files.read_state(copy)
    assert not (tmp_path / "ran").exists()
    torch.load(copy / files.STATE_FILE, weights_only=False)  # control: what finevit used to do
    assert (tmp_path / "ran").exists()


def test_a_dcp_metadata_with_a_pickle_payload_is_refused_not_run(copy, tmp_path):
    with open(copy / files.DCP_METADATA, "rb") as f:
        metadata = pickle.load(f)  # our own, trusted file
    metadata.planner_data = Payload(tmp_path / "ran")
    with open(copy / files.DCP_METADATA, "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(files.CheckpointError, match=r"global 'posix.mkdir' is not allowed"):
        files.verify_loadable(copy)
    assert not (tmp_path / "ran").exists()
    from torch.distributed.checkpoint import FileSystemReader

    FileSystemReader(str(copy)).read_metadata()  # control: torch.distributed.checkpoint runs it
    assert (tmp_path / "ran").exists()


def test_a_byte_item_with_a_pickle_payload_is_refused_not_run(copy, tmp_path):
    with open(copy / files.DCP_METADATA, "rb") as f:
        metadata = pickle.load(f)
    index, info = next((i, v) for i, v in metadata.storage_data.items() if i.fqn.startswith("common_state"))
    evil = io.BytesIO()
    torch.save(Payload(tmp_path / "ran"), evil)
    shard = copy / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(evil.getvalue())
    with open(shard, "ab") as f:
        f.write(evil.getvalue())
    with open(copy / files.DCP_METADATA, "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(files.CheckpointError, match="byte item 'common_state/shard_0_1' holds objects"):
        files.verify_loadable(copy)
    assert not (tmp_path / "ran").exists()
    with open(shard, "rb") as f:  # control: the bytes DCP's planner would torch.load(weights_only=False)
        f.seek(info.offset)
        torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    assert (tmp_path / "ran").exists()


def test_a_run_given_a_poisoned_checkpoint_stops_in_one_line_before_reading_it(
        copy, stage1_corpus, tmp_path, caplog):
    state = files.read_state(copy)
    state["rank_states"][0]["state"] = Payload(tmp_path / "ran")
    torch.save(state, copy / files.STATE_FILE)
    corpus, tokenizer = stage1_corpus
    overrides = tiny_overrides(corpus, tokenizer, tmp_path / "run", **{"checkpoint.load": copy.parent})
    with caplog.at_level(logging.ERROR, logger="finevit.train"):
        assert main.train(DEMO_CONFIG, overrides) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "trainer_state.pt holds objects other than tensors and plain data" in errors[0]
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()
