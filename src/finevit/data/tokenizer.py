"""Caption tokenizer: a sentencepiece model trained on corpus captions, and its encoder.

The model is trained in-process from an iterator (no temporary text file). Ids: pad 0, unk 1,
bos 2, eos 3; `encode` appends eos so a caption decoder learns where to stop.
"""

import io
import os
from typing import Callable, Iterable, Iterator, Optional

import torch

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def corpus_texts(corpus, progress: Optional[Callable[[int], None]] = None) -> Iterator[str]:
    """Caption strings of an opened Corpus: every recaption of a recaption sample, the global
    caption and region texts of a finecap sample."""
    for i in range(len(corpus)):
        row = corpus[i]
        if corpus.schema == "recaption":
            yield from row["captions"]
        else:
            yield row["global_caption"]
            yield from (r["text"] for r in row["regions"])
        if progress:
            progress(1)


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 8000,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        byte_fallback: bool = True, max_sentences: int = 10_000_000) -> int:
    """Train and write `model_path` (a .model file); returns the number of sentences used."""
    import sentencepiece as spm
    count = [0]

    def sentences():
        for t in texts:
            if count[0] >= max_sentences:
                return
            t = t.strip()
            if t:
                count[0] += 1
                yield t

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, byte_fallback=byte_fallback,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        minloglevel=2)
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    return count[0]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; one sentence."""


def check_tokenizer(path: str, key: str = "data.tokenizer") -> int:
    """The number of pieces of the sentencepiece model at `path`, or TokenizerError saying why it
    cannot be loaded (a run must learn this before it starts, not from every sample failing)."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise TokenizerError(f"{key}={path} {what}: name a sentencepiece .model file "
                             "(data_tools/train_tokenizer.py trains one from a corpus)")
    import sentencepiece as spm
    try:
        return spm.SentencePieceProcessor(model_file=path).get_piece_size()
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError / others
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{key}={path} is not a sentencepiece model ({detail})") from None


class CaptionTokenizer:
    """Loads lazily, so it pickles into DataLoader workers as a path."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._sp = None

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "_sp": None}

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return max(self.sp.pad_id(), 0)

    def encode(self, text: str, max_len: Optional[int] = None) -> torch.Tensor:
        eos = self.sp.eos_id()
        ids = self.sp.encode(text) + ([eos] if eos >= 0 else [])
        return torch.tensor(ids[:max_len] if max_len else ids, dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.sp.pad_id(), self.sp.eos_id())])
