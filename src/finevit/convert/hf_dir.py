"""Tensors of a Hugging Face `save_pretrained` directory: one model.safetensors, or shards listed
by model.safetensors.index.json; only the shards holding wanted keys are opened."""

import json
from pathlib import Path
from typing import Callable

import torch

from finevit.convert.qwen2_5_vl import ConversionError


def _shards(path: str, keep: Callable[[str], bool]) -> list[Path]:
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({f for k, f in json.loads(index.read_text())["weight_map"].items() if keep(k)})
    else:
        files = ["model.safetensors"]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ConversionError(f"{path} lacks its safetensors weights ({', '.join(missing)}); save the model "
                              "with save_pretrained(safe_serialization=True).")
    return [root / f for f in files]


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a directory's weights, read from the file headers only."""
    from safetensors import safe_open

    keys = []
    for f in _shards(path, lambda key: True):
        with safe_open(str(f), framework="pt") as shard:
            keys += list(shard.keys())
    return keys


def read_safetensors_dir(path: str, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = {}
    for f in _shards(path, keep):
        with safe_open(str(f), framework="pt") as shard:
            state.update({k: shard.get_tensor(k) for k in shard.keys() if keep(k)})
    return state
