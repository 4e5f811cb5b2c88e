"""Record validation: what passes, and the reason code of each kind of bad record."""

import io

import pytest
from PIL import Image

from finevit.data.schema import Limits, RecordError, validate_record


def image_bytes(w=64, h=48, fmt="JPEG", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, fmt)
    return buf.getvalue()


def recap(**kw):
    rec = {"id": "a", "image": image_bytes(), "captions": ["a red image"], "source": "web"}
    rec.update(kw)
    return rec


def fine(**kw):
    rec = {"id": "b", "image": image_bytes(), "global_caption": "a red image",
           "regions": [{"box": [0, 0, 10, 10], "text": "corner", "kind": "local", "score": 0.5}]}
    rec.update(kw)
    return rec


def labelled(**kw):
    rec = {"id": "c", "image": image_bytes(), "label": 2}
    rec.update(kw)
    return rec


def reason(schema, rec, limits=None, classes=None):
    with pytest.raises(RecordError) as e:
        validate_record(schema, rec, limits, classes)
    return e.value.reason


def test_classify_labels_are_indices_or_class_names():
    classes = ["cat", "dog", "owl"]
    assert validate_record("classify", labelled(), classes=classes)["label"] == 2
    assert validate_record("classify", labelled(label="dog"), classes=classes)["label"] == 1
    assert validate_record("classify", labelled(label=7))["label"] == 7  # classes unknown: any index
    for bad in (3, -1, "fox", True, 1.0, None):
        assert reason("classify", labelled(label=bad), classes=classes) == "bad_label"


def test_valid_records_are_normalised():
    r = validate_record("recaption", recap(caption="one caption", captions=None))
    assert (r["width"], r["height"], r["captions"], r["source"]) == (64, 48, ["one caption"], "web")
    f = validate_record("finecap", fine(id=7))
    assert f["id"] == "7" and f["source"] == ""
    assert f["regions"] == [{"box": [0.0, 0.0, 10.0, 10.0], "text": "corner", "kind": "local", "score": 0.5}]
    # A box touching the far edges is inside: edge coordinates run to width / height.
    validate_record("finecap", fine(regions=[{"box": [0, 0, 64, 48], "text": "all", "kind": "ocr"}]))


@pytest.mark.parametrize("schema,rec,expected", [
    ("recaption", recap(image=image_bytes()[:300]), "corrupt_image"),
    ("recaption", recap(image=b"not an image at all"), "corrupt_image"),
    ("recaption", recap(image=image_bytes(fmt="GIF")), "bad_format"),
    ("recaption", recap(image=None), "missing_image"),
    ("recaption", recap(id=" "), "missing_id"),
    ("recaption", recap(captions=[]), "missing_caption"),
    ("recaption", recap(captions=["ok", "  "]), "missing_caption"),
    ("recaption", recap(width=65), "size_mismatch"),
    ("recaption", recap(image=image_bytes(20, 48)), "too_small"),
    ("finecap", fine(global_caption=""), "missing_caption"),
    ("finecap", fine(regions=[{"box": [50, 0, 70, 10], "text": "x", "kind": "local"}]), "box_outside"),
    ("finecap", fine(regions=[{"box": [-1, 0, 10, 10], "text": "x", "kind": "local"}]), "box_outside"),
    ("finecap", fine(regions=[{"box": [5, 5, 5, 20], "text": "x", "kind": "local"}]), "degenerate_box"),
    ("finecap", fine(regions=[{"box": [5, 9, 8, 2], "text": "x", "kind": "local"}]), "degenerate_box"),
    ("finecap", fine(regions=[{"box": [0, 0, 1], "text": "x", "kind": "local"}]), "bad_box"),
    ("finecap", fine(regions=[{"box": [0, 0, 1, float("nan")], "text": "x"}]), "bad_box"),
    ("finecap", fine(regions=[{"box": [0, 0, 5, 5], "text": "", "kind": "ocr"}]), "empty_text"),
    ("finecap", fine(regions=[{"box": [0, 0, 5, 5], "text": "x", "kind": "caption"}]), "bad_kind"),
    ("finecap", fine(regions="[not json"), "bad_region"),
])
def test_bad_records_name_their_reason(schema, rec, expected):
    assert reason(schema, rec) == expected


def test_paper_filters_and_limits():
    paper = Limits(paper_filters=True)
    assert reason("recaption", recap(image=image_bytes(600, 300)), paper) == "filtered_short_side"
    assert reason("recaption", recap(image=image_bytes(1400, 450)), paper) == "filtered_aspect"
    validate_record("recaption", recap(image=image_bytes(1300, 450)), paper)  # ratio 2.9 passes
    assert reason("recaption", recap(captions=["x" * 11]), Limits(max_caption_chars=10)) == "text_too_long"
