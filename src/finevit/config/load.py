"""Load a Config from YAML files and dotted command-line overrides.

A YAML file may name the files it builds on with `_base_: path` or `_base_: [path, ...]`
(relative to itself); bases merge first, in order, then the file, then the overrides
(`model.vision.num_layers=4`), one at a time. Every layer is checked against the dataclass
schema before it is merged, so a misspelt key or a wrong type is an error naming the full key
(`data.corpora[0].weight`) and the file or override it came from, never silently ignored.
OmegaConf then merges the checked layers and resolves `${...}` interpolations.
"""

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finevit.config.errors import ConfigError
from finevit.config.schema import Config

BASE_KEY = "_base_"
# A whole-value interpolation such as ${model.vision.hidden_size}: OmegaConf resolves and
# type-checks it once every layer is merged, so the schema check lets it through.
_INTERPOLATION = re.compile(r"^\$\{.+\}$")
_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

Layer = tuple[str, dict]  # (where it came from, nested mapping of settings)


class _SchemaError(Exception):
    """A layer does not fit the schema; load_config adds the layer's source to the message."""


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The file's bases (recursively, in merge order) followed by the file itself."""
    path = path.resolve()
    if path in seen:
        cycle = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files include each other in a cycle: {cycle}")
    if not path.is_file():
        where = f" (a {BASE_KEY} of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file {path}{where} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {_show(data)}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file path or a list of file paths")
    layers: list[Layer] = []
    for base in bases:
        layers += _read_chain(path.parent / base, (*seen, path))
    return layers + [(str(path), data)]


def _show(value: Any) -> str:
    """A value as the user wrote it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _unknown_key(full: str, name: str, fields: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    prefix = full[: len(full) - len(name)]
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"{full} is not a config key{hint}"


def _check_section(value: Any, schema: type, key: str) -> dict:
    if not isinstance(value, dict):
        raise _SchemaError(f"{key} is a section and must be a mapping, not {_show(value)}")
    fields = typing.get_type_hints(schema)
    out = {}
    for name, item in value.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise _SchemaError(_unknown_key(full, str(name), fields))
        out[name] = _check(item, fields[name], full)
    return out


def _check_scalar(value: Any, tp: type, key: str) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and is_number:
        return float(value)
    if tp is str and is_number:
        return str(value)  # a name or path such as 2024 that YAML read as a number
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp not in _EXPECTED:
        raise TypeError(f"the config schema uses {tp}, which load.py cannot check")
    raise _SchemaError(f"{key} must be {_EXPECTED[tp]}, not {_show(value)}")


def _check(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the schema type `tp`; returns it with YAML quirks normalised."""
    if isinstance(value, str) and _INTERPOLATION.match(value):
        return value
    if dataclasses.is_dataclass(tp):
        return _check_section(value, tp, key)
    origin = typing.get_origin(tp)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return _check(value, inner, key)
    if value is None:
        raise _SchemaError(f"{key} must not be null")
    if origin is list:
        if not isinstance(value, list):
            raise _SchemaError(f"{key} must be a list, not {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # a mapping of names (towers, ...) to values
        if not isinstance(value, dict):
            raise _SchemaError(f"{key} must be a mapping, not {_show(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _check(v, item, f"{key}.{k}") for k, v in value.items()}
    return _check_scalar(value, tp, key)


def parse_overrides(overrides: Iterable[str]) -> list[Layer]:
    """`a.b.c=value` strings (values in YAML syntax) as layers, one per override, in order."""
    layers = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(p.strip() for p in parts):
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}' has a value that is not valid YAML") from None
        for part in reversed(parts):
            value = {part.strip(): value}
        layers.append((f"override '{item}'", value))
    return layers


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Config:
    """Schema defaults <- YAML chain of `path` <- dotted overrides, as a typed Config."""
    layers = _read_chain(Path(path)) if path is not None else []
    layers += parse_overrides(overrides)
    cfg = OmegaConf.structured(Config)
    for source, layer in layers:
        try:
            checked = _check_section(layer, Config, "")
        except _SchemaError as e:
            raise ConfigError(f"{source}: {e}") from None
        try:
            cfg = OmegaConf.merge(cfg, checked)
        except OmegaConfBaseException as e:  # only interpolation mishaps get past the check
            raise ConfigError(f"{source}: {_omegaconf_message(e)}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {_omegaconf_message(e)}") from None


def config_from_yaml(text: str, source: str = "saved config") -> Config:
    """The Config a run saved (its config.yaml, or a checkpoint's copy), checked like a file."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping at top level, not {_show(data)}")
    try:
        checked = _check_section(data, Config, "")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), checked))
    except (_SchemaError, OmegaConfBaseException) as e:
        raise ConfigError(f"{source}: {e}") from None


def section_from_dict(schema: type, value: dict):
    """A typed section (e.g. the VisionConfig a checkpoint was trained with) from a plain mapping;
    keys the schema no longer has are ignored, values are checked as a YAML file's are."""
    fields = typing.get_type_hints(schema)
    try:
        checked = _check_section({k: v for k, v in value.items() if k in fields}, schema, "")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), checked))
    except (_SchemaError, OmegaConfBaseException) as e:
        raise ConfigError(str(e)) from None


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{key}: {msg}" if key else msg


def to_yaml(cfg: Config) -> str:
    """The resolved config, as written into a run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
