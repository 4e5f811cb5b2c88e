"""Stage 2's generated-answer scores and how questions are cut from held-out conversations."""

import numpy as np
import pytest
import torch

from finevit.config.data import LLMDataConfig
from finevit.data.conversation import ConversationEncoder
from finevit.data.llm_tokenizer import LLMTokenizer
from finevit.data.packing import Sample, collate
from finevit.eval.generate import Question, iou, questions_of, rows_of, score, token_f1


def test_scores_per_task():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0 and iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert iou(None, [0, 0, 1, 1]) == 0.0 and iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert token_f1("a red circle", "A red circle.") == 1.0
    assert token_f1("a red square", "a red circle") == pytest.approx(2 / 3)
    assert token_f1("", "a") == 0.0

    def q(task, reference):
        return Question([], torch.zeros(0, 1), (1, 2, 2), task, reference, [])

    assert score(q("text_to_box", "[0, 0, 10, 10]"), "it is [0, 0, 10, 8]") == {
        "text_to_box_acc50": 1.0, "text_to_box_miou": pytest.approx(0.8)}
    assert score(q("ocr_to_box", "[0, 0, 10, 10]"), "no box") == {"ocr_to_box_acc50": 0.0, "ocr_to_box_miou": 0.0}
    assert score(q("box_to_ocr", "HELLO"), "HELLO") == {"box_to_ocr_exact": 1.0, "box_to_ocr_f1": 1.0}
    assert score(q("caption", "a red circle"), "a circle")["caption_f1"] == pytest.approx(0.8)


def test_each_turn_is_a_question_with_the_earlier_answers_in_its_prompt(stage2_corpus):
    tok = LLMTokenizer(str(stage2_corpus[1]))
    enc = ConversationEncoder(tok, LLMDataConfig(max_turns=3, max_tokens=512), 14, 4)
    samples = []
    for i, regions in enumerate(([([0, 0, 28, 28], "a red circle", "local"), ([0, 28, 28, 56], "HI", "ocr")], [])):
        s = Sample(i, i, str(i), 0, pixel_values=torch.randn(24, 1176), grid_thw=(1, 4, 6), caption=f"scene {i}.",
                   boxes=torch.tensor([r[0] for r in regions], dtype=torch.float32).reshape(-1, 4),
                   region_texts=[r[1] for r in regions], region_kinds=[r[2] for r in regions])
        ids, labels, turns = enc(s, np.random.default_rng(i))
        s.llm_ids, s.llm_labels, s.tasks = torch.from_numpy(ids), torch.from_numpy(labels), [t.task for t in turns]
        samples.append((s, turns))
    batch = collate([s for s, _ in samples], 64, 1176, max_llm_tokens=512, llm_pad_id=tok.pad_id)
    questions = questions_of(batch, tok)
    turns = [t for _, ts in samples for t in ts]
    assert [q.task for q in questions] == [t.task for t in turns] and len(questions) == 4
    assert [q.reference for q in questions] == [t.answer for t in turns]
    assistant = [tok.ids["im_start"]] + tok.encode("assistant\n")
    for q in questions:
        assert q.prompt[-len(assistant):] == assistant and q.prompt.count(tok.image_id) == 6
    # the second question of the first sample carries the first answer, teacher-forced
    assert tok.decode(questions[1].prompt).count(turns[0].answer) == 1
    rows = rows_of(questions, row_tokens=2 * len(questions[1].prompt) + 10, vit_tokens=64, max_new=4)
    assert [q for r in rows for q in r] == questions and all(len(r) <= 2 for r in rows)
