#!/usr/bin/env python
"""Train a tokenizer on the captions of one or more finevit corpora.

--kind caption (stage 1): a sentencepiece model for the text tower; special ids pad 0, unk 1,
bos 2, eos 3 (what finevit.data.tokenizer expects). --kind llm (stage 2, for an LLM trained from
scratch, e.g. the demo's): a byte-level BPE saved as a Hugging Face tokenizer directory, with
Qwen's chat and image tokens and chat template (what finevit.data.llm_tokenizer expects); it also
learns the task questions and box coordinates of stage-2 conversations.
Recaption corpora contribute every recaption; finecap corpora their global captions and region
texts. Exit status: 0 on success, 1 when a corpus cannot be opened or holds no text.

Examples:
  python data_tools/train_tokenizer.py corpora/demo/recaption/train --vocab-size 8000 --out caption.model
  python data_tools/train_tokenizer.py corpora/demo/finecap/train --kind llm --vocab-size 1024 --out llm_tokenizer
"""

import argparse
import sys
import time

from tqdm import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpora", nargs="+", help="corpus directories")
    p.add_argument("--out", required=True, help="output .model file (caption) or directory (llm)")
    p.add_argument("--kind", default="caption", choices=("caption", "llm"))
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
        if args.kind == "llm":
            return _train_llm(args, texts(), t0)
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


def _train_llm(args, texts, t0: float) -> int:
    from finevit.data.conversation import QUESTIONS
    from finevit.data.llm_tokenizer import LLMTokenizer, train_llm_tokenizer

    # What every conversation holds besides the corpus texts: role names, the task questions and
    # box coordinates (numbers up to 1000).
    chat = ["system\n", "user\n", "assistant\n", *QUESTIONS.values(), *(f"[{i}, {i}, {i}, {i}]" for i in range(1001))]
    texts = list(texts)
    if not texts:
        print("train_tokenizer: the corpora hold no text", file=sys.stderr)
        return 1
    train_llm_tokenizer(texts + chat * max(1, len(texts) // 2000), args.out, args.vocab_size)
    print(f"tokenizer   {args.out}\nvocab       {len(LLMTokenizer(args.out))}\ntexts       {len(texts)}\n"
          f"time        {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
