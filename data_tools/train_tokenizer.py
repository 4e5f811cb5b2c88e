#!/usr/bin/env python
"""Train a sentencepiece caption tokenizer on the captions of one or more finevit corpora.

Recaption corpora contribute every recaption; finecap corpora their global captions and region
texts. Special ids: pad 0, unk 1, bos 2, eos 3 (what finevit.data.tokenizer expects).
Exit status: 0 on success, 1 when a corpus cannot be opened or holds no text.

Example:
  python data_tools/train_tokenizer.py corpora/demo/recaption/train --vocab-size 8000 --out caption.model
"""

import argparse
import sys
import time

from tqdm import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpora", nargs="+", help="corpus directories")
    p.add_argument("--out", required=True, help="output .model file")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    p.add_argument("--max-sentences", type=int, default=10_000_000, help="train on at most this many texts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.vocab_size < 300:
        p.error("--vocab-size must be at least 300 (byte fallback needs 259 ids + specials)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from finevit.data.corpus import CorpusError, open_corpus
    from finevit.data.tokenizer import CaptionTokenizer, corpus_texts, train_sentencepiece

    corpora = []
    try:
        for path in args.corpora:
            corpora.append(open_corpus(path))
    except (CorpusError, RuntimeError, OSError) as e:
        print(f"train_tokenizer: cannot open {path}: {e}", file=sys.stderr)
        for c in corpora:
            c.close()
        return 1
    t0 = time.time()
    bar = tqdm(total=sum(len(c) for c in corpora), unit="sample", disable=args.quiet, dynamic_ncols=True)

    def texts():
        for c in corpora:
            yield from corpus_texts(c, bar.update)

    try:
        used = train_sentencepiece(texts(), args.out, args.vocab_size, args.model_type,
                                   max_sentences=args.max_sentences)
    except RuntimeError as e:  # sentencepiece reports an empty or unusable input this way
        print(f"train_tokenizer: training failed: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        for c in corpora:
            c.close()
    tok = CaptionTokenizer(args.out)
    print(f"tokenizer   {args.out}\nvocab       {tok.vocab_size}\ntexts       {used}\n"
          f"time        {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
