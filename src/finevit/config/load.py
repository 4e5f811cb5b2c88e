"""Load a Config from YAML files and dotted command-line overrides.

A YAML file may name the files it builds on with `_base_: path` or `_base_: [path, ...]`
(relative to itself); bases merge first, in order, then the file, then the overrides
(`model.vision.num_layers=4`). Merging and type checking are OmegaConf's, against the
dataclass schema, so a misspelt key or a wrong type is an error, never silently ignored.
"""

from pathlib import Path
from typing import Iterable, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from finevit.config.errors import ConfigError
from finevit.config.schema import Config

BASE_KEY = "_base_"


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The file's bases (recursively, in merge order) followed by the file itself."""
    path = path.resolve()
    if path in seen:
        cycle = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files include each other in a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    layers: list[tuple[str, dict]] = []
    for base in bases:
        layers += _read_chain(path.parent / base, (*seen, path))
    return layers + [(str(path), data)]


def _merge(cfg: DictConfig, layer: Union[dict, DictConfig], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: unknown key '{e.full_key}'") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{source}: {key + ': ' if key else ''}{msg}") from None


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or not all(key.split(".")):
            raise ConfigError(f"override '{item}' must look like section.key=value")
    return OmegaConf.from_dotlist(items)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Config:
    """Schema defaults <- YAML chain of `path` <- dotted overrides, as a typed Config."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        for source, layer in _read_chain(Path(path)):
            cfg = _merge(cfg, layer, source)
    cfg = _merge(cfg, parse_overrides(overrides), "command-line override")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config, as written into a run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
