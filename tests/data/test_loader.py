"""The loader: exact mid-epoch resume (workers, mixing), DP resharding by exact sample-id
accounting, bad samples skipped without desynchronising ranks, finite epochs, captions."""

import json
import os
from collections import Counter

import pytest
import torch

from finevit.data.corpus import CorpusWriter, open_corpus
from finevit.data.demo import demo_record
from finevit.data.loader import BadSampleBudget, PackedLoader
from finevit.data.schema import validate_record
from finevit.data.state import StateError


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sample_ids == y.sample_ids and torch.equal(x.sample_keys, y.sample_keys)
        assert torch.equal(x.cu_seqlens, y.cu_seqlens) and torch.equal(x.grid_thw, y.grid_thw)
        assert torch.equal(x.pixel_values, y.pixel_values) and x.captions == y.captions
        assert all(torch.equal(p, q) for p, q in zip(x.boxes, y.boxes))


def test_mid_epoch_resume_equals_uninterrupted_with_workers_and_mixing(recap, finecap, small_config):
    corpora, weights = [recap, finecap], [2.0, 1.0]
    cfg = small_config(num_workers=2)
    with PackedLoader(corpora, cfg, seed=5, weights=weights) as full:
        reference = take(full, 7)
    with PackedLoader(corpora, cfg, seed=5, weights=weights) as first:
        assert_same_batches(take(first, 3), reference[:3])
        state = json.loads(json.dumps(first.state_dict()))  # a plain object, as a checkpoint stores it
    assert state["buffer"], "the test must interrupt with samples carried over in the packer"
    with PackedLoader(corpora, cfg, seed=5, weights=weights) as resumed:
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 4), reference[3:])
    with PackedLoader(corpora, small_config(num_workers=0), seed=5, weights=weights) as serial:
        serial.load_state_dict(state)  # the stream does not depend on the worker count
        assert_same_batches(take(serial, 4), reference[3:])
    assert {int(c) for b in reference for c in b.corpus} == {0, 1}


def test_tensor_parallel_peers_get_identical_batches(recap, small_config):
    a = PackedLoader([recap], small_config(), dp_rank=1, dp_size=2, seed=2)
    b = PackedLoader([recap], small_config(), dp_rank=1, dp_size=2, seed=2)
    other = PackedLoader([recap], small_config(), dp_rank=0, dp_size=2, seed=2)
    batches_a, batches_b, batches_other = take(a, 2), take(b, 2), take(other, 2)
    assert_same_batches(batches_a, batches_b)
    assert not {i for x in batches_a for i in x.sample_ids} & {i for x in batches_other for i in x.sample_ids}


def run_ranks(loaders, consumed, until=None, steps=None):
    """Step all ranks in lockstep; record every consumed key (batched or skipped)."""
    n = 0
    while (steps is not None and n < steps) or (until is not None and not until()):
        for ld in loaders:
            b = next(ld)
            consumed += b.sample_keys.tolist()
        n += 1
        assert n < 200, "ranks stopped making progress"


@pytest.mark.parametrize("old,new", [(2, 3), (4, 2)])
def test_dp_reshard_consumes_the_epoch_exactly_once(recap, small_config, old, new):
    cfg = small_config()
    epoch = len(recap)
    consumed: list[int] = []
    loaders = [PackedLoader([recap], cfg, dp_rank=r, dp_size=old, seed=9) for r in range(old)]
    run_ranks(loaders, consumed, steps=3)
    states = [ld.state_dict() for ld in loaders]
    assert sum(len(s["buffer"]) for s in states) > 0, "carry-over must be part of what is resharded"
    resumed = [PackedLoader([recap], cfg, dp_rank=r, dp_size=new, seed=9) for r in range(new)]
    for ld in resumed:
        ld.load_state_dict(states)
    run_ranks(resumed, consumed, until=lambda: set(range(epoch)) <= set(consumed))
    counts = Counter(k for k in consumed if k < epoch)
    assert sorted(counts) == list(range(epoch)) and max(counts.values()) == 1
    # ... and by sample id: the epoch is exactly the dataset.
    ids = [recap[int(i)]["id"] for i in resumed[0].plan.locate(sorted(counts))[:, 1]]
    assert sorted(ids) == sorted(recap[i]["id"] for i in range(epoch))


@pytest.fixture
def corpus_with_bad_samples(tmp_path):
    """A finecap corpus written around the validator: one undecodable image, one box outside."""
    path = str(tmp_path / "bad")
    with CorpusWriter(path, "finecap") as w:
        for i in range(12):
            rec = validate_record("finecap", demo_record(7, "finecap", "train", i)[0])
            if i == 3:
                rec["image"] = rec["image"][:200]
            if i == 8:
                rec["regions"] = [{"box": [0, 0, rec["width"] + 50, 5], "text": "x", "kind": "local", "score": 1.0}]
            w.write(rec)
    with open_corpus(path) as corpus:
        yield corpus


def test_bad_samples_are_skipped_counted_and_ranks_stay_in_step(corpus_with_bad_samples, small_config, caplog):
    corpus = corpus_with_bad_samples
    loaders = [PackedLoader([corpus], small_config(), dp_rank=r, dp_size=2, seed=1, epochs=1) for r in range(2)]
    seen, skipped = [], []
    for ld in loaders:
        for b in ld:
            seen += b.sample_ids
            skipped += b.skipped
    assert sorted(skipped) == [("fi-train-0000003", "corrupt_image"), ("fi-train-0000008", "box_outside")]
    assert sorted(seen) == sorted(f"fi-train-{i:07d}" for i in range(12) if i not in (3, 8))
    assert sum(ld.skipped["corrupt_image"] + ld.skipped["box_outside"] for ld in loaders) == 2
    assert "fi-train-0000003" in caplog.text


def write_recaption(path, n: int, bad) -> str:
    """A recaption corpus of n demo records whose images at the indexes `bad(i)` selects are cut."""
    with CorpusWriter(path, "recaption") as w:
        for i in range(n):
            rec = validate_record("recaption", demo_record(3, "recaption", "train", i)[0])
            if bad(i):
                rec["image"] = rec["image"][:100]
            w.write(rec)
    return path


def test_a_rank_whose_every_sample_fails_stops_after_the_first_n(tmp_path, small_config):
    with open_corpus(write_recaption(str(tmp_path / "c"), 40, lambda i: True)) as corpus:
        cfg = small_config(shuffle_algo="none")
        cfg.bad_samples.first = 8
        loader = PackedLoader([corpus], cfg, dp_rank=1, dp_size=2)
        with pytest.raises(BadSampleBudget) as err:
            next(loader)  # an endless loader would otherwise go round the corpus forever
    assert loader.skipped == {"corrupt_image": 8}
    assert str(err.value).startswith("all of the first 8 samples on data-parallel rank 1 could not be "
                                     "used (corrupt_image 8; last: re-train-0000015: corrupt_image: ")
    assert str(err.value).endswith("fix the corpus or the paths, or change data.bad_samples.first")


def test_too_many_failures_among_recent_samples_stop_the_loader(tmp_path, small_config):
    # Good samples first, then 3 of every 4 fail: 6 of a 10-sample window are allowed,
    # 6 of 10 is not.
    with open_corpus(write_recaption(str(tmp_path / "c"), 60, lambda i: i >= 20 and i % 4 != 0)) as corpus:
        cfg = small_config(shuffle_algo="none")
        cfg.bad_samples.window, cfg.bad_samples.max_fraction = 10, 0.6
        with pytest.raises(BadSampleBudget, match=r"^7 of the last 10 samples on data-parallel rank 0 "
                                                  r"could not be used \(corrupt_image 7; last: re-train-0000029"):
            take(PackedLoader([corpus], cfg), 60)
        cfg.bad_samples.max_fraction = 0.8  # 8 of 10 is within this budget: one epoch reads through
        loader = PackedLoader([corpus], cfg, epochs=1)
        assert sum(b.num_images for b in loader) == 20 + 10 and loader.skipped == {"corrupt_image": 30}


def test_finite_epochs_and_refused_states(recap, heldout, finecap, small_config):
    ld = PackedLoader([heldout], small_config(), seed=0, epochs=2)
    ids = Counter(i for b in ld for i in b.sample_ids)
    assert len(ids) == len(heldout) and set(ids.values()) == {2}
    other = PackedLoader([recap, finecap], small_config(), seed=0)
    with pytest.raises(StateError, match="data stream differs"):
        other.load_state_dict(PackedLoader([recap], small_config(), seed=0).state_dict())
    with pytest.raises(StateError, match="all 2 data-parallel ranks"):
        PackedLoader([recap], small_config(), dp_size=3, seed=0).load_state_dict(
            PackedLoader([recap], small_config(), dp_rank=1, dp_size=2, seed=0).state_dict())


def test_captions_are_tokenised_and_cut_to_the_current_length(recap, heldout, small_config, tmp_path):
    from finevit.data.tokenizer import CaptionTokenizer, corpus_texts, train_sentencepiece
    model = str(tmp_path / "cap.model")
    train_sentencepiece(corpus_texts(recap), model, vocab_size=512)
    tok = CaptionTokenizer(model)
    ld = PackedLoader([recap], small_config(tokenizer=model, max_text_len=64), seed=0)
    b = next(ld)
    assert b.text_ids.shape[0] == b.num_images and b.text_lengths.max() <= 64
    for ids, n, cap in zip(b.text_ids, b.text_lengths, b.captions):
        assert not ids[n:].any() and tok.decode(ids[:n]) == tok.decode(tok.encode(cap, 64))
    ld.set_max_text_len(8)
    b = next(ld)
    assert b.text_lengths.tolist() == [min(8, len(tok.encode(c))) for c in b.captions]
    assert b.text_ids.shape[1] == 8
    # The caption choice is per sample and pass: a sample's caption changes between epochs.
    picks = {}
    for b in PackedLoader([heldout], small_config(), seed=0, epochs=3):
        for sid, cap in zip(b.sample_ids, b.captions):
            picks.setdefault(sid, set()).add(cap)
    assert max(len(v) for v in picks.values()) > 1


def test_close_releases_streaming_shared_memory(demo_dir):
    corpus = open_corpus(os.path.join(demo_dir, "finecap", "heldout"))
    prefix = f"{corpus._ds._shm_prefix_int:06}_"

    def ours():
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert len(ours()) == 6
    corpus.close()
    assert ours() == []


def test_pixel_budget_switch_is_exact_across_resume(recap, small_config):
    """A schedule phase changes the resolution mid-stream; a run resumed after the switch (or
    with the switch applied right after restoring) sees the uninterrupted run's batches."""
    cfg = small_config(num_workers=1)
    small, large = (cfg.min_pixels, cfg.min_pixels), (cfg.min_pixels, cfg.max_pixels)
    with PackedLoader([recap], cfg, seed=3) as full:
        full.set_pixel_budget(*small)
        reference = take(full, 2)
        full.set_pixel_budget(*large)
        reference += take(full, 3)
    assert max(int(g.prod()) for g in reference[0].grid_thw) < max(int(g.prod()) for b in reference[2:] for g in b.grid_thw)
    with PackedLoader([recap], cfg, seed=3) as first:
        first.set_pixel_budget(*small)
        take(first, 2)
        before_switch = json.loads(json.dumps(first.state_dict()))
        first.set_pixel_budget(*large)
        take(first, 1)
        after_switch = json.loads(json.dumps(first.state_dict()))
    with PackedLoader([recap], cfg, seed=3) as resumed:
        resumed.load_state_dict(before_switch)
        assert resumed.pixel_budget == small
        resumed.set_pixel_budget(*large)  # the trainer enters the new phase before the next batch
        assert_same_batches(take(resumed, 3), reference[2:])
    with PackedLoader([recap], cfg, seed=3) as resumed:
        resumed.load_state_dict(after_switch)
        assert resumed.pixel_budget == large
        assert_same_batches(take(resumed, 2), reference[3:])
