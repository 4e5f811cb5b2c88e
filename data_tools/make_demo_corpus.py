#!/usr/bin/env python
"""Write the deterministic synthetic demo corpus: OUT/{recaption,finecap}/{train,heldout} and,
with --schemas classify, OUT/classify/heldout (single shapes labelled colour x kind).

Procedurally drawn scenes (shapes, colours, sizes, positions, rendered words and document pages)
at varied aspect ratios and resolutions, with exact long captions, region captions and OCR boxes
that are determined by the pixels. The same --seed gives byte-identical shards.
Exit status: 0 on success, 1 when the output exists (without --overwrite) or cannot be written.

Example:
  python data_tools/make_demo_corpus.py --out corpora/demo --train 2000 --heldout 200
"""

import argparse
import os
import shutil
import sys
import time

from tqdm import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1000, help="training samples per schema (default 1000)")
    p.add_argument("--heldout", type=int, default=100, help="held-out samples per schema (default 100)")
    p.add_argument("--schemas", nargs="+", default=["recaption", "finecap"], choices=("recaption", "finecap", "classify"))
    p.add_argument("--shard-size", default="16mb", help="MDS shard size limit (default 16mb)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.train < 1 or args.heldout < 0:
        p.error("--train must be positive and --heldout not negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        if not args.overwrite:
            print(f"make_demo_corpus: {args.out} exists and is not empty; pass --overwrite", file=sys.stderr)
            return 1
        shutil.rmtree(args.out)
    from finevit.data.demo import write_demo_corpus

    t0 = time.time()
    total = sum(args.heldout + (args.train if s != "classify" else 0) for s in args.schemas)
    with tqdm(total=total, unit="img", disable=args.quiet, dynamic_ncols=True) as bar:
        try:
            paths = write_demo_corpus(args.out, args.seed, args.train, args.heldout, tuple(args.schemas),
                                      args.shard_size, progress=bar.update)
        except OSError as e:
            print(f"make_demo_corpus: cannot write {args.out}: {e}", file=sys.stderr)
            return 1
    for name, path in paths.items():
        n = args.train if name.endswith("train") else args.heldout
        print(f"{name:<18} {n:>7} samples  {path}")
    print(f"{total} samples in {time.time() - t0:.1f} s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
