"""The demo corpus: deterministic bytes, captions that parse back to the scene, and pixels that
show what the captions and regions say."""

import hashlib
import io
import os

import numpy as np
from PIL import Image

from finevit.data.demo import BACKGROUNDS, COLOURS, TEXT_COLOURS, demo_record, demo_scene, parse_caption, write_demo_corpus


def tree_digest(root) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_same_seed_same_bytes(tmp_path):
    a = write_demo_corpus(str(tmp_path / "a"), seed=3, train=6, heldout=2)
    write_demo_corpus(str(tmp_path / "b"), seed=3, train=6, heldout=2)
    write_demo_corpus(str(tmp_path / "c"), seed=4, train=6, heldout=2)
    assert sorted(a) == ["finecap/heldout", "finecap/train", "recaption/heldout", "recaption/train"]
    da, db, dc = (tree_digest(tmp_path / x) for x in "abc")
    assert da == db and len(da) == 12  # 4 corpora x (manifest, index, shard)
    assert da != dc


def test_captions_parse_back_to_the_scene(recap, finecap):
    for corpus in (recap, finecap):
        for i in range(len(corpus)):
            row = corpus[i]
            split_index = int(row["id"].rsplit("-", 1)[1])
            scene = demo_scene(0, corpus.schema, "train", split_index)
            if i < 8:  # regenerating the pixels too is slower; a few suffice
                assert row["image"] == demo_record(0, corpus.schema, "train", split_index)[0]["image"]
            texts = row["captions"] if corpus.schema == "recaption" else [row["global_caption"]]
            assert len(texts) == (3 if corpus.schema == "recaption" else 1)
            for text in texts:
                assert parse_caption(text) == scene.facts(), text


def nearest(rgb, palette: dict) -> str:
    return min(palette, key=lambda k: sum((int(a) - b) ** 2 for a, b in zip(rgb, palette[k])))


def test_pixels_show_what_regions_say(finecap):
    checked = {"local": 0, "ocr": 0, "doc_ocr": 0}
    for i in range(len(finecap)):
        row = finecap[i]
        img = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        assert img.shape[:2] == (row["height"], row["width"])
        facts = parse_caption(row["global_caption"])
        if facts[0] == "picture":  # the background is the most common colour
            packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
            values, counts = np.unique(packed, return_counts=True)
            top = int(values[counts.argmax()])
            assert nearest((top >> 16, (top >> 8) & 255, top & 255), BACKGROUNDS) == facts[2]
        for reg in row["regions"]:
            x0, y0, x1, y1 = (int(v) for v in reg["box"])
            patch = img[y0:y1, x0:x1]
            if reg["kind"] == "local":  # "a large red circle": the box centre is red
                assert nearest(img[(y0 + y1) // 2, (x0 + x1) // 2], COLOURS) == reg["text"].split()[2]
            else:  # rendered text: the box is tight around ink, so every edge line touches ink
                bg = BACKGROUNDS[facts[2]] if facts[0] == "picture" else BACKGROUNDS["white"]
                ink = TEXT_COLOURS["white" if bg == BACKGROUNDS["black"] else "black"]
                p = patch.astype(int)
                is_ink = np.abs(p - ink).sum(-1) < np.abs(p - bg).sum(-1)
                assert is_ink[0].any() and is_ink[-1].any() and is_ink[:, 0].any() and is_ink[:, -1].any()
            checked[reg["kind"]] += 1
    assert min(checked.values()) > 0, checked


def test_heldout_is_disjoint(demo_dir):
    from finevit.data.corpus import open_corpus
    for schema in ("recaption", "finecap"):
        with open_corpus(os.path.join(demo_dir, schema, "train")) as t, \
                open_corpus(os.path.join(demo_dir, schema, "heldout")) as h:
            train_imgs = {hashlib.sha256(t[i]["image"]).digest() for i in range(len(t))}
            held = [h[i] for i in range(len(h))]
            assert all(r["id"].split("-")[1] == "heldout" for r in held)
            assert not train_imgs & {hashlib.sha256(r["image"]).digest() for r in held}
