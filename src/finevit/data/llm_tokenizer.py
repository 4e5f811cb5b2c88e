"""Stage 2's tokenizer: the LLM's own (a Hugging Face tokenizer directory), and the small one the
project trains for the demo with the same special tokens.

Qwen2 / Qwen2.5 / Qwen3 tokenizers carry the tokens stage 2's sequences are built from:
`<|im_start|>` / `<|im_end|>` around each chat turn, and an image block `<|vision_start|>` +
N x `<|image_pad|>` + `<|vision_end|>` (data/conversation.py writes them).
"""

import os
from typing import Iterable, Optional

# Fast tokenizers warn (and turn their threads off) when a DataLoader forks after a first use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = {"pad": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
                  "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                  "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>"}

# Qwen2-VL's chat template (images as an image block at their place in the user turn) without its
# default system turn: stage 2 trains without one unless data.llm.system_prompt says otherwise,
# and an exported processor must render conversations exactly as training did.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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
    `out` as a Hugging Face tokenizer directory with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
    tok = as_qwen2_tokenizer(bpe)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def as_qwen2_tokenizer(backend):
    """A `tokenizers.Tokenizer` as transformers' Qwen2TokenizerFast (the class Qwen2.5-VL's processor
    requires), with Qwen's special tokens."""
    from transformers import Qwen2TokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    return Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None,
                              pad_token=SPECIAL_TOKENS["pad"], eos_token=SPECIAL_TOKENS["im_end"],
                              additional_special_tokens=specials[1:])


def default_tokenizer(data_llm, llm) -> Optional[str]:
    """data.llm.tokenizer, else the LLM directory model.llm.init_from."""
    return data_llm.tokenizer or (llm.init_from if llm is not None else None)
