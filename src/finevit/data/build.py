"""Build a corpus directory from raw inputs: JSONL manifests, webdataset tars, parquet files.

Pipeline: inputs -> parts (fixed slices of the input: a run of JSONL lines, one tar, one parquet
row group) -> each part is read, every record validated (schema.validate_record) and written by a
worker process into out/parts/part-NNNNNN/ beside its rejected records -> when every part is done,
one index.json over all parts in input order (so the corpus order does not depend on the number
of workers), the manifest and out/rejected.jsonl.

Resumable: a part is done once its DONE.json exists. A rerun with the same inputs and options
skips done parts and redoes the others from scratch (a part's partial output is discarded).
A bad record never stops the build: it goes to the side file with its reason. A part whose input
cannot be read at all (a truncated tar, a corrupt parquet footer) fails on its own; the build
reports it, finishes the other parts and can be resumed once the input is fixed.

Raw record fields (JSONL object, webdataset .json member, parquet row): `id`, the image (JSONL:
`image` = a path relative to the manifest or absolute, or `image_b64`; webdataset: the .jpg /
.jpeg / .png / .webp member; parquet: the image column, bytes or {bytes: ...}), and the schema's
fields (`captions` or `caption`, `source`; `global_caption`, `regions`; `label`). A webdataset .txt member
is a caption; a missing id defaults to the webdataset key.
"""

import base64
import binascii
import hashlib
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from finevit.data.corpus import INDEX, MANIFEST, CorpusError, check_class_names, merge_part_indexes, write_manifest
from finevit.data.schema import Limits, RecordError, columns, validate_record

FORMATS = ("jsonl", "wds", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".tar": "wds", ".parquet": "parquet"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
BUILD_STATE = "build.json"
REJECTED = "rejected.jsonl"
DONE = "DONE.json"

RawRecord = Union[dict, RecordError]


class BuildError(RuntimeError):
    """The build cannot proceed (bad arguments, changed inputs); one sentence."""


@dataclass(frozen=True)
class Part:
    index: int
    fmt: str
    path: str
    start: int = 0  # jsonl: byte offset; parquet: row group
    stop: int = 0  # jsonl: byte offset past the last line
    first_line: int = 1  # jsonl: line number of the first line, for rejected-record refs


@dataclass
class BuildOptions:
    schema: str
    limits: Limits = field(default_factory=Limits)
    records_per_part: int = 5000  # JSONL lines per part (tars and row groups are parts already)
    size_limit: str = "64mb"  # MDS shard size
    image_column: str = "image"  # parquet
    # classify schema: the class names (a record's label is an index or one of these names) and
    # optional prompt templates, both written to the manifest
    classes: list = field(default_factory=list)
    templates: Optional[list] = None


@dataclass
class PartResult:
    index: int
    written: int = 0
    rejected: dict = field(default_factory=dict)  # reason -> count
    error: Optional[str] = None


@dataclass
class BuildSummary:
    out: str
    schema: str
    parts: int
    parts_resumed: int  # done by an earlier, interrupted run
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed: list = field(default_factory=list)  # (input path, error)
    duplicate_ids: int = 0  # ids found in more than one part (within a part they are rejected)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed and self.written > 0

    def lines(self) -> list[str]:
        out = [f"corpus      {self.out} (schema {self.schema})",
               f"written     {self.written} records",
               f"rejected    {sum(self.rejected.values())} records (see {os.path.join(self.out, REJECTED)})"]
        out += [f"  {reason:<22}{n}" for reason, n in self.rejected.most_common()]
        out.append(f"parts       {self.parts} ({self.parts_resumed} done by an earlier run)")
        if self.duplicate_ids:
            out.append(f"warning     {self.duplicate_ids} ids occur in more than one part")
        out += [f"FAILED      {path}: {err}" for path, err in self.failed]
        out.append(f"time        {self.seconds:.1f} s")
        return out


# ----------------------------------------------------------------------------- inputs -> parts

def detect_format(path: str) -> str:
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise BuildError(f"cannot tell the format of {path} from its extension; pass --format")
    return fmt


def plan_parts(inputs: Sequence[str], fmt: Optional[str], records_per_part: int) -> list[Part]:
    parts: list[Part] = []
    for path in inputs:
        kind = fmt or detect_format(path)
        if kind == "jsonl":
            for start, stop, first in _jsonl_chunks(path, records_per_part):
                parts.append(Part(len(parts), kind, path, start, stop, first))
        elif kind == "parquet":
            import pyarrow.parquet as pq
            try:
                groups = pq.ParquetFile(path).num_row_groups
            except Exception as e:
                raise BuildError(f"cannot read parquet file {path}: {e}") from None
            parts += [Part(len(parts) + g, kind, path, g) for g in range(groups)]
        else:
            parts.append(Part(len(parts), kind, path))
    return parts


def _jsonl_chunks(path: str, lines_per_chunk: int) -> Iterator[tuple[int, int, int]]:
    """Byte ranges of `lines_per_chunk` lines, found in one pass over the file."""
    start, line, offset = 0, 1, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            offset += len(raw)
            if n % lines_per_chunk == 0:
                yield start, offset, line
                start, line = offset, n + 1
    if offset > start:
        yield start, offset, line


def _jsonl_records(part: Part) -> Iterator[tuple[str, RawRecord]]:
    base = os.path.dirname(os.path.abspath(part.path))
    with open(part.path, "rb") as f:
        f.seek(part.start)
        line_no, pos = part.first_line, part.start
        while pos < part.stop:
            raw = f.readline()
            pos += len(raw)
            ref, line_no = f"{part.path}:{line_no}", line_no + 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                yield ref, RecordError("bad_json", f"line is not a JSON object ({e})")
                continue
            yield ref, _attach_jsonl_image(obj, base)


def _attach_jsonl_image(obj: dict, base: str) -> RawRecord:
    if obj.get("image_b64"):
        try:
            obj["image"] = base64.b64decode(obj.pop("image_b64"), validate=True)
        except (binascii.Error, TypeError, ValueError):
            return RecordError("bad_image_b64", "image_b64 is not valid base64")
        return obj
    path = obj.get("image")
    if not isinstance(path, str) or not path:
        return RecordError("missing_image", "neither an image path nor image_b64 is given")
    try:
        obj["image"] = Path(base, path).read_bytes()
    except OSError as e:
        return RecordError("missing_image", f"cannot read image file {path}: {e.strerror}")
    return obj


def _wds_records(part: Part) -> Iterator[tuple[str, RawRecord]]:
    key, members = None, {}
    with tarfile.open(part.path, "r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, base = os.path.split(info.name)
            stem, _, ext = base.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and key is not None:
                yield f"{part.path}:{key}", _wds_sample(key, members)
                members = {}
            key = member_key
            members["." + ext.lower()] = tar.extractfile(info).read()
    if key is not None:
        yield f"{part.path}:{key}", _wds_sample(key, members)


def _wds_sample(key: str, members: dict[str, bytes]) -> RawRecord:
    rec: dict = {}
    if ".json" in members:
        try:
            rec = json.loads(members[".json"])
        except ValueError as e:
            return RecordError("bad_json", f"{key}.json is not JSON ({e})")
        if not isinstance(rec, dict):
            return RecordError("bad_json", f"{key}.json is not an object")
    if ".txt" in members and "captions" not in rec and "caption" not in rec:
        rec["captions"] = [members[".txt"].decode("utf-8", "replace")]
    images = [members[e] for e in IMAGE_EXTS if e in members]
    if not images:
        return RecordError("missing_image", f"sample {key} has no {'/'.join(IMAGE_EXTS)} member")
    rec["image"] = images[0]
    rec.setdefault("id", os.path.basename(key))
    return rec


def _parquet_records(part: Part, image_column: str) -> Iterator[tuple[str, RawRecord]]:
    import pyarrow.parquet as pq
    table = pq.ParquetFile(part.path).read_row_group(part.start)
    if image_column not in table.column_names:
        raise BuildError(f"{part.path} has no image column '{image_column}' (columns: {table.column_names})")
    for row_no, row in enumerate(table.to_pylist()):
        img = row.get(image_column)
        if isinstance(img, dict):  # the Hugging Face datasets Image feature: {bytes, path}
            img = img.get("bytes")
        row["image"] = img
        if isinstance(row.get("regions"), str):
            try:
                row["regions"] = json.loads(row["regions"])
            except ValueError:
                pass  # validate_record names the problem
        yield f"{part.path}:rg{part.start}:{row_no}", row


def read_part(part: Part, opts: BuildOptions) -> Iterator[tuple[str, RawRecord]]:
    if part.fmt == "jsonl":
        return _jsonl_records(part)
    if part.fmt == "wds":
        return _wds_records(part)
    return _parquet_records(part, opts.image_column)


# ----------------------------------------------------------------------------- parts -> shards

def _id_hash(rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little")


def build_part(part: Part, part_dir: str, opts: BuildOptions) -> PartResult:
    """Validate and write one part; never raises for a bad record, only for unreadable input."""
    from streaming import MDSWriter
    shutil.rmtree(part_dir, ignore_errors=True)
    result, seen, hashes = PartResult(part.index), set(), []
    rejected = Counter()
    writer = MDSWriter(out=part_dir, columns=columns(opts.schema), size_limit=opts.size_limit)
    try:
        with open(os.path.join(part_dir, REJECTED), "w") as side:
            for ref, raw in read_part(part, opts):
                rid = raw.get("id") if isinstance(raw, dict) else None
                try:
                    if isinstance(raw, RecordError):
                        raise raw
                    rec = validate_record(opts.schema, raw, opts.limits,
                                          opts.classes if opts.schema == "classify" else None)
                    if rec["id"] in seen:
                        raise RecordError("duplicate_id", f"id {rec['id']!r} occurs earlier in this part")
                except RecordError as e:
                    reason, detail = e.reason, str(e)
                except Exception as e:  # noqa: BLE001 - a bad record must never stop the build
                    reason, detail = "error", f"{type(e).__name__}: {e}"
                else:
                    writer.write(rec)
                    seen.add(rec["id"])
                    hashes.append(_id_hash(rec["id"]))
                    result.written += 1
                    continue
                rejected[reason] += 1
                side.write(json.dumps({"ref": ref, "id": rid if isinstance(rid, (str, int)) else None,
                                       "reason": reason, "detail": detail}) + "\n")
    finally:
        writer.finish()
    np.save(os.path.join(part_dir, "ids.npy"), np.asarray(hashes, np.uint64))
    result.rejected = dict(rejected)
    with open(os.path.join(part_dir, DONE + ".tmp"), "w") as f:
        json.dump(asdict(result), f)
    os.replace(os.path.join(part_dir, DONE + ".tmp"), os.path.join(part_dir, DONE))
    return result


def _build_part_safe(part: Part, part_dir: str, opts: BuildOptions) -> PartResult:
    try:
        return build_part(part, part_dir, opts)
    except Exception as e:  # noqa: BLE001 - reported as a failed part, the build goes on
        return PartResult(part.index, error=f"{type(e).__name__}: {e}")


def _part_dir(out: str, part: Part) -> str:
    return os.path.join(out, "parts", f"part-{part.index:06d}")


def _load_done(part_dir: str) -> Optional[PartResult]:
    try:
        with open(os.path.join(part_dir, DONE)) as f:
            return PartResult(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _build_state(inputs: Sequence[str], fmt: Optional[str], opts: BuildOptions) -> dict:
    files = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns}
             for p in inputs]
    return {"inputs": files, "format": fmt, "options": asdict(opts)}


def _prepare_out(out: str, state: dict, overwrite: bool) -> None:
    path = os.path.join(out, BUILD_STATE)
    if overwrite and os.path.isdir(out):
        if os.listdir(out) and not (os.path.exists(path) or os.path.exists(os.path.join(out, MANIFEST))):
            raise BuildError(f"{out} is not empty and not a corpus build; refusing to delete it")
        shutil.rmtree(out)
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != state:
                raise BuildError(f"{out} holds a build of other inputs or options; "
                                 "pass --overwrite to start over or rerun with the same arguments")
    elif os.path.isdir(out) and os.listdir(out):
        raise BuildError(f"output directory {out} is not empty; pass --overwrite or choose another")
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)


def build_corpus(inputs: Sequence[str], out: str, opts: BuildOptions, fmt: Optional[str] = None,
                 workers: int = 1, overwrite: bool = False,
                 progress: Optional[Callable[[PartResult], None]] = None,
                 on_plan: Optional[Callable[[int], None]] = None) -> BuildSummary:
    """Build (or resume building) the corpus at `out`; see the module docstring."""
    t0 = time.time()
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise BuildError(f"input files not found: {', '.join(missing)}")
    if not inputs:
        raise BuildError("no input files given")
    if opts.schema == "classify":
        try:
            check_class_names(opts.classes, opts.templates, "a classify corpus")
        except CorpusError as e:
            raise BuildError(str(e)) from None
    _prepare_out(out, _build_state(inputs, fmt, opts), overwrite)
    parts = plan_parts(inputs, fmt, opts.records_per_part)
    done = {p.index: r for p in parts if (r := _load_done(_part_dir(out, p))) is not None}
    summary = BuildSummary(out, opts.schema, len(parts), parts_resumed=len(done))
    todo = [p for p in parts if p.index not in done]
    if on_plan:
        on_plan(len(todo))
    for result in _run_parts(todo, out, opts, workers):
        if result.error is None:
            done[result.index] = result
        else:
            summary.failed.append((parts[result.index].path, result.error))
        if progress:
            progress(result)
    for result in done.values():
        summary.written += result.written
        summary.rejected.update(result.rejected)
    if not summary.failed:
        _finalize(out, opts, parts, summary)
    summary.seconds = time.time() - t0
    return summary


def _run_parts(todo: list[Part], out: str, opts: BuildOptions, workers: int) -> Iterator[PartResult]:
    if workers <= 1 or len(todo) <= 1:
        for part in todo:
            yield _build_part_safe(part, _part_dir(out, part), opts)
        return
    import streaming  # noqa: F401 - import once here, not in every forked worker (seconds each)
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_build_part_safe, p, _part_dir(out, p), opts) for p in todo]
        for fut in as_completed(futures):
            yield fut.result()


def _finalize(out: str, opts: BuildOptions, parts: list[Part], summary: BuildSummary) -> None:
    schema = opts.schema
    dirs = [_part_dir(out, p) for p in parts]
    with_samples = [d for d in dirs if os.path.exists(os.path.join(d, INDEX)) and _has_shards(d)]
    total = merge_part_indexes(out, with_samples)
    assert total == summary.written, (total, summary.written)
    with open(os.path.join(out, REJECTED + ".tmp"), "wb") as side:
        for d in dirs:
            with open(os.path.join(d, REJECTED), "rb") as f:
                shutil.copyfileobj(f, side)
    os.replace(os.path.join(out, REJECTED + ".tmp"), os.path.join(out, REJECTED))
    hashes = np.concatenate([np.load(os.path.join(d, "ids.npy")) for d in dirs] or [np.zeros(0, np.uint64)])
    _, counts = np.unique(hashes, return_counts=True)
    summary.duplicate_ids = int((counts > 1).sum())
    extra = {}
    if schema == "classify":
        extra = {"classes": list(opts.classes)}
        if opts.templates:
            extra["templates"] = list(opts.templates)
    write_manifest(out, schema, total, **extra)


def _has_shards(part_dir: str) -> bool:
    with open(os.path.join(part_dir, INDEX)) as f:
        return bool(json.load(f)["shards"])
