"""Step metrics: the rates, the logger (stdout, metrics.jsonl, TensorBoard), `finevit report`."""

import json

import pytest

from finevit.train.metrics import MetricsLogger, report, throughput


def _write(run_dir, rows):
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _train(step, loss):
    return {"kind": "train", "step": step, "samples": step * 8, "loss": loss, "images_per_s": 5.0,
            "phase": 0}


def _eval(step, r1):
    return {"kind": "eval", "step": step, "i2t_r1": r1, "i2t_r5": r1, "t2i_r1": r1, "t2i_r5": r1,
            "pairs": 100, "chance_r1": 0.01, "shapes_top1": r1, "shapes_top5": r1,
            "shapes_images": 100, "shapes_chance": 0.03125}


def test_report_keeps_the_latest_line_of_each_step_across_restarts(tmp_path, capsys):
    # First attempt killed before its first checkpoint; the second starts again from step 0,
    # then crashes after step 20 with a checkpoint at 10, and the third replays 20.
    _write(tmp_path, [_eval(0, 0.5), _train(10, 9.0), _eval(0, 0.01), _train(10, 4.0),
                      _train(20, 3.5), _train(20, 3.0), _eval(20, 0.25)])
    assert report(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "last step 20: 160 samples, loss 3.0000" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    # retrieval then classification: first evaluation (the restarted run's step 0) and last
    assert rows == [["0", "0.010", "0.010", "0.010", "0.010"], ["20", "0.250", "0.250", "0.250", "0.250"],
                    ["0", "0.010", "0.010"], ["20", "0.250", "0.250"]]


def test_report_without_metrics_says_so(tmp_path, capsys):
    assert report(str(tmp_path)) == 1
    assert "does not exist" in capsys.readouterr().out


def test_throughput_counts_global_work_over_every_gpu():
    # Two steps of a DP=4 x TP=2 run (8 GPUs): counts are global (summed over the 4 replicas).
    steps = [{"images": 40, "tokens": 900, "slots": 1000, "flops": 4e15},
             {"images": 24, "tokens": 700, "slots": 1000, "flops": 4e15}]
    out = throughput(steps, seconds=2.0, gpus=8, peak=1000.0)
    assert out["images_per_s"] == 32 and out["tokens_per_s"] == 800
    assert out["padding"] == pytest.approx(0.2)
    assert out["tflops_per_gpu"] == pytest.approx(500.0)  # 8e15 FLOPs / 8 GPUs / 2 s
    assert out["mfu"] == pytest.approx(0.5)
    assert "mfu" not in throughput(steps, 2.0, 8)  # no known peak (CPU): no MFU


def test_logger_writes_stdout_jsonl_and_tensorboard(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=True)
    with caplog.at_level("INFO", logger="finevit.train"):
        logger.log(3, {"loss": 1.25, "phase": 0, "note": "text"})
    logger.close()
    assert "train step 3 | loss 1.25 | phase 0 | note text" in caplog.text
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "kind": "train", "step": 3, "loss": 1.25, "phase": 0, "note": "text"}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/phase"]  # numbers only
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 1.25)]


def test_disabled_logger_writes_nothing(tmp_path):
    MetricsLogger(str(tmp_path), enabled=False).log(1, {"loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_report_of_a_stage2_run_shows_answer_metrics_and_example_answers(tmp_path, capsys):
    vlm = {"answer_loss": 6.9, "answer_tokens": 300, "samples": 64, "text_to_box_acc50": 0.0,
           "text_to_box_miou": 0.01, "box_to_text_exact": 0.0, "box_to_text_f1": 0.1, "caption_f1": 0.2}
    done = dict(vlm, answer_loss=0.5, text_to_box_acc50=0.75, box_to_text_f1=0.9)
    _write(tmp_path, [{"kind": "eval", "step": 0, **vlm}, _train(10, 2.0), {"kind": "eval", "step": 10, **done}])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "answers_step000010.jsonl").write_text(json.dumps(
        {"task": "text_to_box", "question": 'Locate "a red circle".', "reference": "[0, 0, 9, 9]",
         "answer": "[0, 0, 9, 8]"}) + "\n")
    assert report(str(tmp_path)) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    # answer loss, grounding (no OCR questions: "-"), reading: first and last evaluation
    assert rows[:4] == [["0", "6.900"], ["10", "0.500"], ["0", "0.000", "0.010", "-", "-"],
                        ["10", "0.750", "0.010", "-", "-"]]
    assert "answer: '[0, 0, 9, 8]'   reference: '[0, 0, 9, 9]'" in out
