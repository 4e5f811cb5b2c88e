"""FineCap records -> conversations: the chat template as Hugging Face renders it, the loss only on
answers, boxes in the resized image's pixels (or 0-1000), unambiguous grounding, row budgets."""

import numpy as np
import pytest
import torch

from finevit.config.data import LLMDataConfig
from finevit.data.conversation import IGNORE, ConversationEncoder, format_box, parse_box, plan_turns
from finevit.data.llm_tokenizer import LLMTokenizer, TokenizerError, check_llm_tokenizer
from finevit.data.packing import Sample, select_two_budgets
from finevit.data.schema import RecordError


@pytest.fixture(scope="module")
def tok(stage2_corpus):
    return LLMTokenizer(str(stage2_corpus[1]))


def sample(caption="a red circle.", regions=(), grid=(1, 4, 6)):
    """A preprocessed image of grid patches (56 x 84 pixels) and its regions (box, text, kind)."""
    return Sample(0, 0, "s", 0, grid_thw=grid, caption=caption,
                  boxes=torch.tensor([r[0] for r in regions], dtype=torch.float32).reshape(-1, 4),
                  region_texts=[r[1] for r in regions], region_kinds=[r[2] for r in regions])


REGIONS = [([0, 0, 28, 28], "a red circle", "local"), ([28, 0, 84, 56], "a blue square", "local"),
           ([10, 30, 50, 50], "HELLO", "ocr")]


def test_the_sequence_is_the_chat_template_and_only_answers_carry_labels(tok):
    cfg = LLMDataConfig(max_turns=3, max_tokens=512)
    enc = ConversationEncoder(tok, cfg, patch_size=14, merge_unit=4)
    ids, labels, turns = enc(sample(regions=REGIONS), np.random.default_rng(0))
    assert len(turns) == 4 and len(ids) == len(labels)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0].question}]},
                {"role": "assistant", "content": turns[0].answer}]
    for t in turns[1:]:
        messages += [{"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer}]
    text = tok.tok.apply_chat_template(messages, tokenize=False)  # no system turn: none configured
    text = text.replace("<|image_pad|>", "<|image_pad|>" * 6)  # 4 x 6 patches = 6 merged tokens
    assert ids.tolist() == tok.tok(text, add_special_tokens=False)["input_ids"]
    # The labels are exactly each answer + its <|im_end|>, nothing of the prompts.
    answers = [tok.encode(t.answer) + [tok.ids["im_end"]] for t in turns]
    assert [x for x in labels.tolist() if x != IGNORE] == [i for a in answers for i in a]
    assert (ids == tok.image_id).sum() == 6


def test_boxes_are_the_resized_images_pixels_or_thousandths():
    assert format_box([10.4, 20.6, 56, 84], (56, 84), "absolute") == "[10, 21, 56, 84]"
    assert format_box([14, 21, 56, 84], (56, 84), "norm1000") == "[250, 250, 1000, 1000]"
    assert format_box([-3, 0, 90, 84], (56, 84), "absolute") == "[0, 0, 56, 84]"  # clamped to the image
    assert parse_box("it is at [3, 4, 50, 60].") == [3, 4, 50, 60] and parse_box("nowhere") is None


def test_a_flipped_image_moves_its_boxes_and_the_answer_follows(demo_dir, finecap):
    """The encoder writes what the preprocessor made of the box: after a flip the text -> box
    answer is the mirrored box on the resized image."""
    from finevit.data.preprocess import PatchSpec, Preprocessor

    row = next(finecap[i] for i in range(len(finecap)) if finecap[i]["regions"])
    boxes = np.array([r["box"] for r in row["regions"]], np.float32)
    out = {}
    for flip in (0.0, 1.0):
        from finevit.config.data import AugmentConfig

        pre = Preprocessor(PatchSpec(), 3136, 12544, augment=AugmentConfig(hflip_prob=flip))
        img = pre(row["image"], boxes, np.random.default_rng(0), expect_size=(row["width"], row["height"]))
        out[flip] = (img.boxes, img.grid_thw)
    (plain, grid), (flipped, _) = out[0.0], out[1.0]
    width = grid[2] * 14
    torch.testing.assert_close(flipped[:, [2, 0]], width - plain[:, [0, 2]])
    cfg = LLMDataConfig(tasks={"text_to_box": 1.0}, max_turns=0)
    region = row["regions"][0]
    turns = plan_turns("", flipped.numpy()[:1], [region["text"]], ["local"], (width, grid[1] * 14), cfg,
                       np.random.default_rng(0))
    assert parse_box(turns[0].answer) == [round(float(v)) for v in flipped[0]]


def test_grounding_asks_only_about_a_text_that_names_one_region():
    regions = [([0, 0, 10, 10], "a cat", "local"), ([20, 0, 30, 10], "a cat", "local"),
               ([0, 20, 10, 30], "a dog", "local")]
    cfg = LLMDataConfig(tasks={"text_to_box": 1.0}, max_turns=5)
    s = sample(regions=regions)
    turns = plan_turns("", s.boxes.numpy(), s.region_texts, s.region_kinds, (56, 84), cfg, np.random.default_rng(0))
    assert [t.region for t in turns] == [2]


def test_each_task_draws_its_own_material_without_repeating_a_region():
    cfg = LLMDataConfig(max_turns=10)
    s = sample(regions=REGIONS)
    seen = set()
    for seed in range(30):
        turns = plan_turns(s.caption, s.boxes.numpy(), s.region_texts, s.region_kinds, (84, 56), cfg,
                           np.random.default_rng(seed))
        regions = [t.region for t in turns if t.region >= 0]
        assert len(regions) == len(set(regions)) == 3 and sum(t.task == "caption" for t in turns) == 1
        for t in turns:
            assert (t.task in ("box_to_ocr", "ocr_to_box")) == (t.region == 2)
            seen.add(t.task)
    assert seen == {"caption", "box_to_text", "text_to_box", "box_to_ocr", "ocr_to_box"}
    # a recaption sample (no regions) is one caption turn
    assert [t.task for t in plan_turns("a caption", np.zeros((0, 4)), [], [], (56, 84), cfg,
                                       np.random.default_rng(0))] == ["caption"]


def test_turns_stop_at_the_row_budget_and_a_first_turn_that_cannot_fit_is_a_bad_sample(tok):
    big = ConversationEncoder(tok, LLMDataConfig(max_turns=10, max_tokens=4096), 14, 4)
    ids, _, turns = big(sample(regions=REGIONS), np.random.default_rng(1))
    budget = len(ids) - 1
    small = ConversationEncoder(tok, LLMDataConfig(max_turns=10, max_tokens=budget), 14, 4)
    cut, _, kept = small(sample(regions=REGIONS), np.random.default_rng(1))
    assert len(cut) <= budget and kept == turns[:len(kept)] and 0 < len(kept) < len(turns)
    with pytest.raises(RecordError, match="more than data.llm.max_tokens=20"):
        ConversationEncoder(tok, LLMDataConfig(max_tokens=20), 14, 4)(sample(), np.random.default_rng(0))
    with pytest.raises(RecordError, match="neither a caption nor a region"):
        big(sample(caption=" "), np.random.default_rng(0))


def test_a_tokenizer_without_the_chat_tokens_is_one_sentence(tmp_path, stage2_corpus):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(TokenizerError, match="lacks <|endoftext|>, <|im_start|>"):
        LLMTokenizer(str(tmp_path / "bare"))
    (problem,) = check_llm_tokenizer(str(stage2_corpus[1]), vocab_size=100)
    assert problem.endswith("has 480 tokens but model.llm.vocab_size=100: the LLM needs an embedding row for each")


def test_two_budgets_fill_llm_tokens_exactly_unless_the_patches_overflow():
    assert select_two_budgets([4, 4, 4, 4], [10, 7, 3, 5], 16, 20) == [0, 1, 2]  # 20 tokens exactly
    # the exact LLM fill [0, 1] would need 20 patches: first-fit in stream order under both instead
    assert select_two_budgets([8, 12, 16, 4], [10, 20, 10, 5], 16, 30) == [0, 3]
    with pytest.raises(ValueError):
        select_two_budgets([4], [40], 16, 30)


def test_the_stage2_loader_mixes_recaption_corpora_in_and_skips_what_cannot_be_asked(
        tok, demo_dir, finecap, recap, small_config, tmp_path):
    """Finecap and recaption corpora in one stream: recaption samples are caption turns; every row
    holds whole samples, each image block exactly its merged tokens; a record without its caption
    and a sample whose image and first turn overflow the row are skipped with their reasons."""
    from finevit.data.corpus import CorpusWriter, open_corpus
    from finevit.data.demo import demo_record
    from finevit.data.loader import PackedLoader
    from finevit.data.schema import validate_record

    path = str(tmp_path / "odd")
    with CorpusWriter(path, "finecap") as w:
        for i in range(6):
            rec = validate_record("finecap", demo_record(3, "finecap", "train", i)[0])
            if i == 1:
                rec["global_caption"], rec["regions"] = " ", []
            if i == 2:  # its only question's answer cannot fit a row
                rec["global_caption"], rec["regions"] = rec["global_caption"] * 8, []
            w.write(rec)
    cfg = LLMDataConfig(max_tokens=160, max_turns=2)
    enc = ConversationEncoder(tok, cfg, 14, 4)
    with open_corpus(path) as odd:
        data = small_config(max_pixels=28 * 28 * 64, max_tokens=512)
        loader = PackedLoader([odd, finecap, recap], data, seed=0, epochs=1, encoder=enc,
                              weights=[1.0, 1.0, 1.0])
        kinds, skipped = {0: [], 1: [], 2: []}, []
        for _, batch in zip(range(12), loader):
            skipped += batch.skipped
            bounds = batch.llm_cu_seqlens.tolist()
            assert batch.llm_ids.shape == (160,) and bounds[-1] <= 160
            for i in range(batch.num_images):
                ids = batch.llm_ids[bounds[i]:bounds[i + 1]]
                t, h, w = batch.grid_thw[i].tolist()
                assert int((ids == tok.image_id).sum()) == t * h * w // 4
                assert ids[0] == tok.ids["im_start"] and batch.tasks[i]
                kinds[int(batch.corpus[i])].append(batch.tasks[i])
            assert (batch.llm_labels[bounds[-1]:] == IGNORE).all()
    assert kinds[2] and all(tasks == ["caption"] for tasks in kinds[2])  # recaption: one caption turn
    assert any(len(tasks) > 1 for tasks in kinds[1])
    assert {("fi-train-0000001", "missing_caption"), ("fi-train-0000002", "too_many_llm_tokens")} <= set(skipped)
