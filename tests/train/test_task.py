"""The task registry and the per-tower settings a config names by the task's tower names."""

import pytest

from finevit.config import load_config
from finevit.train.task import TASKS, Registered, task_class, task_problems

from tiny_stage1 import DEMO_CONFIG


@pytest.mark.parametrize("overrides, expected", [
    (["task=stage3"], ["task='stage3' is not one of stage1, stage2"]),
    (["optimizer.lr_mult={txt: 0.1}"], ["optimizer.lr_mult names txt, not a tower of stage1 (vision, text, loss)"]),
    (["optimizer.lr_mult={text: 0}"],
     ["optimizer.lr_mult.text=0.0 must be positive (freeze a tower with schedule.phases[].freeze)"]),
    (["schedule.phases=[{start_samples: 0, freeze: [vision, text, loss]}]"],
     ["schedule.phases[0] ('phase0') freezes every tower (vision, text, loss): nothing would train"]),
    (["optimizer.lr_mult={text: 0.1}", "schedule.phases=[{start_samples: 0, freeze: [text]}]"], []),
])
def test_tower_names_are_the_tasks(overrides, expected):
    assert task_problems(load_config(DEMO_CONFIG, overrides)) == expected


def test_every_registered_task_states_the_contract():
    for name in TASKS:
        cls = task_class(name)
        assert cls.name == name and cls.towers == TASKS[name].towers
        for method in ("preflight", "build", "init_weights", "batch_note", "build_loader", "start_step",
                       "inputs", "forward", "counts", "enter_phase", "evaluate", "extra_metrics"):
            assert callable(getattr(cls, method, None)), f"{name} lacks {method}"
        assert isinstance(getattr(cls, "seq_length", None), property), f"{name} lacks seq_length"


class PixelMeanTask:
    """A second stage written against the contract alone: the encoder regresses each merged
    token's mean pixel value. Nothing of the loop was edited to run it."""

    name, towers, step_metrics, step_rates = "pixel_mean", ("vision",), {}, ()

    def __init__(self, cfg):
        self.cfg = cfg

    def preflight(self) -> list[str]:
        return []

    def build(self, pg, parallel=None) -> list:
        from finevit.models.vision.build import build_vision_encoder

        return build_vision_encoder(self.cfg.model.vision, parallel or self.cfg.parallel, pg,
                                    dtype=self.cfg.precision.dtype, use_te=False)

    def init_weights(self, chunks, state) -> bool:
        state.task["phases_entered"] = []
        return False

    def batch_note(self, dp_size: int) -> str:
        return f"pixel-mean regression on {dp_size} data-parallel ranks"

    def build_loader(self, dp_rank: int, dp_size: int):
        from finevit.data import PatchSpec, build_loader

        return build_loader(self.cfg.data, PatchSpec.from_vision(self.cfg.model.vision), dp_rank, dp_size)

    @property
    def seq_length(self) -> int:
        return self.cfg.data.max_tokens

    def start_step(self, batches) -> None:
        pass

    def inputs(self, batch) -> dict:
        return {"pixel_values": batch.pixel_values, "grid_thw": batch.grid_thw, "n": batch.num_tokens}

    def forward(self, chunk, mb, collect=None):
        import torch.nn.functional as F
        from megatron.core.utils import unwrap_model

        out = chunk(mb["pixel_values"] if unwrap_model(chunk).pre_process else None, mb["grid_thw"], self.cfg.data.max_tokens)

        def loss_func(output):
            n = mb["n"] // 4  # merged tokens: 2x2 patches each, adjacent in the packed order
            target = mb["pixel_values"][:mb["n"]].reshape(n, -1).mean(-1)
            loss = F.mse_loss(output[:n, 0].float(), target)
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    def counts(self, batch):
        return batch.num_images, batch.num_tokens, batch.max_tokens, 0.0

    def enter_phase(self, phase, chunks, optimizer, state) -> None:
        state.task.setdefault("phases_entered", []).append(phase.index)

    def evaluate(self, chunks, pg, phase, step=None):
        return None

    def extra_metrics(self, chunks) -> dict:
        return {}


def test_a_new_task_trains_and_resumes_on_the_unchanged_loop(dist, stage1_corpus, tmp_path, monkeypatch):
    import json

    from finevit.checkpointing.files import find_latest, read_state
    from finevit.train import main
    from tiny_stage1 import tiny_overrides

    monkeypatch.setitem(TASKS, "pixel_mean", Registered(f"{__name__}:PixelMeanTask", ("vision",)))
    corpus, tokenizer = stage1_corpus

    def run(name: str, *extra: str) -> dict:
        assert main.train(DEMO_CONFIG, [*tiny_overrides(corpus, tokenizer, tmp_path / name), "task=pixel_mean",
                                        *extra]) == 0
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

    reference = run("full")
    run("split", "schedule.stop_after_steps=3")
    assert run("split") == reference and len(reference) > 3
    state = read_state(find_latest(tmp_path / "split" / "checkpoints"))["common"]["train"]["task"]
    assert state["phases_entered"][0] == 0 and 1 in state["phases_entered"]  # the task's state was kept
