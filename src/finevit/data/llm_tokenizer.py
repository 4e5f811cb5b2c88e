"""Stage 2's tokenizer: the LLM's own (a Hugging Face tokenizer directory), and the small one the
project trains for the demo with the same special tokens (the chat format: finevit/chat_format.py).
"""

import os
from typing import Iterable

from finevit.chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS, as_qwen2_tokenizer

# Fast tokenizers warn (and turn their threads off) when a DataLoader forks after a first use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen2's pre-tokenizer split (its tokenizer.json): words with an optional leading non-letter,
# single digits, punctuation runs, newlines and spaces.
QWEN2_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot serve stage 2; one sentence."""


class LLMTokenizer:
    """A Hugging Face tokenizer directory with the chat and image tokens resolved to ids."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer directory ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0]})") from None
        vocab = self.tok.get_vocab()
        missing = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
        if missing:
            raise TokenizerError(f"the tokenizer in {path} lacks {', '.join(missing)}, which stage 2's "
                                 "chat turns and image blocks are made of (a Qwen2 / Qwen2.5 / Qwen3 tokenizer has them)")
        self.ids = {name: vocab[token] for name, token in SPECIAL_TOKENS.items()}
        self.path = path

    def __len__(self) -> int:
        return len(self.tok)

    @property
    def pad_id(self) -> int:
        return self.ids["pad"]

    @property
    def image_id(self) -> int:
        return self.ids["image_pad"]

    def encode(self, text: str) -> list[int]:
        """Plain text to ids: no special token added, none parsed out of the text."""
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def check_llm_tokenizer(path: str, vocab_size: int, key: str = "data.llm.tokenizer") -> list[str]:
    """Problems of a tokenizer directory for an LLM of `vocab_size` embedding rows."""
    try:
        tok = LLMTokenizer(path)
    except TokenizerError as e:
        return [f"{key}: {e}"]
    if len(tok) > vocab_size:
        return [f"{key}={path} has {len(tok)} tokens but model.llm.vocab_size={vocab_size}: the LLM "
                f"needs an embedding row for each"]
    return []


def train_llm_tokenizer(texts: Iterable[str], out: str, vocab_size: int = 1024,
                        min_frequency: int = 2) -> str:
    """Train a byte-level BPE on `texts` (the demo's captions and region texts) and save it to
    `out` as a Hugging Face tokenizer directory with Qwen's special tokens, pre-tokenizer and chat
    template. Qwen's pre-tokenizer matters for boxes: every digit is its own token, so a
    coordinate is spelled the same way wherever it appears (a plain byte-level BPE merges "14" +
    "1" here and " 363" there, and a small LLM then learns each number's spelling separately)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
    tok = as_qwen2_tokenizer(bpe)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out
