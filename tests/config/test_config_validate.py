"""Validation: every kind of invalid config is reported in one sentence naming keys and values."""

import pytest

from finevit.config import Config, ConfigError, load_config, validate
from finevit.train.task import check_config

TINY = ["model.vision.num_layers=2", "model.vision.hidden_size=64", "model.vision.num_heads=4",
        "model.vision.ffn_hidden_size=128", "model.vision.out_hidden_size=64"]


def problems(overrides, world_size=None) -> list:
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, overrides), world_size)  # shared sections, then stage 1's
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def test_valid_configs_pass_unchanged():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"])
    assert validate(cfg, world_size=8) is cfg
    assert validate(Config()) == Config()


# Defaults are finevit-0.9b: 28 layers, width 1536, 16 heads, ffn 4608, patch 14, max_tokens 16384.
CASES = [
    (["parallel.tensor=3"], None,
     "model.vision.num_heads=16 is not divisible by parallel.tensor=3"),
    (["parallel.tensor=2", "model.vision.ffn_hidden_size=4607"], None,
     "model.vision.ffn_hidden_size=4607 is not divisible by parallel.tensor=2"),
    (["model.vision.hidden_size=1000"], None,
     "model.vision.hidden_size=1000 is not divisible by model.vision.num_heads=16"),
    (["model.vision.hidden_size=1120"], None,
     "model.vision head dim 70 (hidden_size/num_heads) must be divisible by 4 for 2D rotary embeddings"),
    (["model.vision.num_layers=0"], None, "model.vision.num_layers=0 must be a positive integer"),
    (["model.vision.window_layers=[0, 28]"], None,
     "model.vision.window_layers [28] are outside [0, num_layers=28)"),
    (["model.vision.window_layers=[3, 3]"], None,
     "model.vision.window_layers [3, 3] lists a layer more than once"),
    (["model.vision.window_layers=[0]", "model.vision.window_size=100"], None,
     "model.vision.window_size=100 must be a positive multiple of patch_size x spatial_merge_size = 28"),
    (["parallel.pipeline=3"], None,
     "model.vision.num_layers=28 is not divisible by the 3 pipeline chunks "
     "(parallel.pipeline=3 x parallel.virtual_pipeline=1)"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], None,
     "model.vision.num_layers=28 is not divisible by the 8 pipeline chunks "
     "(parallel.pipeline=2 x parallel.virtual_pipeline=4)"),
    (["parallel.virtual_pipeline=2"], None, "parallel.virtual_pipeline=2 needs parallel.pipeline >= 2, got 1"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=1"], None,
     "parallel.virtual_pipeline=1 must be at least 2 (or null to disable it)"),
    (["parallel.sequence_parallel=true"], None, "parallel.sequence_parallel=true needs parallel.tensor > 1"),
    (["parallel.tensor=8", "parallel.sequence_parallel=true", "data.max_tokens=16388", "model.text.num_heads=16"], None,
     "data.max_tokens=16388 is not divisible by parallel.tensor=8, which sequence parallelism requires"),
    (["parallel.recompute=some"], None, "parallel.recompute='some' is not one of none, selective, full"),
    (["parallel.distributed_optimizer=false", "parallel.overlap_param_gather=true"], None,
     "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
    (["parallel.tensor=2", "parallel.pipeline=2"], 6,
     "world size 6 is not divisible by parallel.tensor x parallel.pipeline = 2 x 2"),
    ([], 0, "world size 0 must be a positive integer"),
    (["schedule.micro_batches_per_step=0"], None, "schedule.micro_batches_per_step=0 must be a positive integer"),
    (["data.max_tokens=1000"], None,
     "data.max_tokens=1000 is smaller than the 1024 patches of an image at data.max_pixels=200704"),
    (["data.max_tokens=16386"], None, "data.max_tokens=16386 must be a multiple of 4 (one merged token)"),
    (["data.max_tokens=2"], None, "data.max_tokens=2 cannot hold even one 28x28 image"),
    (["data.min_pixels=300000"], None,
     "data.min_pixels=300000 and data.max_pixels=200704 must satisfy 0 < min <= max"),
    (["data.shuffle_algo=random"], None,
     "data.shuffle_algo='random' is not one of py1e, py1br, py1s, py2s, naive, none"),
    (["data.corpora=[{path: ''}]"], None, "data.corpora[0].path is empty"),
    (["data.corpora=[{path: a, weight: 1}, {path: b}]"], None,
     "data.corpora must give a weight to every corpus or to none"),
    (["optimizer.lr=0"], None, "optimizer.lr=0.0 must be positive"),
    (["optimizer.min_lr=0.1"], None, "optimizer.min_lr=0.1 must lie in [0, optimizer.lr=0.001]"),
    (["optimizer.beta2=1.0"], None, "optimizer betas (0.9, 1.0) must lie in [0, 1)"),
    (["optimizer.name=lamb"], None, "optimizer.name='lamb' is not one of adam, sgd"),
    (["schedule.warmup_samples=2000000"], None,
     "schedule.warmup_samples=2000000 exceeds schedule.train_samples=1000000"),
    (["schedule.decay_style=wsd", "schedule.wsd_decay_fraction=0"], None,
     "schedule.wsd_decay_fraction=0.0 must lie in (0, 1]"),
    (["precision.dtype=fp8"], None, "precision.dtype='fp8' is not one of bf16, fp16, fp32"),
    (["checkpoint.keep_last=0"], None, "checkpoint.keep_last=0 must be a positive integer"),
    (["checkpoint.optimizer_format=torch"], None,
     "checkpoint.optimizer_format='torch' is not one of fully_reshardable, dp_reshardable"),
    (["model.llm.num_kv_heads=5"], None, "model.llm.num_heads=12 is not divisible by model.llm.num_kv_heads=5"),
    (["model.llm.mrope_section=[16, 24, 16]"], None, "model.llm.mrope_section=[16, 24, 16] must sum to head_dim / 2 = 64"),
    (["model.llm.family=llama"], None, "model.llm.family='llama' is not one of qwen2, qwen3"),
    (["model.llm.num_layers=2", "parallel.tensor=4"], 4, "model.llm.num_kv_heads=2 is not divisible by parallel.tensor=4"),
    (["checkpoint.owner_stale_s=0"], None, "checkpoint.owner_stale_s=0.0 must be positive (seconds)"),
    (["data.bad_samples.max_fraction=0"], None, "data.bad_samples.max_fraction=0.0 must lie in (0, 1]"),
    (["checkpoint.load_weights_only=true"], None,
     "checkpoint.load_weights_only=true needs checkpoint.load (the checkpoint to take the weights from)"),
    (["eval.templates=[a photo]"], None,
     "eval.templates=['a photo'] must be a non-empty list of prompts, each with one {} for the class name"),
]


@pytest.mark.parametrize("overrides, world_size, expected", CASES, ids=[c[2][:60] for c in CASES])
def test_each_invalid_setting_is_one_sentence(overrides, world_size, expected):
    assert problems(overrides, world_size) == [expected]


def test_every_problem_is_reported_at_once():
    found = problems(TINY + ["parallel.tensor=3", "data.max_tokens=16386", "optimizer.lr=-1",
                             "precision.dtype=fp8"], world_size=4)
    assert found == [
        "model.vision.num_heads=4 is not divisible by parallel.tensor=3",
        "model.vision.ffn_hidden_size=128 is not divisible by parallel.tensor=3",
        "world size 4 is not divisible by parallel.tensor x parallel.pipeline = 3 x 1",
        "data.max_tokens=16386 must be a multiple of 4 (one merged token)",
        "optimizer.lr=-1.0 must be positive",
        "precision.dtype='fp8' is not one of bf16, fp16, fp32",
    ]


def test_zero_sizes_are_reported_not_divided_by():
    found = problems(["model.vision.patch_size=0", "model.vision.spatial_merge_size=0",
                      "parallel.tensor=0", "parallel.pipeline=0", "data.max_tokens=0"], world_size=4)
    assert found == [
        "model.vision.patch_size=0 must be a positive integer",
        "model.vision.spatial_merge_size=0 must be a positive integer",
        "parallel.tensor=0 must be a positive integer",
        "parallel.pipeline=0 must be a positive integer",
        "data.max_tokens=0 must be a positive integer",
    ]


def test_notes_say_that_accumulation_makes_separate_contrastive_groups():
    from finevit.config.stage1 import notes

    assert notes(load_config(None, ["schedule.micro_batches_per_step=1"])) == []
    (note,) = notes(load_config(None, ["schedule.micro_batches_per_step=4"]))
    assert "4 separate contrastive groups" in note and "not the loss of one 4x larger batch" in note
