"""build_corpus round trips from JSONL, webdataset tar and parquet; rejected records; resume;
the corpus reader's manifest checks (schema, version, remote cache)."""

import base64
import io
import json
import os
import tarfile

import pytest

from finevit.data.build import BuildError, BuildOptions, build_corpus
from finevit.data.corpus import MANIFEST, CorpusError, open_corpus
from finevit.data.demo import demo_record

BAD = {  # id -> expected reason; every format carries these five
    "bad-jpeg": "corrupt_image", "bad-nocap": "missing_caption", "bad-outside": "box_outside",
    "bad-zero": "degenerate_box", "bad-empty": "empty_text",
}


def raw_records(schema: str, n_good: int = 7) -> list[dict]:
    """Good demo records interleaved with one record of each BAD kind (raw, image as bytes)."""
    good = [demo_record(5, schema, "train", i)[0] for i in range(n_good)]
    base = demo_record(5, "finecap", "train", 99)[0]
    w, h = base["width"], base["height"]
    text_key = {"captions": ["fine"]} if schema == "recaption" else {"global_caption": "fine"}
    bad = [
        {**base, **text_key, "id": "bad-jpeg", "image": base["image"][: len(base["image"]) // 3]},
        {**base, "id": "bad-nocap", "captions": [], "global_caption": ""},
        {**base, **text_key, "id": "bad-outside", "regions": [{"box": [0, 0, w + 5, 10], "text": "x", "kind": "local"}]},
        {**base, **text_key, "id": "bad-zero", "regions": [{"box": [4, 4, 4, 9], "text": "x", "kind": "local"}]},
        {**base, **text_key, "id": "bad-empty", "regions": [{"box": [0, 0, 9, 9], "text": " ", "kind": "ocr"}]},
    ]
    if schema == "recaption":  # box problems only exist in finecap: make them caption problems
        for r in bad[2:]:
            r["captions"] = [""] if r["id"] != "bad-outside" else None
        expected = {"bad-outside": "missing_caption", "bad-zero": "missing_caption", "bad-empty": "missing_caption"}
    else:
        expected = {}
    out = []
    for i, g in enumerate(good):
        out.append(g)
        if i < len(bad):
            out.append(bad[i])
    return out, {**BAD, **expected}


def write_jsonl(records: list[dict], path) -> list[str]:
    img_dir = path.parent / "images"
    img_dir.mkdir(exist_ok=True)
    with open(path, "w") as f:
        for i, r in enumerate(records):
            r = dict(r)
            if i % 2:  # half inline base64, half image files next to the manifest
                r["image_b64"] = base64.b64encode(r.pop("image")).decode()
            else:
                (img_dir / f"{r['id']}.bin").write_bytes(r.pop("image"))
                r["image"] = f"images/{r['id']}.bin"
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    return [str(path)]


def write_tar(records: list[dict], path) -> list[str]:
    """Two tars, as webdataset shards are one part each."""
    half, second = len(records) // 2, path.with_name(path.stem + "-1.tar")
    _write_one_tar(records[:half], path)
    _write_one_tar(records[half:], second)
    return [str(path), str(second)]


def _write_one_tar(records: list[dict], path) -> None:
    with tarfile.open(path, "w") as tar:
        for r in records:
            meta = {k: v for k, v in r.items() if k != "image"}
            for name, data in ((f"{r['id']}.jpg", r["image"]), (f"{r['id']}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_parquet(records: list[dict], path) -> list[str]:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{**r, "regions": json.dumps(r.get("regions", []))} for r in records]
    cols = sorted({k for r in rows for k in r})
    table = pa.table({k: [r.get(k) for r in rows] for k in cols})
    pq.write_table(table, path, row_group_size=5)
    return [str(path)]


WRITERS = {"jsonl": (write_jsonl, "in.jsonl"), "wds": (write_tar, "in.tar"), "parquet": (write_parquet, "in.parquet")}


@pytest.mark.parametrize("fmt,schema,workers", [("jsonl", "finecap", 2), ("wds", "recaption", 1),
                                                ("parquet", "finecap", 1), ("jsonl", "recaption", 1)])
def test_round_trip_and_rejections(tmp_path, fmt, schema, workers):
    records, expected_bad = raw_records(schema)
    write, name = WRITERS[fmt]
    inputs = write(records, tmp_path / name)
    out = str(tmp_path / "corpus")
    summary = build_corpus(inputs, out, BuildOptions(schema, records_per_part=4), workers=workers)
    good = [r for r in records if not r["id"].startswith("bad-")]
    assert summary.complete and summary.written == len(good) and summary.parts > 1
    with open_corpus(out, expect_schema=schema) as corpus:
        assert len(corpus) == len(good)
        for i, want in enumerate(good):  # every field, in input order
            row = corpus[i]
            assert row["id"] == want["id"] and row["image"] == want["image"] and row["source"] == want["source"]
            assert (row["width"], row["height"]) == (want["width"], want["height"])
            if schema == "recaption":
                assert row["captions"] == want["captions"]
            else:
                assert row["global_caption"] == want["global_caption"]
                assert row["regions"] == want["regions"]
    rejected = [json.loads(line) for line in open(os.path.join(out, "rejected.jsonl"))]
    got = {r["id"]: r["reason"] for r in rejected if r["id"]}
    assert got == expected_bad
    assert all(r["ref"].startswith(str(tmp_path / "in")) and r["detail"] for r in rejected)
    if fmt == "jsonl":  # the unparseable last line has no id but is reported with its line number
        assert [r["reason"] for r in rejected if not r["id"]] == ["bad_json"]
        assert any(r["ref"].endswith(f":{len(records) + 1}") for r in rejected)


def test_resume_after_interruption(tmp_path):
    records, _ = raw_records("finecap", n_good=9)
    write_jsonl(records, tmp_path / "in.jsonl")
    out, opts = str(tmp_path / "c"), BuildOptions("finecap", records_per_part=3)
    first = build_corpus([str(tmp_path / "in.jsonl")], out, opts)
    with open_corpus(out) as c:
        ids = [c[i]["id"] for i in range(len(c))]
    # Interrupt: part 2 never finished (no DONE marker, partial files), the corpus was not finalised.
    os.remove(os.path.join(out, "parts", "part-000002", "DONE.json"))
    os.remove(os.path.join(out, MANIFEST))
    with pytest.raises(CorpusError, match="not a finevit corpus"):
        open_corpus(out)
    second = build_corpus([str(tmp_path / "in.jsonl")], out, opts)
    assert second.parts_resumed == first.parts - 1 and second.written == first.written
    assert second.rejected == first.rejected
    with open_corpus(out) as c:
        assert [c[i]["id"] for i in range(len(c))] == ids
    with pytest.raises(BuildError, match="other inputs or options"):
        build_corpus([str(tmp_path / "in.jsonl")], out, BuildOptions("recaption", records_per_part=3))


def test_paper_filters_reject_small_images(tmp_path):
    from finevit.data.schema import Limits
    records = [demo_record(1, "recaption", "train", i)[0] for i in range(6)]
    write_jsonl(records, tmp_path / "in.jsonl")
    summary = build_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "c"),
                           BuildOptions("recaption", Limits(paper_filters=True)))
    keep = [r for r in records if min(r["width"], r["height"]) >= 448 and max(r["width"], r["height"]) <= 3 * min(r["width"], r["height"])]
    assert summary.written == len(keep)
    assert sum(v for k, v in summary.rejected.items() if k.startswith("filtered")) == len(records) - len(keep)


def test_reader_refuses_wrong_schema_or_version(tmp_path, demo_dir):
    import shutil
    src = os.path.join(demo_dir, "recaption", "heldout")
    with pytest.raises(CorpusError, match="expected 'finecap'"):
        open_corpus(src, expect_schema="finecap")
    bad = tmp_path / "v2"
    shutil.copytree(src, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(CorpusError, match="version 2, but this finevit reads version 1"):
        open_corpus(str(bad))
    with pytest.raises(CorpusError, match="not a finevit corpus"):
        open_corpus(str(tmp_path))


def test_remote_corpus_reads_through_cache(tmp_path, demo_dir):
    # A remote given as a plain path exercises streaming's download-into-cache path.
    remote = os.path.join(demo_dir, "finecap", "heldout")
    with open_corpus(remote, cache=str(tmp_path / "cache")) as c, open_corpus(remote) as direct:
        assert c.schema == "finecap" and len(c) == len(direct)
        assert [c[i]["id"] for i in range(len(c))] == [direct[i]["id"] for i in range(len(c))]
    assert (tmp_path / "cache" / MANIFEST).exists() and any(p.suffix == ".mds" for p in (tmp_path / "cache").iterdir())


def test_unreadable_input_fails_its_part_only_and_resumes(tmp_path):
    records, _ = raw_records("recaption", n_good=4)
    good = write_tar(records, tmp_path / "a.tar")
    broken = tmp_path / "b.tar"
    broken.write_bytes(b"this is not a tar archive" * 40)
    out, opts = str(tmp_path / "c"), BuildOptions("recaption")
    summary = build_corpus(good + [str(broken)], out, opts)
    assert [path for path, _ in summary.failed] == [str(broken)] and not summary.complete
    assert not os.path.exists(os.path.join(out, MANIFEST))  # an incomplete corpus is never readable
    write_tar(records[:2], broken)  # the input is fixed: same path (a new size), so pass --overwrite
    with pytest.raises(BuildError, match="other inputs"):
        build_corpus(good + [str(broken)], out, opts)
    assert build_corpus(good + [str(broken)], out, opts, overwrite=True).complete
