"""Zero-shot classification: the accuracy arithmetic, and the whole path (labelled corpus ->
packed forward-only pass -> class prompts through the text tower) against a one-image-at-a-time
reference computed without the loader, the packer or the pipeline schedule."""

import pytest
import torch
import torch.nn.functional as F

from finevit.data.corpus import open_corpus
from finevit.data.preprocess import PatchSpec, Preprocessor
from finevit.data.tokenizer import CaptionTokenizer
from finevit.data.demo import CLASS_TEMPLATES, CLASSES
from finevit.eval import zero_shot_accuracy
from finevit.eval.classify import class_embeddings
from finevit.eval.embed import embed_corpora
from finevit.train.stage1 import Stage1Task
from finevit.train.trainer import Trainer

from tiny_stage1 import tiny_config


def test_accuracy_counts_the_true_class_among_the_k_nearest():
    classes = torch.eye(3)  # class c points along axis c
    images = torch.tensor([[1.0, 0.2, 0.1],   # nearest 0, then 1, then 2
                           [0.1, 0.2, 1.0],   # 2, 1, 0
                           [0.5, 0.4, 0.3],   # 0, 1, 2
                           [0.0, 3.0, 3.0]])  # tie between 1 and 2: counts for either
    labels = torch.tensor([0, 1, 2, 2])
    acc = zero_shot_accuracy(images, classes, labels, ks=(1, 2, 5))
    assert acc == {"top1": 0.5, "top2": 0.75, "top5": 1.0}  # top5 capped at the 3 classes


@pytest.fixture(scope="module")
def labelled(stage1_corpus):
    from finevit.data.demo import write_demo_corpus

    corpus, tokenizer = stage1_corpus
    write_demo_corpus(str(corpus / "labelled"), seed=5, train=0, heldout=20, schemas=("classify",))
    return corpus, tokenizer, corpus / "labelled" / "classify" / "heldout"


def reference(trainer, cfg, path):
    """Image embeddings, labels and class embeddings computed image by image and prompt by
    prompt, straight from the corpus records."""
    chunk = trainer.chunks[-1]
    pre = Preprocessor(PatchSpec.from_vision(cfg.model.vision), cfg.data.min_pixels, cfg.data.max_pixels)
    tok = CaptionTokenizer(cfg.data.tokenizer)
    images, labels = [], []
    corpus = open_corpus(str(path))
    try:
        classes, templates = corpus.manifest["classes"], corpus.manifest["templates"]
        with torch.no_grad():
            for i in range(len(corpus)):
                row = corpus[i]
                img = pre(row["image"])
                n = img.pixel_values.shape[0]
                cu = torch.tensor([0, n], dtype=torch.int32)
                grid = torch.tensor([img.grid_thw])
                emb, _ = chunk(img.pixel_values, grid, cu, n)  # one image, no padding
                images.append(emb[0])
                labels.append(int(row["label"]))
            names = []
            for c in classes:
                prompts = []
                for t in templates:
                    ids = tok.encode(t.format(c), cfg.data.max_text_len)[None]
                    prompts.append(F.normalize(chunk.encode_text(ids, torch.tensor([ids.shape[1]]),
                                                                 cfg.data.max_text_len)[0], dim=-1))
                names.append(F.normalize(torch.stack(prompts).mean(0), dim=-1))
    finally:
        corpus.close()
    return torch.stack(images), torch.tensor(labels), torch.stack(names)


def test_zero_shot_classification_matches_a_one_image_at_a_time_reference(dist, labelled, tmp_path):
    corpus, tokenizer, path = labelled
    cfg = tiny_config(corpus, tokenizer, tmp_path / "cls", **{
        "eval.corpora": f"[{{path: {corpus}/recaption/heldout}}, {{path: {path}, name: shapes}}]"})
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        result = trainer.evaluate()
        images, labels, names = reference(trainer, cfg, path)
        packed = embed_corpora(cfg, trainer.task, trainer.ddp, trainer.pg, [cfg.eval.corpora[1]])
        prompts = class_embeddings(trainer.chunks[-1], CaptionTokenizer(cfg.data.tokenizer),
                                   CLASSES, CLASS_TEMPLATES, cfg.data.max_text_len)
    finally:
        trainer.close()
    # Every packed row is one reference image (the loader shuffles), with that image's label.
    match = torch.cdist(packed.images, images).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(20))
    torch.testing.assert_close(packed.images, images[match], atol=1e-5, rtol=1e-4)
    assert torch.equal(packed.labels, labels[match])
    torch.testing.assert_close(prompts, names, atol=1e-5, rtol=1e-4)
    sim = F.normalize(images, dim=-1) @ names.t()
    order = sim.argsort(dim=1, descending=True)
    assert result["shapes_images"] == 20 and result["shapes_chance"] == 1 / 32
    assert result["shapes_top1"] == pytest.approx((order[:, 0] == labels).float().mean().item(), abs=1e-6)
    assert result["shapes_top5"] == pytest.approx((order[:, :5] == labels[:, None]).any(1).float().mean().item(),
                                                  abs=1e-6)
    assert result["pairs"] == 24  # the captioned corpus is still scored for retrieval


@pytest.mark.parametrize("key, where, expected", [
    ("eval.corpora", "nowhere", "nowhere"),
    ("data.corpora", "labelled", "is a labelled (classify) corpus, which has no captions to train on"),
])
def test_a_wrong_corpus_stops_the_run_at_setup_in_one_sentence(dist, labelled, tmp_path, caplog, key, where,
                                                               expected):
    from finevit.train import main
    from tiny_stage1 import tiny_overrides, DEMO_CONFIG

    corpus, tokenizer, path = labelled
    bad = {"nowhere": tmp_path / "nowhere", "labelled": path}[where]
    overrides = tiny_overrides(corpus, tokenizer, tmp_path / "bad", **{key: f"[{{path: {bad}}}]"})
    assert main.train(DEMO_CONFIG, overrides) == 2
    assert not (tmp_path / "bad" / "checkpoints").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0]
