"""Every shipped config loads and validates; the presets are the sizes their names promise."""

from pathlib import Path

import pytest

from finevit.config import VisionConfig, load_config, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def sizes(v) -> tuple:
    return (v.num_layers, v.hidden_size, v.num_heads, v.ffn_hidden_size, v.patch_size, v.out_hidden_size)


def test_configs_are_shipped():
    names = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {"model/tiny.yaml", "model/finevit_0.3b.yaml", "model/finevit_0.9b.yaml", "parallel/tp2.yaml",
            "parallel/pp2.yaml", "parallel/tp2pp2.yaml", "encoder/tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(CONFIGS).as_posix() for p in SHIPPED])
def test_shipped_config_validates(path):
    cfg = load_config(path)
    # Two data-parallel replicas of whatever model-parallel layout the file asks for.
    world = 2 * cfg.parallel.tensor * cfg.parallel.pipeline
    assert validate(cfg, world_size=world) is cfg


@pytest.mark.parametrize("name, expected", [
    ("tiny", (2, 64, 4, 128, 14, 64)),
    ("finevit_0.3b", (24, 1024, 16, 2816, 14, 1024)),
    ("finevit_0.9b", (28, 1536, 16, 4608, 14, 1536)),
])
def test_model_preset_sizes(name, expected):
    assert sizes(load_config(CONFIGS / f"model/{name}.yaml").model.vision) == expected


@pytest.mark.parametrize("name, expected", [  # layers, hidden, heads, kv heads, ffn, vocab, head_dim, tied
    ("tiny", (2, 64, 4, 2, 128, 512, 16, True)),
    ("qwen2.5_1.5b", (28, 1536, 12, 2, 8960, 151936, 128, True)),
    ("qwen2.5_3b", (36, 2048, 16, 2, 11008, 151936, 128, True)),
    ("qwen2.5_7b", (28, 3584, 28, 4, 18944, 152064, 128, False)),
])
def test_llm_preset_sizes(name, expected):
    m = load_config(CONFIGS / f"model/llm/{name}.yaml").model.llm
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.ffn_hidden_size, m.vocab_size,
            m.kv_channels, m.tie_embeddings) == expected
    assert m.family == "qwen2" and m.rope_theta == 1e6


def test_0_9b_preset_is_the_schema_default():
    assert load_config(CONFIGS / "model/finevit_0.9b.yaml").model.vision == VisionConfig()


def test_tp2pp2_composes_tp2_and_pp2():
    both = load_config(CONFIGS / "parallel/tp2pp2.yaml").parallel
    tp2, pp2 = (load_config(CONFIGS / f"parallel/{n}.yaml").parallel for n in ("tp2", "pp2"))
    assert (both.tensor, both.pipeline, both.sequence_parallel) == (tp2.tensor, pp2.pipeline, tp2.sequence_parallel)
    assert (both.tensor, both.pipeline) == (2, 2)


def test_tiny_cpu_recipe():
    cfg = load_config(CONFIGS / "encoder/tiny_cpu.yaml")
    assert cfg.model.vision == load_config(CONFIGS / "model/tiny.yaml").model.vision
    assert (cfg.precision.dtype, cfg.parallel.backend, cfg.parallel.tensor) == ("fp32", "gloo", 2)
    assert cfg.data.corpora and cfg.data.max_tokens >= cfg.data.max_pixels // 14**2
    # The single-process variant named in the recipe's comment is valid too.
    solo = load_config(CONFIGS / "encoder/tiny_cpu.yaml",
                       ["parallel.tensor=1", "parallel.sequence_parallel=false"])
    validate(solo, world_size=1)
