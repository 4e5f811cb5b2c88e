"""Preprocessing matches Qwen2.5-VL's processor: resize targets, normalisation, token order."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from finevit.config.data import AugmentConfig
from finevit.data.preprocess import PatchSpec, Preprocessor, patchify, smart_resize

qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_smart_resize_matches_qwen():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        h, w = (int(v) for v in rng.integers(1, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(28, 1500)) ** 2
        hi = lo + int(rng.integers(0, 4_000_000))
        got = smart_resize(h, w, 28, lo, hi)
        assert got == qwen.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
        assert got[0] % 28 == 0 and got[1] % 28 == 0


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (1000, 250), (97, 301)])
def test_pixel_values_equal_qwen_processor(size):
    w, h = size
    img = np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    lo, hi = 336 * 336, 448 * 448
    proc = qwen.Qwen2VLImageProcessor(min_pixels=lo, max_pixels=hi, patch_size=14, temporal_patch_size=2, merge_size=2)
    ref = proc(images=[Image.fromarray(img)], return_tensors="np")
    out = Preprocessor(PatchSpec(), lo, hi, jpeg_draft=False)(png(img))
    assert tuple(ref["image_grid_thw"][0]) == out.grid_thw
    assert out.pixel_values.shape == ref["pixel_values"].shape == (out.grid_thw[1] * out.grid_thw[2], 1176)
    np.testing.assert_allclose(out.pixel_values.numpy(), ref["pixel_values"], atol=2e-6, rtol=0)


def test_no_resize_and_temporal_patch_1():
    img = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)  # already 28-aligned
    for T in (2, 1):
        proc = qwen.Qwen2VLImageProcessor(do_resize=False, patch_size=14, temporal_patch_size=T, merge_size=2)
        ref = proc(images=[Image.fromarray(img)], return_tensors="np")
        pv, grid = patchify(img, PatchSpec(temporal_patch_size=T))
        assert grid == (1, 4, 6) and pv.shape == (24, 3 * T * 196)
        np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], atol=2e-6, rtol=0)


def test_token_order_is_merge_groups_in_raster_order():
    # Each 14x14 patch carries its own (row, col) in its pixels: rows 0-3 must be the 2x2 group
    # at the top left, (0,0) (0,1) (1,0) (1,1), then the next group to the right.
    h, w = 4, 6
    img = np.zeros((h * 14, w * 14, 3), np.uint8)
    for r in range(h):
        for c in range(w):
            img[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = (10 * r, 10 * c, 0)
    pv, _ = patchify(img)
    pv = pv.reshape(h * w, 3, 2, 14, 14)  # [token, C, T, 14, 14]
    std, mean = 0.26862954, 0.48145466
    rows = np.rint((pv[:, 0, 0, 0, 0].numpy() * std + mean) * 255 / 10).astype(int)
    cols = np.rint((pv[:, 1, 0, 0, 0].numpy() * 0.26130258 + 0.4578275) * 255 / 10).astype(int)
    expected = [(2 * gr + dr, 2 * gc + dc) for gr in range(h // 2) for gc in range(w // 2) for dr in (0, 1) for dc in (0, 1)]
    assert list(zip(rows, cols)) == expected
    assert torch.equal(pv[:, :, 0], pv[:, :, 1])  # the still image is both frames


def test_boxes_follow_resize_and_flip():
    img = np.full((200, 300, 3), 255, np.uint8)
    img[20:60, 30:90] = (255, 0, 0)  # a red box at x 30-90, y 20-60
    box = np.array([[30, 20, 90, 60]], np.float32)
    plain = Preprocessor(PatchSpec(), 112 * 112, 112 * 112, jpeg_draft=False)
    out = plain(png(img), box)
    H, W = out.size
    np.testing.assert_allclose(out.boxes.numpy(), [[30 * W / 300, 20 * H / 200, 90 * W / 300, 60 * H / 200]], rtol=1e-6)
    flip = Preprocessor(PatchSpec(), 112 * 112, 112 * 112, jpeg_draft=False, augment=AugmentConfig(hflip_prob=1.0))
    f = flip(png(img), box, rng=np.random.default_rng(0))
    assert f.flipped and f.size == out.size
    x0, y0, x1, y1 = f.boxes[0].tolist()
    assert (x0, x1) == pytest.approx((W - 90 * W / 300, W - 30 * W / 300))
    # Mirroring after the resize equals mirroring before it, up to one grey level of rounding.
    ref = plain(png(np.ascontiguousarray(img[:, ::-1])))
    torch.testing.assert_close(f.pixel_values, ref.pixel_values, atol=1.01 / 255 / 0.26, rtol=0)
    assert not torch.allclose(f.pixel_values, out.pixel_values, atol=0.1)


def test_scale_jitter_stays_in_budget_and_is_seeded():
    pre = Preprocessor(PatchSpec(), 56 * 56, 224 * 224, augment=AugmentConfig(scale_jitter=True))
    sizes = [pre.target_size(480, 640, np.random.default_rng(s)) for s in range(20)]
    assert len(set(sizes)) > 5
    assert all(h * w <= 224 * 224 for h, w in sizes)
    assert sizes == [pre.target_size(480, 640, np.random.default_rng(s)) for s in range(20)]


def test_jpeg_draft_is_close_to_full_decode():
    img = np.asarray(Image.radial_gradient("L").resize((1024, 768)).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    full = Preprocessor(PatchSpec(), 224 * 224, 224 * 224, jpeg_draft=False)(buf.getvalue())
    fast = Preprocessor(PatchSpec(), 224 * 224, 224 * 224, jpeg_draft=True)(buf.getvalue())
    assert full.grid_thw == fast.grid_thw
    assert (full.pixel_values - fast.pixel_values).abs().mean() < 0.02
