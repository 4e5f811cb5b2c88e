#!/usr/bin/env python
"""Data-loader throughput and packing efficiency (a benchmark, not a test).

For each pixel budget (448^2 and ~1K) it reports, on one CPU core:
  decode     images/s of bare decoding (PIL open + full decode + RGB) of the corpus's files
  full path  images/s of MDS read -> decode -> resize -> normalise -> patchify -> pack
             (finevit.data.PackedLoader, num_workers=0, torch on one thread)
  ratio      full path / decode
and, with --workers N, the full path's images/s over N worker processes. Padding is the packer's
next to fixed-size batches padded to their largest image, at the same token budget.

This VM faults fresh memory pages in very slowly and erratically (a 77 MB batch buffer: 0.04-2 s);
run once as is and once with MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
(glibc then reuses freed memory instead of returning it to the OS) to separate that from the code.

The corpus is the demo generator's scenes scaled by --image-scale and re-encoded as JPEG (q=90)
with sensor-like noise, so decode and resize costs resemble photos of ~0.5-2 MP.

Example:
  python bench/data_loader.py --images 300 --workers 2 --json bench_data.json
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="corpus size (default 300)")
    p.add_argument("--image-scale", type=float, default=2.0, help="upscale demo scenes by this (default 2)")
    p.add_argument("--workers", type=int, default=0, help="also time the full path with N workers")
    p.add_argument("--corpus", help="use this recaption/finecap corpus instead of generating one")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def make_corpus(out: str, n: int, scale: float) -> str:
    from PIL import Image

    from finevit.data.corpus import CorpusWriter
    from finevit.data.demo import demo_record
    from finevit.data.schema import validate_record

    rng = np.random.default_rng(0)
    with CorpusWriter(out, "recaption") as w:
        for i in range(n):
            rec, _ = demo_record(0, "recaption", "train", i)
            img = Image.open(io.BytesIO(rec["image"])).convert("RGB")
            img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (img.height, img.width, 3))
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            rec.update(image=buf.getvalue(), width=img.width, height=img.height)
            w.write(validate_record("recaption", rec))
    return out


def bare_decode(corpus) -> float:
    from PIL import Image
    rows = [corpus[i]["image"] for i in range(len(corpus))]
    t = time.perf_counter()
    for data in rows:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(rows) / (time.perf_counter() - t)


def full_path(corpus, cfg) -> dict:
    from finevit.data.loader import PackedLoader
    from finevit.data.packing import pad_to_largest_fraction

    # Endless stream, stopped after one epoch's worth of images: no partially filled tail batch.
    loader = PackedLoader([corpus], cfg, seed=0)
    t, images, tokens = time.perf_counter(), 0, []
    while images < len(corpus):
        batch = next(loader)
        images += batch.num_images
        tokens += (batch.grid_thw[:, 1] * batch.grid_thw[:, 2]).tolist()
    seconds = time.perf_counter() - t
    full_batches = loader.batches
    loader.close()
    per_batch = max(1, cfg.max_tokens // (cfg.max_pixels // 196))
    return {"images_per_s": images / seconds, "images": images, "batches": full_batches,
            "padding": loader.padding_fraction, "pad_to_largest": pad_to_largest_fraction(tokens, per_batch),
            "pad_to_largest_batch_images": per_batch}


BUDGETS = {  # name: (min_pixels, max_pixels, max_tokens)
    "448^2": (336 * 336, 448 * 448, 16384),
    "~1K": (448 * 448, 1024 * 1024, 32768),
}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from finevit.config.data import DataConfig
    from finevit.data.corpus import open_corpus

    tmp = tempfile.mkdtemp(prefix="finevit-bench-")
    path = args.corpus or make_corpus(os.path.join(tmp, "corpus"), args.images, args.image_scale)
    results = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0], "budgets": {},
               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    with open_corpus(path) as corpus:
        mp = np.mean([corpus[i]["width"] * corpus[i]["height"] / 1e6 for i in range(len(corpus))])
        results.update(images=len(corpus), mean_megapixels=float(mp), decode_images_per_s=bare_decode(corpus))
        print(f"corpus: {len(corpus)} JPEGs, mean {mp:.2f} MP; bare decode "
              f"{results['decode_images_per_s']:.1f} img/s/core (load avg {results['load_avg_start']:.1f})")
        print(f"{'budget':<7} {'full img/s/core':>16} {'ratio':>6} {'workers img/s':>14} {'padding':>8} {'pad-to-largest':>15}")
        for name, (lo, hi, max_tokens) in BUDGETS.items():
            cfg = DataConfig(min_pixels=lo, max_pixels=hi, max_tokens=max_tokens, num_workers=0)
            r = full_path(corpus, cfg)
            if args.workers:
                cfg_w = DataConfig(min_pixels=lo, max_pixels=hi, max_tokens=max_tokens, num_workers=args.workers)
                r["workers"], r["workers_images_per_s"] = args.workers, full_path(corpus, cfg_w)["images_per_s"]
            r["ratio_to_decode"] = r["images_per_s"] / results["decode_images_per_s"]
            results["budgets"][name] = r
            workers = f"{r['workers_images_per_s']:.1f} ({args.workers}w)" if args.workers else "-"
            print(f"{name:<7} {r['images_per_s']:>16.1f} {r['ratio_to_decode']:>6.2f} {workers:>14} "
                  f"{100 * r['padding']:>7.2f}% {100 * r['pad_to_largest']:>8.2f}% (B={r['pad_to_largest_batch_images']})")
    results["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
