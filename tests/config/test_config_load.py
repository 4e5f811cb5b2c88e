"""Loading configs: the _base_ chain, dotted overrides, and one-sentence errors naming the key."""

import textwrap
from pathlib import Path

import pytest

from finevit.config import Config, ConfigError, load_config, parse_overrides, to_yaml


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message and len(e.value.problems) == 1
    return message


def test_no_file_gives_schema_defaults():
    assert load_config() == Config()


def test_bases_merge_in_order_then_file_then_overrides(tmp_path):
    write(tmp_path / "shared/a.yaml", """
        model: {vision: {num_layers: 4, hidden_size: 64, num_heads: 4}}
        optimizer: {lr: 0.5}
    """)
    write(tmp_path / "b.yaml", "model: {vision: {num_layers: 6, ffn_hidden_size: 96}}\n")
    top = write(tmp_path / "recipes/top.yaml", """
        _base_: [../shared/a.yaml, ../b.yaml]
        model: {vision: {ffn_hidden_size: 128}}
    """)
    cfg = load_config(top, ["optimizer.lr=0.25"])
    v = cfg.model.vision
    assert (v.num_layers, v.hidden_size, v.num_heads, v.ffn_hidden_size) == (6, 64, 4, 128)
    assert cfg.optimizer.lr == 0.25
    assert cfg.parallel.tensor == 1  # untouched keys keep their schema defaults


def test_base_chain_is_followed_recursively(tmp_path):
    write(tmp_path / "root.yaml", "schedule: {train_samples: 10}\n")
    write(tmp_path / "mid.yaml", "_base_: root.yaml\nschedule: {micro_batches_per_step: 2}\n")
    leaf = write(tmp_path / "leaf.yaml", "_base_: mid.yaml\n")
    s = load_config(leaf).schedule
    assert (s.train_samples, s.micro_batches_per_step) == (10, 2)


def test_shared_base_is_not_a_cycle(tmp_path):
    write(tmp_path / "d.yaml", "schedule: {train_samples: 7}\n")
    write(tmp_path / "b.yaml", "_base_: d.yaml\n")
    write(tmp_path / "c.yaml", "_base_: d.yaml\n")
    top = write(tmp_path / "a.yaml", "_base_: [b.yaml, c.yaml]\n")
    assert load_config(top).schedule.train_samples == 7


def test_cycle_is_detected_and_named(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    message = load_error(tmp_path / "a.yaml")
    assert message.startswith("config files include each other in a cycle: ")
    assert message.endswith(f"{tmp_path}/a.yaml -> {tmp_path}/b.yaml -> {tmp_path}/a.yaml")


def test_missing_base_names_the_file_that_wants_it(tmp_path):
    top = write(tmp_path / "top.yaml", "_base_: gone.yaml\n")
    assert load_error(top) == f"config file {tmp_path}/gone.yaml (a _base_ of {top}) does not exist"


@pytest.mark.parametrize("text, fragment", [
    ("- 1\n- 2\n", "must hold a mapping at top level, not a list"),
    ("model: [\n", "is not valid YAML"),
    ("_base_: 3\n", "_base_ must be a file path or a list of file paths"),
])
def test_malformed_files(tmp_path, text, fragment):
    assert fragment in load_error(write(tmp_path / "bad.yaml", text))


def test_overrides_are_typed_by_the_schema():
    cfg = load_config(None, [
        "model.vision.num_layers=4", "optimizer.lr=1e-4", "model.vision.window_layers=[0, 2]",
        "data.corpora=[{path: /c, weight: 2}]", "checkpoint.dir=null", "logging.run_dir=2024",
        "parallel.virtual_pipeline=2",
    ])
    assert cfg.model.vision.num_layers == 4
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.vision.window_layers == [0, 2]
    corpus = cfg.data.corpora[0]
    assert (corpus.path, corpus.weight, corpus.cache) == ("/c", 2.0, None)
    assert cfg.checkpoint.dir is None and cfg.logging.run_dir == "2024"
    assert cfg.parallel.virtual_pipeline == 2


def test_later_overrides_win():
    assert load_config(None, ["schedule.train_samples=5", "schedule.train_samples=9"]).schedule.train_samples == 9


def test_yaml_1_1_exponent_floats_are_numbers(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; the schema says float, so it is one.
    cfg = load_config(write(tmp_path / "c.yaml", "optimizer: {lr: 1e-3, min_lr: 1e-6}\n"))
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (1e-3, 1e-6)


def test_interpolation_is_resolved_after_all_layers():
    cfg = load_config(None, ["model.vision.out_hidden_size=${model.vision.hidden_size}",
                             "model.vision.hidden_size=512"])
    assert cfg.model.vision.out_hidden_size == 512


@pytest.mark.parametrize("override, expected", [
    ("model.vision.num_layrs=4",
     "model.vision.num_layrs is not a config key (did you mean model.vision.num_layers?)"),
    ("modle.vision.num_layers=4", "modle is not a config key (did you mean model?)"),
    ("model.vision.num_layers=four", "model.vision.num_layers must be an integer, not 'four'"),
    ("model.vision.num_layers=2.5", "model.vision.num_layers must be an integer, not 2.5"),
    ("model.vision.num_layers=true", "model.vision.num_layers must be an integer, not true"),
    ("model.vision.num_layers=null", "model.vision.num_layers must not be null"),
    ("optimizer.lr=fast", "optimizer.lr must be a number, not 'fast'"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel must be true or false, not 'maybe'"),
    ("model.vision.window_layers=3", "model.vision.window_layers must be a list, not 3"),
    ("model.vision.window_layers=[1, x]", "model.vision.window_layers[1] must be an integer, not 'x'"),
    ("data.corpora=[{path: a, weight: heavy}]", "data.corpora[0].weight must be a number, not 'heavy'"),
    ("data.corpora=[{path: a, wieght: 1}]",
     "data.corpora[0].wieght is not a config key (did you mean data.corpora[0].weight?)"),
    ("model.vision=3", "model.vision is a section and must be a mapping, not 3"),
])
def test_bad_override_is_one_sentence_naming_the_key(override, expected):
    assert load_error(None, [override]) == f"override '{override}': {expected}"


def test_bad_key_in_a_file_names_the_file(tmp_path):
    base = write(tmp_path / "base.yaml", "model: {vision: {num_heads: sixteen}}\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\n")
    assert load_error(top) == f"{base}: model.vision.num_heads must be an integer, not 'sixteen'"


@pytest.mark.parametrize("item", ["model.vision.num_layers", "=4", "model..num_layers=4", "model.=1"])
def test_override_syntax(item):
    assert load_error(None, [item]) == f"override '{item}' must look like section.key=value"


def test_parse_overrides_gives_one_layer_per_override():
    assert parse_overrides(["a.b=1", "a.c=[x]"]) == [
        ("override 'a.b=1'", {"a": {"b": 1}}), ("override 'a.c=[x]'", {"a": {"c": ["x"]}})]


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["model.vision.window_layers=[1]", "data.corpora=[{path: /x, weight: 0.5}]",
                             "optimizer.min_lr=1e-7"])
    again = load_config(write(tmp_path / "resolved.yaml", to_yaml(cfg)))
    assert again == cfg
