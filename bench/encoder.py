#!/usr/bin/env python
"""Packed native-resolution batches vs padding to the largest image (a benchmark, not a test).

Both sides run the same model on the same images (same total real pixels):

  packed   all images concatenated into one sequence; attention per image (cu_seqlens)
  padded   every image padded to the batch's largest token count, as a classic [B, L_max]
           batch: attention over L_max x L_max per image (the padded keys are masked, but a
           dense kernel still computes them) and the MLP over every padded row

The padded batch is run through the same packed code path with one segment of L_max tokens per
image, which is exactly the work a masked dense batch does; so the ratio isolates the cost of
padding, not differences between kernels.

Images: aspect ratios drawn from what recaption corpora hold (1:3 .. 3:1, 4:3, 16:9, ...),
smart-resized into the pixel budget [min_pixels, max_pixels] with sides multiples of 28.

Reported per configuration: padding fraction of the padded batch, forward+backward ms of each,
the ratio padded/packed and, with CUDA, achieved model TFLOP/s and MFU of the packed run
(model FLOPs count real tokens only; --peak-tflops sets the denominator, default H100/H200 bf16
dense 989).

Examples:
  python bench/encoder.py                                   # CPU: a small tower
  python bench/encoder.py --preset finevit-0.9b --budget 448 --images 16 --dtype bf16   # GPU
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

PRESETS = {
    # width 256 keeps a CPU run within a minute while the attention/MLP balance stays ViT-like.
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, ffn_hidden_size=768, out_hidden_size=256),
    "finevit-0.3b": dict(num_layers=24, hidden_size=1024, num_heads=16, ffn_hidden_size=2816,
                         out_hidden_size=1024),
    "finevit-0.9b": dict(),  # VisionConfig defaults
}
ASPECTS = [1 / 3, 1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model (default: finevit-0.9b with CUDA, small without)")
    p.add_argument("--budget", type=int, nargs="+", default=None,
                   help="max pixel budget sides, e.g. 336 448 (default: 224 336 on CPU, 448 on GPU)")
    p.add_argument("--images", type=int, default=None, help="images per batch (default 8 CPU / 16 GPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def sample_grids(n: int, budget: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(1, h, w) patch grids of n photos at native aspect ratio within a pixel budget."""
    from finevit.data.preprocess import smart_resize

    grids = []
    for _ in range(n):
        aspect = float(rng.choice(ASPECTS))  # width / height
        # Source photos are larger than the budget more often than not: resize brings them in.
        side = rng.uniform(0.6, 2.0) * budget
        h, w = int(side / np.sqrt(aspect)), int(side * np.sqrt(aspect))
        rh, rw = smart_resize(h, w, 28, min_pixels=(budget * 3 // 4) ** 2, max_pixels=budget * budget)
        grids.append((1, rh // 14, rw // 14))
    return grids


def padded_grids(grids: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Each image as one segment of the largest image's token count (a [B, L_max] batch)."""
    longest = max(h * w for _, h, w in grids)
    return [(1, 2, longest // 2) for _ in grids]  # a 2 x L/2 grid: same length, valid 2x2 groups


def time_step(model, pixels: torch.Tensor, grid: torch.Tensor, repeats: int, cuda: bool) -> float:
    """Median ms of one forward + backward."""
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(pixels, grid)
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first run pays allocation and kernel selection
            times.append((time.perf_counter() - t0) * 1e3)
        model.zero_grad(set_to_none=True)
    return float(np.median(times))


def run(args) -> list[dict]:
    from finevit.config import ParallelConfig, VisionConfig
    from finevit.models.vision.build import build_vision_encoder
    from finevit.models.vision.flops import encoder_train_flops
    from finevit.parallel.dist import init_distributed
    from finevit.parallel.groups import init_model_parallel

    cuda = torch.cuda.is_available()
    init_distributed(environ={"MASTER_PORT": os.environ.get("MASTER_PORT", "29511")})
    pg = init_model_parallel(ParallelConfig())
    vision = VisionConfig(**PRESETS[args.preset])
    model = build_vision_encoder(vision, ParallelConfig(), pg, dtype=args.dtype)[0]
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model.to(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rng = np.random.default_rng(args.seed)
    results = []
    for budget in args.budget:
        grids = sample_grids(args.images, budget, rng)
        real = sum(h * w for _, h, w in grids)
        padded = padded_grids(grids)
        total_padded = sum(h * w for _, h, w in padded)
        row = {"preset": args.preset, "budget": budget, "images": len(grids), "real_tokens": real,
               "padded_tokens": total_padded, "padding_fraction": 1 - real / total_padded}
        for name, g in (("packed", grids), ("padded", padded)):
            n = sum(h * w for _, h, w in g)
            pixels = torch.randn(n, vision.patch_dim, device=device, dtype=dtype)
            row[f"{name}_ms"] = time_step(model, pixels, torch.tensor(g), args.repeats, cuda)
        row["padded_over_packed"] = row["padded_ms"] / row["packed_ms"]
        flops = encoder_train_flops(vision, torch.tensor(grids))
        row["model_tflops_per_s"] = flops / (row["packed_ms"] / 1e3) / 1e12
        if cuda:
            row["mfu"] = row["model_tflops_per_s"] / args.peak_tflops
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results.append(row)
        print_row(row, cuda)
    return results


def print_row(row: dict, cuda: bool) -> None:
    line = (f"{row['preset']:>13} {row['budget']:>4}^2 x{row['images']:<3} tokens {row['real_tokens']:>6} "
            f"| padding {row['padding_fraction']:6.1%} | packed {row['packed_ms']:8.1f} ms  "
            f"padded {row['padded_ms']:8.1f} ms  padded/packed {row['padded_over_packed']:.2f}x "
            f"| {row['model_tflops_per_s']:.3f} TFLOP/s")
    if cuda:
        line += f"  MFU {row['mfu']:.1%}  peak {row['peak_mem_gib']:.1f} GiB"
    print(line, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("finevit-0.9b" if cuda else "small")
    args.budget = args.budget or ([448] if cuda else [224, 336])
    args.images = args.images or (16 if cuda else 8)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"# torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
          f"{args.dtype}, median of {args.repeats} forward+backward", flush=True)
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
