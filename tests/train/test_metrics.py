"""`finevit report` over a run directory's metrics.jsonl."""
import json

from finevit.train.metrics import report


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
