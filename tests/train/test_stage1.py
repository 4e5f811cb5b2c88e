"""Stage 1 as a task: what it tells the user about its contrastive batch."""

from finevit.train.stage1 import Stage1Task

from tiny_stage1 import tiny_config


def test_batch_note_names_the_contrastive_batch_and_groups(tmp_path):
    one = Stage1Task(tiny_config(tmp_path, tmp_path / "t.model", tmp_path)).batch_note(4)
    assert "on each of 4 data-parallel ranks" in one and "one contrastive group per step" in one
    cfg = tiny_config(tmp_path, tmp_path / "t.model", tmp_path, **{"schedule.micro_batches_per_step": 3})
    assert "3 separate contrastive groups per step" in Stage1Task(cfg).batch_note(2)
