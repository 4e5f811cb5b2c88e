"""The data_tools CLIs: --help, exit status, summaries, and what they write."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "data_tools"
NAMES = ("build_shards", "make_demo_corpus", "train_tokenizer", "stats")


def tool(name):
    spec = importlib.util.spec_from_file_location(f"data_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("name", NAMES)
def test_help(name):
    out = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout and "Exit status" in out.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    assert tool("make_demo_corpus")(["--out", str(out), "--train", "24", "--heldout", "4", "--quiet"]) == 0
    return out


def test_make_demo_corpus_refuses_to_overwrite(demo, capsys):
    assert tool("make_demo_corpus")(["--out", str(demo), "--train", "2", "--quiet"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    for part in ("recaption/train", "recaption/heldout", "finecap/train", "finecap/heldout"):
        assert (demo / part / "finevit_corpus.json").exists()


def test_build_shards_exits_zero_with_rejections(tmp_path, capsys):
    from finevit.data.demo import demo_record
    images = tmp_path / "img"
    images.mkdir()
    lines = []
    for i in range(4):
        rec = demo_record(2, "finecap", "train", i)[0]
        (images / f"{i}.png").write_bytes(rec.pop("image"))
        lines.append({**rec, "image": f"img/{i}.png"})
    lines[1]["regions"] = [{"box": [0, 0, 0, 5], "text": "x", "kind": "local"}]  # zero area
    lines[2]["image"] = "img/missing.png"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "c"
    assert tool("build_shards")([str(manifest), "--out", str(out), "--schema", "finecap", "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "written     2 records" in summary and "degenerate_box" in summary and "missing_image" in summary
    reasons = sorted(json.loads(line)["reason"] for line in open(out / "rejected.jsonl"))
    assert reasons == ["degenerate_box", "missing_image"]
    # A rerun with the same arguments finds everything done and exits 0 again.
    assert tool("build_shards")([str(manifest), "--out", str(out), "--schema", "finecap", "--quiet"]) == 0
    assert "1 done by an earlier run" in capsys.readouterr().out
    # Real failures: a missing input, or a build where nothing passes.
    assert tool("build_shards")([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"), "--schema", "finecap"]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    assert tool("build_shards")([str(bad), "--out", str(tmp_path / "y"), "--schema", "recaption", "--quiet"]) == 1
    assert "no record passed validation" in capsys.readouterr().err


def test_train_tokenizer(demo, tmp_path, capsys):
    model = tmp_path / "cap.model"
    args = [str(demo / "recaption/train"), str(demo / "finecap/train"), "--out", str(model), "--vocab-size", "600", "--quiet"]
    assert tool("train_tokenizer")(args) == 0
    assert "vocab" in capsys.readouterr().out
    from finevit.data.tokenizer import EOS_ID, CaptionTokenizer
    tok = CaptionTokenizer(str(model))
    ids = tok.encode("A wide image with a gray background")
    assert int(ids[-1]) == EOS_ID and tok.decode(ids) == "A wide image with a gray background"
    assert tool("train_tokenizer")([str(tmp_path), "--out", str(model), "--quiet"]) == 1


def test_train_llm_tokenizer(demo, tmp_path, capsys):
    """--kind llm: a Hugging Face tokenizer directory with the chat and image tokens and Qwen2's
    pre-tokenizer: whole words, and every digit its own token, so a coordinate is spelled the same
    wherever it appears."""
    out = tmp_path / "llm"
    args = [str(demo / "finecap/train"), "--kind", "llm", "--out", str(out), "--vocab-size", "700", "--quiet"]
    assert tool("train_tokenizer")(args) == 0
    vocab = int(capsys.readouterr().out.split("vocab")[1].split()[0])
    assert 300 < vocab <= 700  # a small corpus supports fewer merges than asked for
    from finevit.data.llm_tokenizer import LLMTokenizer

    tok = LLMTokenizer(str(out))
    assert tok.decode(tok.encode("a small red circle")) == "a small red circle"
    pieces = [tok.decode([i]) for i in tok.encode("[12, 340, 56, 999]")]
    assert pieces == ["[", "1", "2", ",", " ", "3", "4", "0", ",", " ", "5", "6", ",", " ", "9", "9", "9", "]"]
    assert len(tok.encode("a small red circle")) == 4


def test_stats_table_and_png(demo, tmp_path, capsys):
    png = tmp_path / "stats.png"
    assert tool("stats")([str(demo / "recaption/train"), str(demo / "finecap/train"), "--png", str(png), "--quiet"]) == 0
    table = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert rows["samples"].split()[-2:] == ["24", "24"]
    assert all(f"regions {k}" in rows for k in ("local", "ocr", "doc_ocr"))
    assert png.stat().st_size > 1000
    assert tool("stats")([str(tmp_path)]) == 1


def test_build_shards_classify_corpus_carries_its_classes(tmp_path, capsys):
    from finevit.data.corpus import open_corpus
    from finevit.data.demo import CLASSES, demo_record
    lines = []
    for i in range(3):
        rec = demo_record(0, "classify", "heldout", i)[0]
        (tmp_path / f"{i}.png").write_bytes(rec.pop("image"))
        lines.append({**rec, "image": f"{i}.png"})
    lines[1]["label"] = CLASSES[lines[1]["label"]]  # by name
    lines[2]["label"] = len(CLASSES)  # no such class
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "templates.txt").write_text("a {} shape\n")
    args = [str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "c"), "--schema", "classify", "--quiet"]
    with pytest.raises(SystemExit):  # the class names are required
        tool("build_shards")(args)
    assert "--classes is required" in capsys.readouterr().err
    args += ["--classes", str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt")]
    assert tool("build_shards")(args) == 0
    assert "bad_label" in capsys.readouterr().out
    with open_corpus(str(tmp_path / "c")) as corpus:
        assert corpus.manifest["classes"] == list(CLASSES) and corpus.manifest["templates"] == ["a {} shape"]
        assert [int(corpus[i]["label"]) for i in range(len(corpus))] == [lines[0]["label"], CLASSES.index(lines[1]["label"])]
