"""A finevit checkpoint on disk: where it is, whether it is complete, and reading it without
running code from it. Needs neither megatron nor the trainer (the trainer, `finevit eval` and
the converters all read checkpoints through here).

    <run_dir>/checkpoints/latest        name of the newest complete checkpoint ("step_000123")
    <run_dir>/checkpoints/step_000123/  one complete checkpoint:
        .metadata, __*_*.distcp         megatron dist_checkpointing (torch_dist): model + optimizer
        metadata.json                   dist_checkpointing's own format note
        trainer_state.pt                the trainer's plain state: tensors, numbers, strings, lists,
                                        dicts, tuples only (loads with torch.load(weights_only=True))
        meta.json                       step, layout, format; written last: marks completeness
    <run_dir>/checkpoints/step_000124.tmp/   a save in progress or interrupted: never read

Files a user hands over (`checkpoint.load`, someone else's run) may be hostile. Nothing here
unpickles with code execution: trainer_state.pt is read with weights_only=True, and
`verify_loadable` checks the pickles that torch.distributed.checkpoint itself would load with
plain pickle (`.metadata`, and the byte items inside the .distcp files) before megatron reads
them.
"""

import io
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# 2: trainer_state.pt holds no pickled objects (1 pickled numpy arrays and needed weights_only=False).
FORMAT = "finevit-ckpt-2"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
DCP_METADATA = ".metadata"
TRASH = ".trash"  # a step directory set aside while the same step is saved again
CHECKPOINTS = "checkpoints"  # a run directory's checkpoint folder
_STEP_DIR = re.compile(r"^step_(\d+)$")
_KINDS = "a step_* directory, a checkpoints directory or a run directory"


class CheckpointError(ValueError):
    """A path that is not a usable finevit checkpoint; the message says what is wrong."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / META_FILE).is_file()


def complete_checkpoints(run_ckpt_dir) -> list[Path]:
    """Complete checkpoint directories, oldest first (by step number, not name)."""
    root = Path(run_ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest(run_ckpt_dir) -> Optional[Path]:
    """The checkpoint `latest` names; the newest complete one if the pointer is missing or bad."""
    root = Path(run_ckpt_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if is_complete(target):
            return target
        parked = target.with_name(target.name + TRASH)
        if (parked / META_FILE).is_file():  # a re-save of it stopped between its two renames
            return parked
        logger.warning("%s names '%s', which is not a complete checkpoint; falling back to "
                       "the newest complete one", pointer, target.name)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve(path, what: str = "checkpoint.load") -> Path:
    """The complete checkpoint `path` names (a step directory, a checkpoints directory: its
    latest, a run directory: its checkpoints' latest), checked file by file; CheckpointError
    naming what is missing otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{what}={path} is not a directory: name a checkpoint ({_KINDS})")
    if p.name.endswith(".tmp"):
        raise CheckpointError(f"{what}={path} is an unfinished save (a .tmp directory); name a "
                              "complete checkpoint, e.g. the checkpoints directory beside it")
    if (p / META_FILE).is_file() or _STEP_DIR.match(p.name):
        return check_complete(p, what)
    for root in (p, p / CHECKPOINTS):
        latest = find_latest(root)
        if latest is not None:
            return check_complete(latest, what)
    raise CheckpointError(f"{what}={path} is not a finevit checkpoint: it holds no {META_FILE} and no "
                          f"complete step_* checkpoint ({_KINDS})")


def check_complete(step_dir: Path, what: str = "checkpoint") -> Path:
    """step_dir if it has every file a load reads, with this finevit's format."""
    missing = [f for f in (META_FILE, STATE_FILE, DCP_METADATA) if not (step_dir / f).is_file()]
    if missing:
        raise CheckpointError(f"{what}: {step_dir} is not a complete finevit checkpoint "
                              f"({', '.join(missing)} missing)")
    meta = read_meta(step_dir)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{what}: {step_dir} has format {meta.get('format')!r}, not {FORMAT!r}: "
                              "it was written by another version of finevit or another program")
    return step_dir


def read_meta(path) -> dict:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(path) / META_FILE} is unreadable or not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(path) / META_FILE} is not a JSON object")
    return meta


# ---------------------------------------------------------------------- trainer state


def write_state(path: Path, state: dict) -> None:
    """trainer_state.pt: `state` must hold tensors and plain data only (checked by reading it
    back the way load does, so a save can never write what a load would refuse)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except pickle.UnpicklingError as e:
        raise TypeError(f"trainer state holds a value weights_only loading refuses: {e}") from None
    with open(path, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def read_state(step_dir) -> dict:
    """trainer_state.pt of a checkpoint, loaded with weights_only=True (no code runs)."""
    path = Path(step_dir) / STATE_FILE
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, which finevit "
                              f"does not unpickle ({first})") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- torch_dist pickles


# Exactly the globals torch.distributed.checkpoint's .metadata refers to: its data classes and
# enums, torch.Size and dtypes/layouts. A prefix rule would also admit classes with side effects
# in their constructors (readers, writers).
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = {
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                         "TensorStorageMetadata", "ChunkStorageMetadata",
                                         "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's .metadata, refusing every other global."""

    def find_class(self, module: str, name: str):
        constant = module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        if (module, name) not in _METADATA_GLOBALS and not constant:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module, name)


def _read_dcp_metadata(step_dir: Path):
    path = step_dir / DCP_METADATA
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects finevit does not unpickle ({e})") from None
    except (OSError, EOFError, AttributeError, ImportError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def verify_loadable(step_dir) -> None:
    """Refuse (CheckpointError) a checkpoint whose dist_checkpointing files would make
    torch.distributed.checkpoint run code: its .metadata (read with plain pickle) must hold only
    DCP's data classes, and every byte item (read with weights_only=False) only tensors and
    plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step_dir = Path(step_dir)
    metadata = _read_dcp_metadata(step_dir)
    byte_keys = {k for k, m in metadata.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_keys:
            continue
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{step_dir}: byte item '{index.fqn}' is stored with transforms "
                                  f"{info.transform_descriptors}, which finevit cannot check")
        target = step_dir / str(info.relative_path)
        if target.resolve().parent != step_dir.resolve():
            raise CheckpointError(f"{step_dir}: byte item '{index.fqn}' points outside the checkpoint")
        with open(target, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{step_dir}: byte item '{index.fqn}' holds objects finevit does "
                                  f"not unpickle ({first})") from None
