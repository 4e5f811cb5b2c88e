"""Stage 2's samples: a finecap record (or a recaption one) as a multi-turn conversation in the
LLM's chat template, with the loss on the answers only.

One sample is one image and its turns; several regions of the image become several turns, so the
image is encoded once:

    <|im_start|>system\\n{system}<|im_end|>\\n                      (when data.llm.system_prompt)
    <|im_start|>user\\n<|vision_start|><|image_pad|> x N<|vision_end|>{q1}<|im_end|>\\n
    <|im_start|>assistant\\n{a1}<|im_end|>\\n
    <|im_start|>user\\n{q2}<|im_end|>\\n<|im_start|>assistant\\n{a2}<|im_end|>\\n  ...

N is the image's merged token count (t * h * w / 4 patches). Labels are -100 except on each
answer's tokens and the `<|im_end|>` that closes it (the model learns to stop).

The five FineCap tasks (weights: data.llm.tasks), each needing its material:

    caption      "Describe this image in detail."          -> the global caption
    box_to_text  "Describe the region [x0, y0, x1, y1]."   -> a local region's caption
    text_to_box  'Locate "{text}". Answer with its box.'    -> [x0, y0, x1, y1] of that region
    box_to_ocr   "Read the text in the region [...]."      -> an OCR line (kind ocr / doc_ocr)
    ocr_to_box   'Where is the text "{text}"? ...'          -> its box

A grounding question (text -> box) only asks about a text that names one region of the image.
Every turn draws a task by weight among those with material left, and a region not yet used in
this sample; the caption is asked at most once. A recaption record has one caption turn.

Boxes: "[x0, y0, x1, y1]", integers, edge coordinates. data.llm.box_format "absolute" gives
pixels of the resized image the model sees (Qwen2.5-VL's convention); "norm1000" gives 0..1000
of its width and height. Boxes come from the preprocessor, which moved them with every resize
and flip, so the numbers always describe the pixels.
"""

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from finevit.config.data import CONVERSATION_TASKS, LLMDataConfig
from finevit.data.llm_tokenizer import LLMTokenizer
from finevit.data.schema import RecordError

IGNORE = -100  # label of a token the loss skips

QUESTIONS = {
    "caption": "Describe this image in detail.",
    "box_to_text": "Describe the region {box}.",
    "text_to_box": 'Locate "{text}" in the image. Answer with its box.',
    "box_to_ocr": "Read the text in the region {box}.",
    "ocr_to_box": 'Where is the text "{text}"? Answer with its box.',
}
KINDS = {"box_to_text": ("local",), "text_to_box": ("local",), "box_to_ocr": ("ocr", "doc_ocr"),
         "ocr_to_box": ("ocr", "doc_ocr")}
GROUNDING = ("text_to_box", "ocr_to_box")


@dataclass
class Turn:
    task: str
    question: str
    answer: str
    region: int = -1  # index into the sample's regions, -1 for the caption


def format_box(box, size: tuple[int, int], box_format: str) -> str:
    """[x0, y0, x1, y1] of a box in resized pixels, as the answer text; size = (width, height)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = size
    if box_format == "norm1000":
        x0, x1, y0, y1 = x0 * 1000 / w, x1 * 1000 / w, y0 * 1000 / h, y1 * 1000 / h
        w = h = 1000
    vals = [min(max(round(x0), 0), w), min(max(round(y0), 0), h), min(max(round(x1), 0), w), min(max(round(y1), 0), h)]
    return "[" + ", ".join(str(v) for v in vals) + "]"


def parse_box(text: str) -> Optional[list[float]]:
    """The first "[x0, y0, x1, y1]" in a generated answer, or None."""
    m = re.search(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]", text)
    return [float(v) for v in m.groups()] if m else None


def _material(texts: list[str], kinds: list[str]) -> dict[str, list[int]]:
    """Regions each task may ask about."""
    counts: dict = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    out = {}
    for task, allowed in KINDS.items():
        out[task] = [i for i, k in enumerate(kinds) if k in allowed and texts[i].strip()
                     and (task not in GROUNDING or counts[texts[i]] == 1)]
    return out


def plan_turns(caption: str, boxes, texts: list[str], kinds: list[str], size: tuple[int, int],
               cfg: LLMDataConfig, rng: np.random.Generator) -> list[Turn]:
    """The sample's turns, drawn as the module docstring says (at most 1 + cfg.max_turns)."""
    weights = {t: float(cfg.tasks.get(t, 0.0)) for t in CONVERSATION_TASKS}
    pools = _material(texts, kinds)
    pools["caption"] = [-1] if caption.strip() else []
    used: set = set()
    turns: list[Turn] = []
    while len(turns) < 1 + cfg.max_turns:
        live = [t for t in CONVERSATION_TASKS if weights[t] > 0 and any(i not in used for i in pools[t])]
        if not live:
            break
        p = np.array([weights[t] for t in live])
        task = live[int(rng.choice(len(live), p=p / p.sum()))]
        free = [i for i in pools[task] if i not in used]
        region = free[int(rng.integers(len(free)))]
        used.add(region)
        if task == "caption":
            turns.append(Turn(task, QUESTIONS[task], caption.strip()))
            continue
        box, text = format_box(boxes[region], size, cfg.box_format), texts[region].strip()
        question = QUESTIONS[task].format(box=box, text=text)
        turns.append(Turn(task, question, box if task in GROUNDING else text, region))
    return turns


class ConversationEncoder:
    """Sample (preprocessed image + caption / regions) -> LLM ids and labels, in DataLoader
    workers. Stops adding turns at the row budget; a sample whose first turn does not fit is a
    bad sample (skipped and counted by the loader)."""

    def __init__(self, tokenizer: LLMTokenizer, cfg: LLMDataConfig, patch_size: int, merge_unit: int):
        self.tok, self.cfg = tokenizer, cfg
        self.patch_size, self.merge_unit = patch_size, merge_unit
        ids = tokenizer.ids
        self.nl = tokenizer.encode("\n")
        self.user = [ids["im_start"]] + tokenizer.encode("user\n")
        self.assistant = [ids["im_start"]] + tokenizer.encode("assistant\n")
        self.end = [ids["im_end"]]
        self.system = ([ids["im_start"]] + tokenizer.encode("system\n" + cfg.system_prompt) + self.end + self.nl
                       if cfg.system_prompt else [])

    def image_block(self, grid_thw) -> list[int]:
        t, h, w = grid_thw
        ids = self.tok.ids
        return [ids["vision_start"]] + [ids["image_pad"]] * (t * h * w // self.merge_unit) + [ids["vision_end"]]

    def __call__(self, sample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[Turn]]:
        _, h, w = sample.grid_thw
        size = (w * self.patch_size, h * self.patch_size)  # the resized image's pixels
        boxes = sample.boxes.numpy() if sample.boxes is not None else np.zeros((0, 4), np.float32)
        turns = plan_turns(sample.caption, boxes, sample.region_texts, sample.region_kinds, size, self.cfg, rng)
        if not turns:
            raise RecordError("no_task", "neither a caption nor a region text to ask about")
        ids, labels = list(self.system), [IGNORE] * len(self.system)
        kept = []
        for i, turn in enumerate(turns):
            prompt = self.user + (self.image_block(sample.grid_thw) if i == 0 else []) + \
                self.tok.encode(turn.question) + self.end + self.nl + self.assistant
            answer = self.tok.encode(turn.answer) + self.end
            if len(ids) + len(prompt) + len(answer) + len(self.nl) > self.cfg.max_tokens:
                if i == 0:
                    raise RecordError("too_many_llm_tokens",
                                      f"the image and its first turn need {len(ids) + len(prompt) + len(answer) + 1} "
                                      f"LLM tokens, more than data.llm.max_tokens={self.cfg.max_tokens}")
                break
            ids += prompt + answer + self.nl
            labels += [IGNORE] * len(prompt) + answer + [IGNORE] * len(self.nl)
            kept.append(turn)
        return np.array(ids, np.int64), np.array(labels, np.int64), kept
