"""Stage 2's chat format, shared by the data pipeline (data/) and the export (convert/).

Qwen2 / Qwen2.5 / Qwen3 tokenizers carry the tokens stage 2's sequences are built from:
`<|im_start|>` / `<|im_end|>` around each chat turn, and an image block `<|vision_start|>` +
N x `<|image_pad|>` + `<|vision_end|>` (data/conversation.py writes them); an exported model's
processor renders conversations with CHAT_TEMPLATE, as training did.
"""

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


def as_qwen2_tokenizer(backend):
    """A `tokenizers.Tokenizer` as transformers' Qwen2TokenizerFast (the class Qwen2.5-VL's processor
    requires), with Qwen's special tokens."""
    from transformers import Qwen2TokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    return Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None,
                              pad_token=SPECIAL_TOKENS["pad"], eos_token=SPECIAL_TOKENS["im_end"],
                              additional_special_tokens=specials[1:])
