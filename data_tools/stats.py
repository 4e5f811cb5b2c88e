#!/usr/bin/env python
"""Print statistics of one or more finevit corpora; optionally write histograms as a PNG.

Sample count, width / height, vision tokens per image after smart resize into
[--min-pixels, --max-pixels], caption lengths, regions per kind (finecap). Reads the stored
width / height columns; decodes no image.
Exit status: 0 on success, 1 when a corpus cannot be opened.

Example:
  python data_tools/stats.py corpora/demo/recaption/train corpora/demo/finecap/train --png stats.png
"""

import argparse
import sys

from tqdm import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpora", nargs="+", help="corpus directories (or URLs with --cache)")
    p.add_argument("--cache", help="local cache directory for remote corpora (one subdirectory each)")
    p.add_argument("--min-pixels", type=int, default=336 * 336)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--limit", type=int, help="read at most this many samples per corpus")
    p.add_argument("--png", help="write histograms to this PNG file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 < args.min_pixels <= args.max_pixels:
        p.error("need 0 < --min-pixels <= --max-pixels")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    from finevit.data.corpus import CorpusError, open_corpus
    from finevit.data.stats import corpus_stats, format_table, plot

    results = []
    for i, path in enumerate(args.corpora):
        cache = os.path.join(args.cache, str(i)) if args.cache else None
        try:
            corpus = open_corpus(path, cache=cache)
        except (CorpusError, RuntimeError, OSError) as e:
            print(f"stats: cannot open {path}: {e}", file=sys.stderr)
            return 1
        with corpus, tqdm(total=min(len(corpus), args.limit or len(corpus)), unit="sample",
                          desc=corpus.name, disable=args.quiet, dynamic_ncols=True) as bar:
            results.append(corpus_stats(corpus, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                        limit=args.limit, progress=bar.update))
    print(format_table(results))
    if args.png:
        plot(results, args.png)
        print(f"histograms written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
