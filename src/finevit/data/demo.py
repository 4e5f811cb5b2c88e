"""A deterministic synthetic corpus whose captions are exactly determined by the pixels.

Every image is a 3x3 grid of cells; each object sits inside its own cell, so nothing overlaps and
"where" is always one of nine names. A scene is either
- a picture: a plain background with 1-4 shapes (circle, square, triangle, diamond; 8 colours;
  small / medium / large) and 0-2 rendered words (PIL's bitmap font, scaled up by whole pixels),
- or a document: a white page with 2-5 lines of capital words.
The classify schema's held-out split holds pictures of a single shape labelled with its colour and
kind ("red circle", 32 classes) for zero-shot classification.
Captions name everything visible and nothing else, so a model can learn them from pixels alone;
the three caption templates (standing in for the paper's three captioners) parse back to the
same facts (`parse_caption`), which is what the tests check.

Sample i of (seed, schema, split) depends on nothing else: the corpus is byte-identical across
runs and machines with the same Pillow / zlib / libjpeg / libwebp.
"""

import io
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0), "beige": (225, 210, 175)}
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 210, 30),
           "purple": (140, 50, 170), "orange": (245, 130, 20), "cyan": (30, 200, 210), "pink": (250, 140, 190)}
TEXT_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.4, "medium": 0.65, "large": 0.9}  # of the cell's shorter side
WORDS = ("APPLE", "RIVER", "STONE", "CLOUD", "TIGER", "MAPLE", "OCEAN", "PIANO", "LEMON", "ROBOT",
         "SUN", "MOON", "STAR", "TREE", "BIRD", "FISH", "DOOR", "LAMP", "BOOK", "SHIP", "KING", "ROSE",
         "CAT", "DOG", "OWL", "BEE", "CUP", "KEY", "MAP", "BOX")
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 2), (2, 3))
SHORT_SIDES = (168, 224, 280, 336, 392, 448)
FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass
class Item:
    """One drawn thing; `box` is its exact pixel extent [x0, y0, x1, y1) in edge coordinates."""

    kind: str  # shape | word | line
    cell: int = -1
    shape: str = ""
    colour: str = ""
    size: str = ""
    text: str = ""
    box: tuple = ()


@dataclass
class Scene:
    width: int
    height: int
    background: str
    document: bool
    items: list = field(default_factory=list)

    @property
    def orientation(self) -> str:
        return "square" if self.width == self.height else ("wide" if self.width > self.height else "tall")

    def facts(self) -> tuple:
        """What the captions state, in a canonical form to compare parsed captions against."""
        if self.document:
            return ("document", self.orientation, tuple(i.text for i in self.items))
        objs = tuple((CELLS[i.cell], i.kind, i.size, i.colour, i.shape or i.text) for i in self.items)
        return ("picture", self.orientation, self.background, objs)


_FONT = ImageFont.load_default_imagefont()


def _text_mask(text: str, scale: int) -> Image.Image:
    """The ink of `text` in the bitmap font, cropped to its bounding box, scaled by whole pixels."""
    im = Image.new("L", (6 * len(text) + 8, 16))
    ImageDraw.Draw(im).text((0, 0), text, fill=255, font=_FONT)
    im = im.crop(im.getbbox())
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def _text_colour(background: str) -> str:
    return "white" if background == "black" else "black"


def _canvas(rng: np.random.Generator) -> tuple[int, int]:
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    short = int(SHORT_SIDES[rng.integers(len(SHORT_SIDES))])
    return (short * aw // ah, short) if aw >= ah else (short, short * ah // aw)


def _shape(rng: np.random.Generator, cell: int, cw: int, ch: int) -> Item:
    """A shape of random size, kind and colour somewhere inside `cell` (cells are cw x ch)."""
    x0, y0 = (cell % 3) * cw, (cell // 3) * ch
    size = list(SIZES)[rng.integers(3)]
    side = int(min(cw, ch) * SIZES[size])
    ox, oy = int(rng.integers(0, cw - side + 1)), int(rng.integers(0, ch - side + 1))
    return Item("shape", cell, SHAPES[rng.integers(4)], list(COLOURS)[rng.integers(8)],
                size, box=(x0 + ox, y0 + oy, x0 + ox + side, y0 + oy + side))


def make_scene(rng: np.random.Generator) -> Scene:
    w, h = _canvas(rng)
    if rng.random() < 0.2:
        scene = Scene(w, h, "white", True)
        n_lines = int(rng.integers(2, 6))
        lines = [" ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in range(n_lines)]
        _layout_document(scene, lines)
        return scene
    scene = Scene(w, h, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], False)
    n_shapes, n_words = int(rng.integers(1, 5)), int(rng.integers(0, 3))
    cells = sorted(rng.choice(9, n_shapes + n_words, replace=False).tolist())
    kinds = ["shape"] * n_shapes + ["word"] * n_words
    kinds = [kinds[j] for j in rng.permutation(len(kinds))]
    cw, ch = w // 3, h // 3
    for cell, kind in zip(cells, kinds):
        x0, y0 = (cell % 3) * cw, (cell // 3) * ch
        if kind == "shape":
            scene.items.append(_shape(rng, cell, cw, ch))
        else:
            word = str(WORDS[rng.integers(len(WORDS))])
            mask = _text_mask(word, 1)
            scale = max(1, min(4, int(cw * 0.9) // mask.width, int(ch * 0.6) // mask.height))
            mw, mh = mask.width * scale, mask.height * scale
            ox, oy = int(rng.integers(0, cw - mw + 1)), int(rng.integers(0, ch - mh + 1))
            scene.items.append(Item("word", cell, colour=_text_colour(scene.background), text=word,
                                    box=(x0 + ox, y0 + oy, x0 + ox + mw, y0 + oy + mh)))
    return scene


def _layout_document(scene: Scene, lines: list[str]) -> None:
    masks = [_text_mask(line, 1) for line in lines]
    margin = scene.width // 12
    pitch = scene.height // (len(lines) + 1)
    scale = max(1, min(4, (scene.width - 2 * margin) // max(m.width for m in masks),
                       int(pitch * 0.6) // max(m.height for m in masks)))
    for k, (line, mask) in enumerate(zip(lines, masks)):
        y = pitch * (k + 1) - mask.height * scale // 2
        scene.items.append(Item("line", text=line, colour="black",
                                box=(margin, y, margin + mask.width * scale, y + mask.height * scale)))


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for it in scene.items:
        x0, y0, x1, y1 = it.box
        if it.kind == "shape":
            rgb = COLOURS[it.colour]
            # PIL's shape coordinates are inclusive: the last pixel drawn is x1 - 1.
            if it.shape == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
            elif it.shape == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
            elif it.shape == "triangle":
                draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=rgb)
            else:
                cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
                draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=rgb)
        else:
            mask = _text_mask(it.text, 1)
            mask = mask.resize((x1 - x0, y1 - y0), Image.NEAREST)
            img.paste(TEXT_COLOURS[it.colour], (x0, y0), mask)
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=95)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", lossless=True)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- captions

def _count_phrase(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def caption_long(scene: Scene) -> str:
    if scene.document:
        out = [f"A {scene.orientation} image of a document page with {_count_phrase(len(scene.items), 'line')} of text."]
        out += [f'Line {k} reads "{it.text}".' for k, it in enumerate(scene.items, 1)]
        return " ".join(out)
    shapes = sum(it.kind == "shape" for it in scene.items)
    out = [f"A {scene.orientation} image with a {scene.background} background, showing "
           f"{_count_phrase(shapes, 'shape')} and {_count_phrase(len(scene.items) - shapes, 'word')}."]
    for it in scene.items:
        if it.kind == "shape":
            out.append(f"At the {CELLS[it.cell]} there is a {it.size} {it.colour} {it.shape}.")
        else:
            out.append(f'At the {CELLS[it.cell]} the word "{it.text}" is written in {it.colour}.')
    return " ".join(out)


def caption_list(scene: Scene) -> str:
    if scene.document:
        return f"{scene.orientation} document; " + "; ".join(f'line "{it.text}"' for it in scene.items)
    parts = [f"{scene.orientation} picture", f"background {scene.background}"]
    for it in scene.items:
        if it.kind == "shape":
            parts.append(f"{it.size} {it.colour} {it.shape} at {CELLS[it.cell]}")
        else:
            parts.append(f'word "{it.text}" in {it.colour} at {CELLS[it.cell]}')
    return "; ".join(parts)


def caption_terse(scene: Scene) -> str:
    if scene.document:
        return f"{scene.orientation} page: " + " / ".join(it.text for it in scene.items)
    objs = [f"{CELLS[it.cell]} {it.size} {it.colour} {it.shape}" if it.kind == "shape"
            else f"{CELLS[it.cell]} {it.colour} {it.text}" for it in scene.items]
    return f"{scene.background} {scene.orientation}: " + ", ".join(objs)


def captions(scene: Scene) -> list[str]:
    return [caption_long(scene), caption_list(scene), caption_terse(scene)]


_CELL = "|".join(sorted(CELLS, key=len, reverse=True))
_LONG_SHAPE = re.compile(rf"At the ({_CELL}) there is a (\w+) (\w+) (\w+)\.")
_LONG_WORD = re.compile(rf'At the ({_CELL}) the word "([A-Z]+)" is written in (\w+)\.')
_LIST_SHAPE = re.compile(rf"^(\w+) (\w+) (\w+) at ({_CELL})$")
_LIST_WORD = re.compile(rf'^word "([A-Z]+)" in (\w+) at ({_CELL})$')
_TERSE_OBJ = re.compile(rf"^({_CELL}) (?:(small|medium|large) (\w+) (\w+)|(\w+) ([A-Z]+))$")


def parse_caption(text: str) -> tuple:
    """The facts a caption of any of the three templates states (same form as Scene.facts)."""
    if m := re.match(r"A (\w+) image of a document page with \d+ lines? of text\.", text):
        return ("document", m.group(1), tuple(re.findall(r'Line \d+ reads "([A-Z ]+)"\.', text)))
    if m := re.match(r"(\w+) document; ", text):
        return ("document", m.group(1), tuple(re.findall(r'line "([A-Z ]+)"', text)))
    if m := re.match(r"(\w+) page: (.*)$", text):
        return ("document", m.group(1), tuple(m.group(2).split(" / ")))
    if m := re.match(r"A (\w+) image with a (\w+) background", text):
        objs = [(pos, (c, "shape", s, col, sh)) for pos, (c, s, col, sh) in
                ((m2.start(), m2.groups()) for m2 in _LONG_SHAPE.finditer(text))]
        objs += [(m2.start(), (m2.group(1), "word", "", m2.group(3), m2.group(2))) for m2 in _LONG_WORD.finditer(text)]
        return ("picture", m.group(1), m.group(2), tuple(o for _, o in sorted(objs)))
    if m := re.match(r"(\w+) picture; background (\w+)", text):
        objs = []
        for part in text.split("; ")[2:]:
            if w := _LIST_WORD.match(part):
                objs.append((w.group(3), "word", "", w.group(2), w.group(1)))
            elif s := _LIST_SHAPE.match(part):
                objs.append((s.group(4), "shape", s.group(1), s.group(2), s.group(3)))
        return ("picture", m.group(1), m.group(2), tuple(objs))
    if m := re.match(r"(\w+) (\w+): (.*)$", text):
        objs = []
        for part in m.group(3).split(", "):
            o = _TERSE_OBJ.match(part)
            if o and o.group(2):
                objs.append((o.group(1), "shape", o.group(2), o.group(3), o.group(4)))
            elif o:
                objs.append((o.group(1), "word", "", o.group(5), o.group(6)))
        return ("picture", m.group(2), m.group(1), tuple(objs))
    raise ValueError(f"not a demo caption: {text!r}")


def regions(scene: Scene) -> list[dict]:
    kind = {"shape": "local", "word": "ocr", "line": "doc_ocr"}
    return [{"box": [float(v) for v in it.box], "kind": kind[it.kind], "score": 1.0,
             "text": f"a {it.size} {it.colour} {it.shape}" if it.kind == "shape" else it.text}
            for it in scene.items]


# ----------------------------------------------------------------------------- classification

# The labelled split for zero-shot classification: one shape per picture, class = colour x shape.
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# Prompts in the captions' own words; position and background vary, so they name neither.
CLASS_TEMPLATES = tuple(f"{lead}{size} {{}}{end}" for lead, end in (("there is a ", "."), ("", ""))
                        for size in SIZES)


def make_labelled_scene(rng: np.random.Generator) -> tuple[Scene, int]:
    """A picture holding exactly one shape (any canvas, background, cell and size) and its label."""
    w, h = _canvas(rng)
    scene = Scene(w, h, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], False)
    scene.items.append(_shape(rng, int(rng.integers(9)), w // 3, h // 3))
    item = scene.items[0]
    return scene, CLASSES.index(f"{item.colour} {item.shape}")


# ----------------------------------------------------------------------------- corpus

_STREAM_CODES = {"recaption": 1, "finecap": 2, "classify": 3, "train": 1, "heldout": 2}


def _rng(seed: int, schema: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM_CODES[schema], _STREAM_CODES[split], index])


def demo_scene(seed: int, schema: str, split: str, index: int) -> Scene:
    """The scene of record `index`, without rendering it."""
    return make_scene(_rng(seed, schema, split, index))


def demo_record(seed: int, schema: str, split: str, index: int) -> tuple[dict, Scene]:
    """Record `index` of the demo corpus (raw, as build_shards would receive it) and its scene."""
    rng = _rng(seed, schema, split, index)
    scene, label = make_labelled_scene(rng) if schema == "classify" else (make_scene(rng), -1)
    fmt = FORMATS[int(rng.integers(len(FORMATS)))]
    rec = {"id": f"{schema[:2]}-{split}-{index:07d}", "image": encode(render(scene), fmt),
           "width": scene.width, "height": scene.height, "source": f"demo:{fmt.lower()}"}
    if schema == "classify":
        rec["label"] = label
    elif schema == "recaption":
        rec["captions"] = captions(scene)
    else:
        rec["global_caption"] = caption_long(scene)
        rec["regions"] = regions(scene)
    return rec, scene


def write_demo_corpus(out: str, seed: int = 0, train: int = 1000, heldout: int = 100,
                      schemas: tuple = ("recaption", "finecap"), size_limit: str = "16mb",
                      progress: Optional[callable] = None) -> dict[str, str]:
    """Write out/<schema>/<split> corpus directories; returns {"<schema>/<split>": path}.

    The classify schema has a held-out split only: it is for evaluation."""
    from finevit.data.corpus import CorpusWriter
    from finevit.data.schema import validate_record
    paths = {}
    for schema in schemas:
        extra = {"classes": list(CLASSES), "templates": list(CLASS_TEMPLATES)} if schema == "classify" else {}
        for split, n in (("train", train), ("heldout", heldout)):
            if n <= 0 or (schema == "classify" and split == "train"):
                continue
            path = f"{out}/{schema}/{split}"
            with CorpusWriter(path, schema, size_limit=size_limit, **extra) as writer:
                for i in range(n):
                    writer.write(validate_record(schema, demo_record(seed, schema, split, i)[0]))
                    if progress:
                        progress(1)
            paths[f"{schema}/{split}"] = path
    return paths
