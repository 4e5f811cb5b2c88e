"""Greedy generated answers of the VLM being trained, scored per FineCap task (stage 2).

Every turn of a held-out conversation becomes a question: the conversation up to that turn's
`<|im_start|>assistant\\n` (earlier answers teacher-forced, the image in the first turn), and its
reference answer. Questions are packed into LLM rows like training (their images into the row's
ViT patches), and all questions of a row grow by one greedy token per forward pass through the
pipeline schedule, until each has written `<|im_end|>` or eval.max_new_tokens tokens. No key/value
cache: each pass recomputes the row, which is what the packed training model can do at any TP /
PP layout; it costs ~max_new_tokens forwards per row, affordable for a held-out subset.

Scores (turn tasks of data/conversation.py): text -> box and OCR -> box: accuracy at IoU >= 0.5
and mean IoU of the first "[x0, y0, x1, y1]" of the answer (none: IoU 0); box -> text and box ->
OCR: exact match and token F1 (lower-cased words); caption: token F1.
"""

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from finevit.data.conversation import IGNORE, parse_box
from finevit.data.packing import PackedBatch
from finevit.parallel.dist import collective_device
from finevit.parallel.schedule import forward_backward

BOX_TASKS = ("text_to_box", "ocr_to_box")
TEXT_TASKS = ("box_to_text", "box_to_ocr")


@dataclass
class Question:
    prompt: list[int]  # ids up to the answer, the image block in it
    pixels: torch.Tensor  # [h*w, patch_dim] the image's patches
    grid: tuple  # (t, h, w) in patches
    task: str
    reference: str
    answer: list  # generated ids


def questions_of(batch: PackedBatch, tokenizer) -> list[Question]:
    """One question per answered turn of every sample of a loader batch."""
    out = []
    bounds, patches = batch.llm_cu_seqlens.tolist(), batch.cu_seqlens.tolist()
    for i in range(batch.num_images):
        ids = batch.llm_ids[bounds[i]:bounds[i + 1]].tolist()
        answer = (batch.llm_labels[bounds[i]:bounds[i + 1]] != IGNORE).tolist()
        starts = [j for j in range(len(ids)) if answer[j] and (j == 0 or not answer[j - 1])]
        for turn, start in enumerate(starts):
            end = start
            while end < len(ids) and answer[end]:
                end += 1
            out.append(Question(ids[:start], batch.pixel_values[patches[i]:patches[i + 1]],
                                tuple(batch.grid_thw[i].tolist()), batch.tasks[i][turn],
                                tokenizer.decode(ids[start:end - 1]), []))  # without <|im_end|>
    return out


def _row(questions: list[Question], row_tokens: int, vit_tokens: int, pad_id: int) -> PackedBatch:
    """The questions (prompt + answer so far) packed into one row, as the loader packs samples."""
    seqs = [q.prompt + q.answer for q in questions]
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    ids = torch.full((row_tokens,), pad_id, dtype=torch.int64)
    ids[:int(cu[-1])] = torch.tensor([t for s in seqs for t in s])
    pix_cu = torch.tensor([0] + [q.pixels.shape[0] for q in questions]).cumsum(0).to(torch.int32)
    pixels = torch.zeros(vit_tokens, questions[0].pixels.shape[1])
    pixels[:int(pix_cu[-1])] = torch.cat([q.pixels for q in questions])
    return PackedBatch(pixels, torch.tensor([q.grid for q in questions]), pix_cu,
                       torch.zeros(len(questions), dtype=torch.int64), [""] * len(questions),
                       torch.zeros(len(questions), dtype=torch.int64), [""] * len(questions),
                       llm_ids=ids, llm_labels=torch.full_like(ids, IGNORE), llm_cu_seqlens=cu)


def rows_of(questions: list[Question], row_tokens: int, vit_tokens: int, max_new: int) -> list[list[Question]]:
    """Questions grouped, in order, so that each group fits a row once every answer is complete."""
    rows, tokens, patches = [[]], 0, 0
    for q in questions:
        need = len(q.prompt) + max_new + 1
        if need > row_tokens or q.pixels.shape[0] > vit_tokens:
            continue  # cannot be asked within a row (training skipped such samples too)
        if rows[-1] and (tokens + need > row_tokens or patches + q.pixels.shape[0] > vit_tokens):
            rows.append([])
            tokens = patches = 0
        rows[-1].append(q)
        tokens, patches = tokens + need, patches + q.pixels.shape[0]
    return [r for r in rows if r]


@torch.no_grad()
def generate_row(task, chunks: list, pg, row: list[Question], max_new: int, vit_tokens: int) -> None:
    """Greedy answers for one row of questions (appended to each question's `answer`). Collective
    over the replica's TP and PP ranks, which hold the same questions."""
    tok, end_id = task.tokenizer, task.tokenizer.ids["im_end"]
    device = collective_device()
    last = torch.distributed.get_global_rank(pg.pp, pg.pp.size() - 1)
    for _ in range(max_new):
        live = [q for q in row if not q.answer or (q.answer[-1] != end_id and len(q.answer) < max_new)]
        if not live:
            return
        batch = _row(row, task.seq_length, vit_tokens, tok.pad_id)
        mb = task.inputs(batch)
        mb["predict_at"] = batch.llm_cu_seqlens[1:].long() - 1  # each question's last token
        picked: list = []
        forward_backward(chunks, [mb], lambda c, m: task.forward(c, m, collect=picked), pg,
                         seq_length=task.seq_length, forward_only=True)
        tokens = picked[0].to(device) if picked else torch.zeros(len(row), dtype=torch.int64, device=device)
        torch.distributed.broadcast(tokens, src=last, group=pg.pp)  # the last stage decided
        for q, t in zip(row, tokens.tolist()):
            if q in live:
                q.answer.append(int(t))


def _last_question(tokenizer, prompt: list[int]) -> str:
    """The text of the prompt's last user turn (what was asked), without its image block: the
    prompt ends `<|im_start|>user ... <|im_end|> <|im_start|>assistant`."""
    starts = [i for i, t in enumerate(prompt) if t == tokenizer.ids["im_start"]]
    turn = tokenizer.decode(prompt[starts[-2] + 1:starts[-1]]) if len(starts) > 1 else ""
    return turn.strip().removeprefix("user").strip()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(predicted: str, reference: str) -> float:
    p, r = _words(predicted), _words(reference)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def score(q: Question, text: str) -> dict[str, float]:
    """Per-question metric values, keyed <task>_<metric>; sums and counts are made by the caller."""
    if q.task in BOX_TASKS:
        overlap = iou(parse_box(text), parse_box(q.reference))
        return {f"{q.task}_acc50": float(overlap >= 0.5), f"{q.task}_miou": overlap}
    if q.task in TEXT_TASKS:
        return {f"{q.task}_exact": float(text.strip() == q.reference.strip()), f"{q.task}_f1": token_f1(text, q.reference)}
    return {f"{q.task}_f1": token_f1(text, q.reference)}


def generation_scores(task, chunks: list, pg, batches, max_new: int, vit_tokens: int,
                      examples: Optional[list] = None, per_task: int = 4) -> tuple[dict, dict]:
    """(metric sums, metric counts) of this replica's questions from `batches`; the first
    `per_task` questions of each task go to `examples` as {task, question, reference, answer}."""
    sums, counts = defaultdict(float), defaultdict(int)
    end_id = task.tokenizer.ids["im_end"]
    for batch in batches:
        questions = questions_of(batch, task.tokenizer)
        for row in rows_of(questions, task.seq_length, vit_tokens, max_new):
            generate_row(task, chunks, pg, row, max_new, vit_tokens)
            for q in row:
                ids = q.answer[:q.answer.index(end_id)] if end_id in q.answer else q.answer
                text = task.tokenizer.decode(ids)
                for k, v in score(q, text).items():
                    sums[k] += v
                    counts[k] += 1
                if examples is not None and sum(e["task"] == q.task for e in examples) < per_task:
                    examples.append({"task": q.task, "question": _last_question(task.tokenizer, q.prompt),
                                     "reference": q.reference, "answer": text})
    return sums, counts
