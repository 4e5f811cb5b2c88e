"""Step metrics to stdout and TensorBoard, from one rank; timers; the accelerator's peak for MFU."""

import json
import logging
import os
import time
from collections import defaultdict
from typing import Optional

import torch

log = logging.getLogger("finevit.train")

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; FINEVIT_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def peak_tflops() -> Optional[float]:
    if os.environ.get("FINEVIT_PEAK_TFLOPS"):
        return float(os.environ["FINEVIT_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def throughput(steps: list[dict], seconds: float, gpus: int, peak: Optional[float] = None) -> dict:
    """Rates over `steps` (each with global counts: images, tokens, slots, model flops) that took
    `seconds` on `gpus` GPUs. Model FLOPs per GPU count the model's arithmetic only (no
    recomputation), so MFU compares layouts and clusters fairly."""
    total = {k: sum(s[k] for s in steps) for k in ("images", "tokens", "slots", "flops")}
    tflops = total["flops"] / gpus / seconds / 1e12
    out = {"images_per_s": total["images"] / seconds, "tokens_per_s": total["tokens"] / seconds,
           "padding": 1 - total["tokens"] / total["slots"] if total["slots"] else 0.0,
           "tflops_per_gpu": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out


class Timers:
    """Wall time per named section, summed since the last `pop` (synchronising CUDA first)."""

    def __init__(self):
        self.totals, self._start = defaultdict(float), {}

    def start(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - self._start.pop(name)

    def pop(self) -> dict:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


class MetricsLogger:
    """Writes on the reporting rank only (the last pipeline stage's first TP/DP rank)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled, self.writer = enabled, None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        line = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        log.info("%s step %d | %s", prefix, step, line)
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": prefix, "step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report(run_dir: str) -> int:
    """`finevit report`: first vs last evaluation and the last training step of a run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        print(f"finevit report: {path} does not exist (no step was logged in {run_dir})")
        return 1
    rows = _latest_per_step(read_rows(path))
    evals = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        t = train[-1]
        print(f"last step {t['step']}: {t['samples']} samples, loss {t['loss']:.4f}, "
              f"{t['images_per_s']:.1f} images/s, phase {t['phase']}")
    shown = [evals[0], evals[-1]] if len(evals) > 1 else evals
    if evals and "i2t_r1" in evals[-1]:
        print(f"held-out retrieval ({evals[-1].get('pairs')} pairs, chance R@1 "
              f"{evals[-1].get('chance_r1', 0):.3f}):")
        _table(shown, ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"))
    for name in (k[:-len("_top1")] for k in (evals[-1] if evals else {}) if k.endswith("_top1")):
        print(f"zero-shot classification '{name}' ({evals[-1].get(name + '_images')} images, "
              f"chance top-1 {evals[-1].get(name + '_chance', 0):.3f}):")
        _table(shown, (f"{name}_top1", f"{name}_top5"))
    if evals and "answer_loss" in evals[-1]:
        _report_vlm(run_dir, shown)
    return 0


# Stage 2's generated-answer metrics, by FineCap task (eval/vlm.py).
VLM_TABLES = (("grounding (greedy box answers: share with IoU >= 0.5, mean IoU)",
               ("text_to_box_acc50", "text_to_box_miou", "ocr_to_box_acc50", "ocr_to_box_miou")),
              ("region and page reading (greedy answers: exact match, token F1)",
               ("box_to_text_exact", "box_to_text_f1", "box_to_ocr_exact", "box_to_ocr_f1", "caption_f1")))


def _report_vlm(run_dir: str, shown: list) -> None:
    last = shown[-1]
    print(f"held-out answers ({last.get('samples')} samples, {last.get('answer_tokens')} answer tokens):")
    _table(shown, ("answer_loss",))
    for title, keys in VLM_TABLES:
        print(title + ":")
        _table(shown, keys)
    answers = os.path.join(run_dir, "eval", f"answers_step{last['step']:06d}.jsonl")
    if os.path.exists(answers):
        print(f"examples at step {last['step']} ({answers}):")
        for e in read_rows(answers):
            print(f"  [{e['task']}] {e['question']}\n      answer: {e['answer']!r}   reference: {e['reference']!r}")


def read_rows(path: str) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a killed process is left out."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _latest_per_step(rows) -> list:
    """A resumed run logs again the steps after its checkpoint (and a run restarted without one
    logs from step 0 again): the latest line of a step is the one that the run's state follows."""
    latest = {(r["kind"], r["step"]): r for r in rows}
    return sorted(latest.values(), key=lambda r: r["step"])


def _table(rows: list, keys: tuple) -> None:
    print("  " + "step".rjust(8) + "".join(k.rjust(max(9, len(k) + 1)) for k in keys))
    for r in rows:
        print("  " + str(r["step"]).rjust(8)
              + "".join(f"{r[k]:{max(9, len(k) + 1)}.3f}" if k in r else "-".rjust(max(9, len(k) + 1))
                        for k in keys))
