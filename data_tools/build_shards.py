#!/usr/bin/env python
"""Build a finevit corpus (MDS shards of the recaption, finecap or classify schema) from raw inputs.

Inputs are JSONL manifests, webdataset tars or parquet files (format from the extension, or
--format). Every record is validated; rejected ones go to OUT/rejected.jsonl with their reason and
never stop the build. Interrupted builds resume when rerun with the same arguments.
Exit status: 0 when the corpus is complete (rejected records included), 1 when a part of the input
could not be read or nothing was written, 2 on bad arguments.

Examples:
  python data_tools/build_shards.py --schema finecap --out corpora/finecap/train \\
      --workers 8 --paper-filters manifests/*.jsonl
  python data_tools/build_shards.py --schema classify --classes classes.txt \\
      --templates templates.txt --out corpora/imagenet/val val.parquet
"""

import argparse
import sys

from tqdm import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL / .tar / .parquet input files")
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--schema", required=True, choices=("recaption", "finecap", "classify"))
    p.add_argument("--classes", help="classify: text file with one class name per line (label i = line i)")
    p.add_argument("--templates", help="classify: text file with one prompt template per line, each with "
                   "one {} for the class name (default at evaluation: eval.templates)")
    p.add_argument("--format", choices=("jsonl", "wds", "parquet"), help="input format (default: by extension)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--records-per-part", type=int, default=5000,
                   help="JSONL lines per unit of work and of resumption (default 5000)")
    p.add_argument("--shard-size", default="64mb", help="MDS shard size limit (default 64mb)")
    p.add_argument("--image-column", default="image", help="parquet column with the image bytes")
    p.add_argument("--paper-filters", action="store_true",
                   help="reject images with short side < 448 or aspect ratio outside [1/3, 3]")
    p.add_argument("--min-side", type=int, default=28, help="reject images with a smaller side (pixels)")
    p.add_argument("--max-caption-chars", type=int, default=65536, help="reject longer captions")
    p.add_argument("--overwrite", action="store_true", help="delete an existing build at --out first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1 or args.records_per_part < 1:
        p.error("--workers and --records-per-part must be positive")
    if (args.schema == "classify") != (args.classes is not None):
        p.error("--classes is required with --schema classify and only there")
    if args.templates and args.schema != "classify":
        p.error("--templates applies to --schema classify only")
    return args


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    from finevit.data.build import BuildError, BuildOptions, build_corpus
    from finevit.data.schema import Limits

    limits = Limits(min_side=args.min_side, max_caption_chars=args.max_caption_chars,
                    paper_filters=args.paper_filters)
    try:
        classes = read_lines(args.classes) if args.classes else []
        templates = read_lines(args.templates) if args.templates else None
    except OSError as e:
        print(f"build_shards: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    opts = BuildOptions(schema=args.schema, limits=limits, records_per_part=args.records_per_part,
                        size_limit=args.shard_size, image_column=args.image_column,
                        classes=classes, templates=templates)
    bar = tqdm(total=0, unit="part", disable=args.quiet, dynamic_ncols=True)
    totals = {"ok": 0, "rejected": 0}

    def plan(n):
        bar.reset(total=n)

    def progress(result):
        totals["ok"] += result.written
        totals["rejected"] += sum(result.rejected.values())
        bar.set_postfix(written=totals["ok"], rejected=totals["rejected"], refresh=False)
        bar.update(1)

    try:
        summary = build_corpus(args.inputs, args.out, opts, fmt=args.format, workers=args.workers,
                               overwrite=args.overwrite, progress=progress, on_plan=plan)
    except BuildError as e:
        bar.close()
        print(f"build_shards: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("build_shards: interrupted; rerun with the same arguments to resume", file=sys.stderr)
        return 130
    bar.close()
    print("\n".join(summary.lines()))
    if summary.failed:
        print(f"build_shards: {len(summary.failed)} part(s) failed; fix the input and rerun to resume",
              file=sys.stderr)
        return 1
    if not summary.written:
        print("build_shards: no record passed validation; the corpus is empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
