"""Corpus schemas and record validation.

Two schemas, each stored as MDS columns (mosaicml-streaming):

- recaption (stage 1): id, image (encoded JPEG/PNG/WebP bytes), width, height, captions (JSON
  list of one or more recaptions of the image), source.
- finecap (stage 2): id, image, width, height, global_caption, regions (JSON list of
  {box: [x0, y0, x1, y1], text, kind: local|ocr|doc_ocr, score}), source.
- classify (evaluation only): id, image, width, height, label (class index), source. The class
  names, and optionally the prompt templates that turn a name into a caption, are corpus-level
  facts: they live in the manifest (`classes`, `templates`), see corpus.py.

Boxes are in source-image pixels, edge coordinates: a box covers x0 <= x < x1, y0 <= y < y1, so
0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height; the whole image is [0, 0, width, height].

`validate_record` is the one place a record is judged, used by the shard builder (reject to the
side file) and by the reader (skip and count), so both apply the same rules.
"""

import io
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from PIL import Image

SCHEMAS = {
    "recaption": {"version": 1, "columns": {
        "id": "str", "image": "bytes", "width": "int32", "height": "int32",
        "captions": "json", "source": "str"}},
    "finecap": {"version": 1, "columns": {
        "id": "str", "image": "bytes", "width": "int32", "height": "int32",
        "global_caption": "str", "regions": "json", "source": "str"}},
    "classify": {"version": 1, "columns": {
        "id": "str", "image": "bytes", "width": "int32", "height": "int32",
        "label": "int32", "source": "str"}},
}
REGION_KINDS = ("local", "ocr", "doc_ocr")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


class RecordError(ValueError):
    """A record that breaks the schema; `reason` is a short code, the message one sentence."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Limits:
    """What a record may contain. The defaults accept anything the model can ingest."""

    min_side: int = 28  # one merged token (patch 14 x merge 2)
    max_side: int = 32768
    max_aspect: float = 200.0  # Qwen2-VL's smart_resize refuses more extreme ratios
    max_caption_chars: int = 65536
    max_region_text_chars: int = 8192
    max_regions: int = 8192
    # The paper's filters: short side >= 448 and aspect ratio within [1/3, 3].
    paper_filters: bool = False

    def check_size(self, width: int, height: int) -> None:
        short, long_ = min(width, height), max(width, height)
        if short < self.min_side:
            raise RecordError("too_small", f"image is {width}x{height}, a side is below {self.min_side} pixels")
        if long_ > self.max_side:
            raise RecordError("too_large", f"image is {width}x{height}, a side exceeds {self.max_side} pixels")
        if long_ / short > self.max_aspect:
            raise RecordError("aspect", f"image is {width}x{height}, aspect ratio above {self.max_aspect:g}")
        if self.paper_filters:
            if short < 448:
                raise RecordError("filtered_short_side", f"short side {short} < 448 (paper filter)")
            if long_ / short > 3:
                raise RecordError("filtered_aspect", f"aspect ratio {long_ / short:.2f} outside [1/3, 3] (paper filter)")


def schema_names() -> tuple[str, ...]:
    return tuple(SCHEMAS)


def columns(schema: str) -> dict[str, str]:
    if schema not in SCHEMAS:
        raise ValueError(f"unknown corpus schema '{schema}'; known: {', '.join(SCHEMAS)}")
    return dict(SCHEMAS[schema]["columns"])


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes lazily: format and size are known, pixels not yet decoded."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RecordError("too_large", f"image refused by PIL: {e}") from None
    except Exception as e:  # PIL raises many types for bad data
        raise RecordError("corrupt_image", f"cannot decode image: {e}") from None


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode fully, so a truncated or corrupt file fails here and not inside a resize."""
    try:
        img.load()
    except Exception as e:
        raise RecordError("corrupt_image", f"cannot decode image: {e}") from None
    return img


def _text(value: Any, what: str, limit: int, reason: str = "missing_text") -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(reason, f"{what} is missing or empty")
    if len(value) > limit:
        raise RecordError("text_too_long", f"{what} has {len(value)} characters, more than {limit}")
    return value


def check_region(region: Any, width: int, height: int, limits: Limits, where: str) -> dict:
    """A clean region dict, or RecordError (box outside / degenerate, empty text, bad kind)."""
    if not isinstance(region, dict):
        raise RecordError("bad_region", f"{where} is not an object")
    box = region.get("box")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise RecordError("bad_box", f"{where}.box {box!r} is not four finite numbers")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise RecordError("degenerate_box", f"{where}.box {list(box)} has zero or negative area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise RecordError("box_outside", f"{where}.box {list(box)} is outside the {width}x{height} image")
    text = _text(region.get("text"), f"{where}.text", limits.max_region_text_chars, "empty_text")
    kind = region.get("kind", "local")
    if kind not in REGION_KINDS:
        raise RecordError("bad_kind", f"{where}.kind '{kind}' is not one of {', '.join(REGION_KINDS)}")
    score = region.get("score", 1.0)
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        raise RecordError("bad_score", f"{where}.score {score!r} is not a finite number")
    return {"box": [x0, y0, x1, y1], "text": text, "kind": kind, "score": float(score)}


def check_label(label: Any, num_classes: Optional[int] = None) -> int:
    """A class index: an int in [0, num_classes) (num_classes unknown: any int >= 0)."""
    # numbers.Integral: MDS hands int32 columns back as numpy integers
    if not isinstance(label, numbers.Integral) or isinstance(label, bool) or label < 0:
        raise RecordError("bad_label", f"label {label!r} is not a class index (an integer >= 0)")
    if num_classes is not None and label >= num_classes:
        raise RecordError("bad_label", f"label {label} is not below the corpus's {num_classes} classes")
    return int(label)


def _captions(rec: dict, limits: Limits) -> list[str]:
    caps = rec.get("captions")
    if caps is None and "caption" in rec:  # a single caption under the singular name
        caps = [rec["caption"]]
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list) or not caps:
        raise RecordError("missing_caption", "captions is missing or not a non-empty list")
    return [_text(c, f"captions[{i}]", limits.max_caption_chars, "missing_caption") for i, c in enumerate(caps)]


def validate_record(schema: str, rec: dict, limits: Optional[Limits] = None,
                    classes: Optional[Sequence[str]] = None) -> dict:
    """The record as it is stored (column -> value), or RecordError naming the first problem.

    `rec["image"]` holds encoded bytes. Width and height are taken from the image; when the
    record states them they must agree. The image is decoded fully only after the cheap checks.
    A classify record's label is a class index, or one of `classes` by name.
    """
    limits = limits or Limits()
    cols = columns(schema)
    rid = rec.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid.strip():
        raise RecordError("missing_id", "id is missing or empty")
    data = rec.get("image")
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RecordError("missing_image", "image bytes are missing")
    img = open_image(bytes(data))
    if img.format not in IMAGE_FORMATS:
        raise RecordError("bad_format", f"image format {img.format} is not one of {', '.join(IMAGE_FORMATS)}")
    width, height = img.size
    for key, actual in (("width", width), ("height", height)):
        stated = rec.get(key)
        if stated is not None and stated != actual:
            raise RecordError("size_mismatch", f"{key}={stated} but the image is {width}x{height}")
    limits.check_size(width, height)
    out = {"id": rid, "image": bytes(data), "width": width, "height": height,
           "source": str(rec.get("source") or "")}
    if schema == "recaption":
        out["captions"] = _captions(rec, limits)
    elif schema == "classify":
        label = rec.get("label")
        if isinstance(label, str) and classes is not None and label in classes:
            label = list(classes).index(label)
        out["label"] = check_label(label, len(classes) if classes is not None else None)
    else:
        out["global_caption"] = _text(rec.get("global_caption"), "global_caption",
                                      limits.max_caption_chars, "missing_caption")
        regions = rec.get("regions", [])
        if isinstance(regions, str):
            try:
                regions = json.loads(regions)
            except json.JSONDecodeError:
                raise RecordError("bad_region", "regions is a string that is not valid JSON") from None
        if not isinstance(regions, list):
            raise RecordError("bad_region", "regions is not a list")
        if len(regions) > limits.max_regions:
            raise RecordError("too_many_regions", f"{len(regions)} regions, more than {limits.max_regions}")
        out["regions"] = [check_region(r, width, height, limits, f"regions[{i}]") for i, r in enumerate(regions)]
    load_pixels(img)  # last: the only expensive check
    assert set(out) == set(cols), (sorted(out), sorted(cols))
    return out
