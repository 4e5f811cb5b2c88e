"""Atomic, reshardable training checkpoints on megatron's dist_checkpointing (torch_dist format).

What a checkpoint directory holds, and how it is read without running code from it, is in
finevit/checkpointing/files.py.

Every rank writes its shards into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N/`
and only then points `latest` at it, so a crash at any moment leaves the previous checkpoint
intact and `latest` valid. The filesystem must be shared by all ranks.

Model tensors are stored in layout-independent form, under their global keys (layers numbered
globally, TP shards placed in the full tensor). The distributed optimizer's state takes one of
megatron's two formats (checkpoint.optimizer_format, recorded in meta.json):
- `fully_reshardable` (default): per-parameter state in model space; the checkpoint loads into
  any TP / PP / VPP / DP layout. Saving all-gathers each model shard's optimizer state over the
  DP group, so every rank briefly holds its whole model shard's state (12 bytes per parameter).
- `dp_reshardable`: every rank writes its own slice of the flat buffers, with no communication
  and no extra memory; it loads only into the same TP / PP / VPP layout (DP may change). Weights
  alone (load_optimizer=False) still load anywhere.
"""

import contextlib
import json
import logging
import os
import queue
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model

from finevit.checkpointing import files
from finevit.checkpointing.files import (  # noqa: F401 - the trainer reads them from here
    FORMAT, LATEST, META_FILE, STATE_FILE, TRASH, complete_checkpoints, find_latest, read_meta, step_dir_name)
from finevit.config.validate import OPTIMIZER_FORMATS

logger = logging.getLogger(__name__)



def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _model_key(i: int, n: int) -> str:
    # megatron's layout: "model" for one chunk, "model0", "model1", ... with virtual pipelining.
    return "model" if n == 1 else f"model{i}"


def _sharded_state_dict(model_chunks, optimizer, pg: ProcessGroupCollection,
                        is_loading: bool, optimizer_format: str = OPTIMIZER_FORMATS[0]) -> dict:
    """Model chunks unwrapped (keys must not depend on the DDP / fp16 wrappers), then optimizer."""
    metadata = {"dp_cp_group": pg.dp_cp}
    state = {_model_key(i, len(model_chunks)): unwrap_model(c).sharded_state_dict(metadata=metadata)
             for i, c in enumerate(model_chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={**metadata, "distrib_optim_sharding_type": optimizer_format,
                      # Per-parameter keys are global already; a prefix would tie them to the
                      # number of chained optimizers.
                      "chained_optim_avoid_prefix": True})
    return state


@contextlib.contextmanager
def _in_process_write_queue():
    """Let a synchronous save collect its write results in a thread queue.

    megatron's writer reports through a multiprocessing Manager queue, made on first use, even
    when the save runs in this process: the Manager is a spawned server process that re-imports
    torch (seconds per rank) and hangs scripts without a __main__ guard. Restored afterwards, so
    a later asynchronous save still gets its Manager.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        yield  # already made (or megatron moved it): use it
        return
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


def _layout(model_chunks, pg: ProcessGroupCollection) -> dict:
    return {"world_size": torch.distributed.get_world_size(), "tp": pg.tp.size(),
            "pp": pg.pp.size(), "dp": pg.dp.size(), "model_chunks": len(model_chunks)}


def _gather_rank_states(rank_state, pg: ProcessGroupCollection) -> list:
    """Every rank's state, indexed by global rank, tagged with its coordinates in the layout."""
    mine = {"rank": torch.distributed.get_rank(), "tp": pg.tp.rank(), "pp": pg.pp.rank(),
            "dp": pg.dp.rank(), "state": rank_state}
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def _clean_leftovers(root: Path) -> None:
    """Remove interrupted saves (rank 0, before a new save starts)."""
    for p in root.iterdir():
        original = p.with_name(p.name.removesuffix(TRASH))
        if p.name.endswith(TRASH) and not original.exists() and (p / META_FILE).is_file():
            logger.info("restoring %s, set aside by a re-save that was interrupted", original)
            p.rename(original)
        elif p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(TRASH)):
            logger.info("removing leftover %s from an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)


def _commit(root: Path, tmp: Path, final: Path, keep_last: Optional[int]) -> None:
    """Rank 0: tmp -> final, then the pointer, then pruning. Each step leaves a loadable state."""
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after resuming at it): keep it until replaced
        final.rename(final.with_name(final.name + TRASH))
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name + "\n")
    shutil.rmtree(final.with_name(final.name + TRASH), ignore_errors=True)
    if keep_last and keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            if old != final:
                logger.info("removing old checkpoint %s (keep_last=%d)", old, keep_last)
                shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_ckpt_dir, step: int, model_chunks: list, optimizer, common: dict,
                    pg: ProcessGroupCollection, keep_last: Optional[int] = None,
                    rank_state=None, optimizer_format: str = OPTIMIZER_FORMATS[0],
                    may_commit: Optional[Callable[[], bool]] = None,
                    _fail_after_model_save: Optional[Callable[[], None]] = None) -> Path:
    """Save collectively (every rank calls this); returns the final checkpoint directory.

    common: the trainer's plain dict (scheduler state, step, consumed samples, phase, ...),
        taken from rank 0. rank_state: this rank's own picklable state (RNG, data loader);
        all ranks' are gathered so that a run with another layout can still read them.
    optimizer_format: one of OPTIMIZER_FORMATS (see the module docstring).
    may_commit: asked on rank 0 just before the checkpoint becomes visible; False leaves it an
        unfinished .tmp (a job that no longer owns its run directory must not move `latest`).
    _fail_after_model_save: test hook, called on every rank after the tensors are written and
        before the checkpoint is committed (raise from it to simulate a crash).
    """
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format {optimizer_format!r} is not one of {OPTIMIZER_FORMATS}")
    root = Path(run_ckpt_dir)
    final = root / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    started = time.time()
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        tmp.mkdir()
    torch.distributed.barrier()
    if optimizer is not None:
        _materialize_adam_state(optimizer)  # a save before the first step needs it too
    with _in_process_write_queue():
        dist_checkpointing.save(
            _sharded_state_dict(model_chunks, optimizer, pg, False, optimizer_format), str(tmp))
    if _fail_after_model_save is not None:
        _fail_after_model_save()
    rank_states = _gather_rank_states(rank_state, pg)
    if _is_rank0():
        files.write_state(tmp / STATE_FILE, {"common": common, "rank_states": rank_states})
        meta = {"format": FORMAT, "step": step, "time": time.time(),
                "layout": _layout(model_chunks, pg),
                "optimizer": optimizer_format if optimizer is not None else None}
        _write_atomic(tmp / META_FILE, json.dumps(meta, indent=1) + "\n")
    torch.distributed.barrier()  # every shard is on disk before the rename makes it visible
    if _is_rank0():
        if may_commit is None or may_commit():
            _commit(root, tmp, final, keep_last)
            logger.info("saved checkpoint %s in %.1f s", final, time.time() - started)
        else:
            logger.error("checkpoint %s left unfinished: this job no longer owns the run directory", tmp)
    torch.distributed.barrier()  # nobody reads `latest` before it is updated
    return final


def read_common(path) -> dict:
    """The trainer's `common` dict of a checkpoint, without loading any tensor shard."""
    return files.read_state(path)["common"]


def _materialize_adam_state(optimizer) -> None:
    """Give plain torch Adam(W) the state it creates lazily at its first step.

    megatron's DistributedOptimizer.state_dict asserts one 'step' across the per-parameter
    states, so it fails before the first step, and building the loading state dict calls it.
    Zeros and step 0 are exactly what torch would create. TE / apex Adam keep 'step' in the
    param groups and need nothing.
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


def _torch_adams(optimizer) -> list:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    inners = [getattr(s, "optimizer", None) for s in subs]
    return [o for o in inners if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


@contextlib.contextmanager
def _keep_restored_step(optimizer):
    """Work around megatron 0.19 + torch Adam in distributed-optimizer loads.

    megatron restores torch Adam's 'step' from the saved param groups, then copies each
    parameter's saved tensors into the state with `_set_main_param_and_optimizer_states`:
    `fully_reshardable` stores no per-parameter 'step' (KeyError 'step'), `dp_reshardable`
    hands back the loading optimizer's own placeholder (step 0, wrong bias correction). Keep
    the step restored from the param groups and fill anything else missing from the state.
    """
    patched = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(sub, "_set_main_param_and_optimizer_states", None)
        if setter is None or not isinstance(getattr(sub, "optimizer", None),
                                            (torch.optim.Adam, torch.optim.AdamW)):
            continue

        def fill(model_param, tensors, sub=sub, setter=setter):
            current = sub._get_main_param_and_optimizer_states(model_param)
            merged = {**current, **tensors}
            if "step" in current:
                merged["step"] = current["step"]
            return setter(model_param, merged)

        sub._set_main_param_and_optimizer_states = fill
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states  # back to the class method


def _unshare_steps(optimizer) -> None:
    """megatron loads one 'step' tensor into every parameter's state; torch's Adam increments
    each in place, so a shared tensor would advance N times per step (wrong bias correction)."""
    for inner in _torch_adams(optimizer):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _check_optimizer_layout(path: Path, meta: dict, layout: dict) -> None:
    """dp_reshardable optimizer state loads only into the TP / PP / VPP layout that saved it."""
    if meta.get("optimizer") != "dp_reshardable":
        return
    keys = ("tp", "pp", "model_chunks")
    saved = {k: meta["layout"].get(k) for k in keys}
    if saved != {k: layout[k] for k in keys}:
        raise ValueError(
            f"{path} holds dp_reshardable optimizer state, which loads only into the layout that "
            f"saved it (tensor={saved['tp']}, pipeline={saved['pp']}, {saved['model_chunks']} model "
            f"chunks per rank); use that layout, or load the weights alone")


def load_checkpoint(path, model_chunks: list, optimizer, pg: ProcessGroupCollection,
                    load_optimizer: bool = True) -> dict:
    """Load collectively into this rank's chunks (any layout) and optimizer; returns `common`.

    The returned dict is the saved `common` plus "rank_states" (every saving rank's
    `rank_state` with its tp/pp/dp coordinates; see `saved_rank_state`), "saved_layout" and,
    unless the trainer saved its own, "step". With optimizer=None or load_optimizer=False only
    the weights load (fine-tuning, evaluation, or a checkpoint saved without optimizer state).
    Build the optimizer for the phase in force at the checkpoint (same frozen towers) first:
    its parameters must match the saved optimizer state.
    """
    path = files.check_complete(Path(path))
    files.verify_loadable(path)  # before megatron unpickles anything of it
    state = files.read_state(path)
    meta = read_meta(path)
    with_optimizer = optimizer is not None and load_optimizer
    if with_optimizer and meta.get("optimizer") is None:
        raise ValueError(f"{path} holds no optimizer state; load with load_optimizer=False")
    if with_optimizer:
        _check_optimizer_layout(path, meta, _layout(model_chunks, pg))
        _materialize_adam_state(optimizer)
    else:
        logger.warning("loading model weights only from %s (optimizer state skipped)", path)
    sharded = _sharded_state_dict(model_chunks, optimizer if with_optimizer else None, pg, True,
                                  meta.get("optimizer") or OPTIMIZER_FORMATS[0])
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(path))
        for i, chunk in enumerate(model_chunks):
            unwrap_model(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))],
                                                strict=True)
        if with_optimizer:
            with _keep_restored_step(optimizer):
                optimizer.load_state_dict(loaded["optimizer"])
            _unshare_steps(optimizer)
        elif optimizer is not None:
            # The optimizer's fp32 main copies must follow the loaded weights, or the next step
            # would write the initial weights back.
            optimizer.reload_model_params()
    common = dict(state["common"])
    common.update(rank_states=state["rank_states"], saved_layout=meta["layout"])
    common.setdefault("step", meta["step"])
    logger.info("loaded checkpoint %s (saved with %s)", path, meta["layout"])
    return common


def saved_rank_state(common: dict, pg: ProcessGroupCollection):
    """This rank's saved `rank_state` when the layout is unchanged, else None.

    With another layout per-rank state has no one-to-one owner: RNG streams restart from the
    seed, and a data loader that can re-split its position reads all of `common["rank_states"]`.
    """
    layout = common.get("saved_layout", {})
    same = (layout.get("world_size") == torch.distributed.get_world_size()
            and (layout.get("tp"), layout.get("pp"), layout.get("dp"))
            == (pg.tp.size(), pg.pp.size(), pg.dp.size()))
    if not same:
        return None
    return common["rank_states"][torch.distributed.get_rank()]["state"]


def rng_state() -> dict:
    """This rank's random generators, megatron's tensor-parallel RNG tracker included, as
    tensors and plain data (numpy's key array becomes a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_module_weights(path, module, prefix: str, exclude: tuple = ()) -> list[str]:
    """Load one module's weights from a finevit checkpoint of any TP / PP layout, e.g. stage 1's
    encoder (`prefix` "vision.") into stage 2's VLM. Collective. Parameters under `exclude`
    (prefixes inside the module, e.g. "merger.", which stage 1 does not have) keep their values;
    returns their names. A rank without the module (a later pipeline stage) passes None and
    takes part in the collective load with nothing to read."""
    path = files.check_complete(Path(path))
    files.verify_loadable(path)  # before megatron unpickles anything of it
    if module is None:
        with torch.no_grad():
            dist_checkpointing.load({}, str(path))
        return []
    sharded = {k: v for k, v in unwrap_model(module).sharded_state_dict(prefix=prefix).items()
               if not k[len(prefix):].startswith(exclude)}
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(path))
        # `loaded` also holds the checkpoint's common (non-sharded) entries, e.g. "optimizer"
        result = unwrap_model(module).load_state_dict(
            {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}, strict=False)
    kept = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in kept if not k.startswith(exclude)] + list(result.unexpected_keys)
    if unexpected:
        raise files.CheckpointError(f"{path} does not hold every weight of the module under '{prefix}' "
                                    f"(e.g. {unexpected[:3]})")
    logger.info("loaded %s from %s (kept as they were: %s)", prefix.rstrip("."), path, ", ".join(exclude) or "nothing")
    return kept
