"""Corpus directories: a versioned manifest beside MDS shards, their writer and their reader.

A corpus directory (local, or an object-store URL read through a local cache) holds

    finevit_corpus.json   {"format": "finevit-corpus", "schema": "finecap", "version": 1,
                           "num_samples": N, "columns": {...}}
    index.json            mosaicml-streaming's MDS index
    shard.*.mds           (or parts/part-*/shard.*.mds when built by build_shards)

A classify corpus's manifest also names its classes (`"classes": [name, ...]`, label i is
classes[i]) and may give prompt templates (`"templates": ["a photo of a {}.", ...]`) that
zero-shot classification fills with each name.
    rejected.jsonl        records the builder refused, with the reason (build_shards only)

The reader refuses a directory without the manifest, with another schema than asked for, or with
a schema version this code does not read, in one sentence that says what to do.

mosaicml-streaming is imported lazily: it pulls in torchvision and transformers and costs seconds,
which a --help or a schema check should not pay.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from finevit.data.schema import SCHEMAS, columns

MANIFEST = "finevit_corpus.json"
INDEX = "index.json"
FORMAT_NAME = "finevit-corpus"


class CorpusError(ValueError):
    """A corpus directory that cannot be read as asked; the message says why and what to do."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def default_name(path: str) -> str:
    """A corpus's name in logs and metrics when its config gives none: the directory's name."""
    return Path(path.rstrip("/")).name


def write_manifest(out: str, schema: str, num_samples: int, **extra: Any) -> dict:
    # No timestamps or host names: two builds of the same data must be byte-identical.
    manifest = {"format": FORMAT_NAME, "schema": schema, "version": SCHEMAS[schema]["version"],
                "num_samples": int(num_samples), "columns": columns(schema), **extra}
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(out, MANIFEST))
    return manifest


def read_manifest(path: str, cache: Optional[str] = None) -> dict:
    """The manifest of a local corpus, or of one read through `cache` (downloaded there first).

    With a cache, `path` is treated as remote even when it is a plain directory (a shared
    filesystem read through node-local disk)."""
    if is_remote(path) and not cache:
        raise CorpusError(f"corpus {path} is remote: give a local cache directory for it")
    if cache:
        from streaming.base.storage import CloudDownloader
        local = os.path.join(cache, MANIFEST)
        try:
            CloudDownloader.direct_download(f"{path.rstrip('/')}/{MANIFEST}", local)
        except Exception as e:
            raise CorpusError(f"cannot fetch {MANIFEST} of corpus {path}: {e}") from None
    else:
        local = os.path.join(path.removeprefix("file://"), MANIFEST)
    if not os.path.isfile(local):
        raise CorpusError(
            f"{path} is not a finevit corpus (no {MANIFEST}); build it with data_tools/build_shards.py")
    try:
        with open(local) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CorpusError(f"{local} is unreadable or not JSON ({e}); rebuild the corpus") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict, path: str, expect_schema: Optional[str] = None) -> str:
    """The corpus's schema name, or CorpusError on a format, schema or version mismatch."""
    schema, version = manifest.get("schema"), manifest.get("version")
    if manifest.get("format") != FORMAT_NAME or schema not in SCHEMAS:
        raise CorpusError(f"{path}: {MANIFEST} names schema {schema!r}, not one of {', '.join(SCHEMAS)}")
    want = SCHEMAS[schema]["version"]
    if version != want:
        raise CorpusError(
            f"{path} holds schema '{schema}' version {version}, but this finevit reads version {want}; "
            f"rebuild the corpus with data_tools/build_shards.py or use a matching finevit")
    if expect_schema is not None and schema != expect_schema:
        raise CorpusError(f"{path} holds schema '{schema}', expected '{expect_schema}'")
    if schema == "classify":
        check_class_names(manifest.get("classes"), manifest.get("templates"), f"{path}: {MANIFEST}")
    return schema


def check_class_names(classes: Any, templates: Any, where: str) -> None:
    """A classify corpus's class names (non-empty, distinct strings) and optional templates."""
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise CorpusError(f"{where} needs 'classes', a non-empty list of class names (label i is the i-th)")
    if len(set(classes)) != len(classes):
        raise CorpusError(f"{where} names a class twice in 'classes'")
    if templates is not None and (not isinstance(templates, list) or not templates or not all(
            isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise CorpusError(f"{where}: 'templates' must be a non-empty list of strings, each with one {{}}")


class CorpusWriter:
    """Writes validated records (see schema.validate_record) as MDS shards plus the manifest."""

    def __init__(self, out: str, schema: str, size_limit: str = "64mb", compression: Optional[str] = None,
                 **manifest_extra: Any):
        """manifest_extra: more manifest keys (a classify corpus's `classes` and `templates`)."""
        from streaming import MDSWriter
        if schema == "classify":
            check_class_names(manifest_extra.get("classes"), manifest_extra.get("templates"), "CorpusWriter")
        os.makedirs(out, exist_ok=True)
        self.out, self.schema, self.count, self.extra = out, schema, 0, manifest_extra
        self._writer = MDSWriter(out=out, columns=columns(schema), size_limit=size_limit,
                                 compression=compression)

    def write(self, record: dict) -> None:
        self._writer.write(record)
        self.count += 1

    def finish(self, manifest: bool = True) -> None:
        self._writer.finish()
        if manifest:
            write_manifest(self.out, self.schema, self.count, **self.extra)

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self._writer.finish()


def merge_part_indexes(out: str, part_dirs: Sequence[str]) -> int:
    """Write out/index.json over the MDS shards of `part_dirs` (subdirectories of `out`), in order.

    Returns the number of samples. Shard basenames become paths relative to `out`, which is how
    streaming reads shards in subdirectories.
    """
    shards = []
    for part in part_dirs:
        rel = os.path.relpath(part, out)
        with open(os.path.join(part, INDEX)) as f:
            index = json.load(f)
        for info in index["shards"]:
            for key in ("raw_data", "zip_data"):
                if info.get(key):
                    info[key]["basename"] = f"{rel}/{info[key]['basename']}"
            shards.append(info)
    with open(os.path.join(out, INDEX + ".tmp"), "w") as f:
        json.dump({"version": 2, "shards": shards}, f, sort_keys=True)
    os.replace(os.path.join(out, INDEX + ".tmp"), os.path.join(out, INDEX))
    return sum(info["samples"] for info in shards)


def _release_shared_memory(ds: Any) -> None:
    """Unlink the shared memory and lock files a StreamingDataset made (streaming 0.13 leaks
    them until interpreter exit, and a killed process leaks them for good)."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared.prefix import _get_path
    arrays = [getattr(getattr(ds, "_shared_barrier", None), "_arr", None),
              getattr(getattr(ds, "_next_epoch", None), "arr", None),
              getattr(getattr(ds, "_cache_usage", None), "arr", None),
              getattr(ds, "_shard_states", None), getattr(ds, "_shard_access_times", None)]
    holders = [getattr(ds, "_locals_shm", None)] + [getattr(a, "shm", None) for a in arrays]
    for holder in holders:
        if holder is not None:
            holder.cleanup()
    prefix = getattr(ds, "_shm_prefix_int", None)
    if prefix is not None and getattr(ds, "_unique_rank_world", None) and ds._unique_rank_world.is_local_leader:
        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
            try:
                os.remove(os.path.join(tempfile.gettempdir(), _get_path(prefix, lock)))
            except FileNotFoundError:
                pass


class Corpus:
    """An opened corpus: sample i by random access, its size, its shard sizes.

    Backed by one StreamingDataset, used for its shard cache (download on first touch, eviction
    under `cache_limit`) and not for its iteration: finevit.data.loader decides the order. Build
    one on every rank of a job, at the same point (streaming coordinates the ranks of a node
    through shared memory, keyed on RANK / LOCAL_RANK / LOCAL_WORLD_SIZE of the launcher).
    """

    def __init__(self, path: str, cache: Optional[str] = None, name: Optional[str] = None,
                 expect_schema: Optional[str] = None, cache_limit: Optional[str] = None):
        self.path, self.cache = path, cache
        self.manifest = read_manifest(path, cache)
        self.schema = check_manifest(self.manifest, path, expect_schema)
        self.name = name or default_name(path)
        from streaming import StreamingDataset
        remote = path if is_remote(path) or cache else None
        local = cache if remote else path.removeprefix("file://")
        self._ds = StreamingDataset(remote=remote, local=local, cache_limit=cache_limit,
                                    shuffle=False, batch_size=1)
        self.shard_sizes = np.asarray(self._ds.samples_per_shard, np.int64)
        self.size = int(self.shard_sizes.sum())
        self._check_columns(self._ds.shards[0])
        if self.size != self.manifest["num_samples"]:
            raise CorpusError(
                f"{path}: index.json holds {self.size} samples but {MANIFEST} says "
                f"{self.manifest['num_samples']}; the corpus is incomplete, rebuild or resume its build")

    def _check_columns(self, shard: Any) -> None:
        want = sorted(columns(self.schema).items())
        have = sorted(zip(shard.column_names, shard.column_encodings))
        if have != want:
            raise CorpusError(f"{self.path}: shard columns {have} do not match schema '{self.schema}' {want}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return self._ds.get_item(int(index))

    def close(self) -> None:
        ds, self._ds = getattr(self, "_ds", None), None
        if ds is not None:
            _release_shared_memory(ds)

    def __enter__(self) -> "Corpus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, schema={self.schema}, size={self.size}, path={self.path!r})"


def open_corpus(path: str, cache: Optional[str] = None, name: Optional[str] = None,
                expect_schema: Optional[str] = None, cache_limit: Optional[str] = None) -> Corpus:
    return Corpus(path, cache=cache, name=name, expect_schema=expect_schema, cache_limit=cache_limit)

