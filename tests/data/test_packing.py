"""Token-budget packing: optimal fill, bounded delay, <2% padding on the demo corpus, and packed
batches whose cu_seqlens ranges hold exactly each image's own tokens."""

import itertools

import numpy as np
import pytest
import torch

from finevit.data.demo import make_scene
from finevit.data.loader import PackedLoader
from finevit.data.packing import Packer, Sample, collate, pad_to_largest_fraction, select_batch
from finevit.data.preprocess import PatchSpec, Preprocessor, smart_resize


def test_select_batch_is_optimal_and_prefers_old():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = [int(s) * 4 for s in rng.integers(1, 30, int(rng.integers(1, 9)))]
        budget = 4 * int(rng.integers(sizes[0] // 4, 80))
        picked = select_batch(sizes, budget)
        assert picked[0] == 0 and picked == sorted(set(picked))
        best = max(sum(sizes[i] for i in (0, *c)) for r in range(len(sizes))
                   for c in itertools.combinations(range(1, len(sizes)), r)
                   if sizes[0] + sum(sizes[i] for i in c) <= budget)
        assert sum(sizes[i] for i in picked) == best
    assert select_batch([8, 4, 4, 8], 16) == [0, 1, 2]  # ties go to the older samples
    with pytest.raises(ValueError):
        select_batch([20], 16)


def token_stream(n: int, lo: int, hi: int) -> list[int]:
    """Vision tokens of the first n demo scenes resized into [lo, hi] pixels (no rendering)."""
    out = []
    for i in range(n):
        s = make_scene(np.random.default_rng([0, 1, 1, i]))
        h, w = smart_resize(s.height, s.width, 28, lo, hi)
        out.append(h * w // 196)
    return out


@pytest.mark.parametrize("lo,hi,budget", [(336 * 336, 448 * 448, 16384), (448 * 448, 1024 * 1024, 32768)])
def test_padding_below_two_percent_on_demo_sizes(lo, hi, budget):
    tokens = token_stream(1500, lo, hi)
    packer, fractions, order, delays = Packer(budget, lookahead=64), [], [], []
    for k, t in enumerate(tokens):
        packer.add(Sample(k, k, str(k), 0, grid_thw=(1, 2, t // 2)))
        if packer.full():
            batch = packer.pop()
            fractions.append(1 - sum(s.num_tokens for s in batch) / budget)
            order += [s.key for s in batch]
            delays.append(len(fractions))
    assert max(fractions) < 0.02, max(fractions)
    assert len(order) == len(set(order))  # nothing emitted twice
    naive = pad_to_largest_fraction(tokens, batch_images=max(1, budget // max(tokens)))
    assert naive > 5 * np.mean(fractions)


def test_collate_keeps_every_image_in_its_own_range():
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(k, k, f"s{k}", 0, pixel_values=torch.randn(h * w, 1176, generator=gen), grid_thw=(1, h, w))
               for k, (h, w) in enumerate([(4, 6), (2, 2), (8, 4)])]
    b = collate(samples, 80, 1176)
    assert b.cu_seqlens.tolist() == [0, 24, 28, 60] and b.cu_seqlens.dtype == torch.int32
    assert b.grid_thw.tolist() == [[1, 4, 6], [1, 2, 2], [1, 8, 4]] and b.grid_thw.dtype == torch.int64
    for i, s in enumerate(samples):
        assert torch.equal(b.pixel_values[b.cu_seqlens[i]:b.cu_seqlens[i + 1]], s.pixel_values)
    assert b.pixel_values.shape == (80, 1176) and not b.pixel_values[60:].any()
    assert b.padding_fraction == pytest.approx(20 / 80) and b.max_seqlen == 32


def test_loader_batches_match_independently_preprocessed_images(recap, finecap, small_config):
    cfg = small_config()
    by_id = {}
    for corpus in (recap, finecap):
        for i in range(len(corpus)):
            by_id[corpus[i]["id"]] = corpus[i]
    pre = Preprocessor(PatchSpec(), cfg.min_pixels, cfg.max_pixels, cfg.jpeg_draft)
    loader = PackedLoader([recap, finecap], cfg, seed=3)
    fractions = []
    for _ in range(4):
        b = next(loader)
        fractions.append(b.padding_fraction)
        assert b.pixel_values.shape == (cfg.max_tokens, 1176)
        for i, sid in enumerate(b.sample_ids):
            row = by_id[sid]
            ref = pre(row["image"])
            lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            assert tuple(b.grid_thw[i].tolist()) == ref.grid_thw and hi - lo == ref.grid_thw[1] * ref.grid_thw[2]
            assert torch.equal(b.pixel_values[lo:hi], ref.pixel_values)
            if b.corpus[i] == 1:
                assert b.captions[i] == row["global_caption"] and len(b.boxes[i]) == len(row["regions"])
            else:
                assert b.captions[i] in row["captions"]
        assert not b.pixel_values[b.num_tokens:].any()
    assert loader.padding_fraction == pytest.approx(np.mean(fractions))
