"""Run in a fresh process that must not import finevit: the two directories of an exported
stage-2 run with a Qwen3 LLM (vision/ and llm/) loaded with transformers only.

    python hf_parts_forward.py EXPORT_DIR INPUTS.safetensors OUTPUT.safetensors
INPUTS: pixel_values [S, patch_dim], grid_thw [n, 3], input_ids [s] (text only).
OUTPUT: images [S/4, llm width] (the projector's rows, the LLM's image embeddings), logits [1, s, V].
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2VLImageProcessor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel


@torch.no_grad()
def main(export: str, inputs: str, output: str) -> None:
    x = load_file(inputs)
    vision = Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(f"{export}/vision").eval()
    Qwen2VLImageProcessor.from_pretrained(f"{export}/vision")  # the processor is there too
    llm = AutoModelForCausalLM.from_pretrained(f"{export}/llm").eval()
    tokenizer = AutoTokenizer.from_pretrained(f"{export}/llm")
    assert type(llm).__name__ == "Qwen3ForCausalLM" and "<|image_pad|>" in tokenizer.get_vocab()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    images = vision(x["pixel_values"], grid_thw=x["grid_thw"])
    logits = llm(input_ids=x["input_ids"][None]).logits
    assert not any(m.startswith("finevit") for m in sys.modules), "the export must load without finevit"
    save_file({"images": images.contiguous(), "logits": logits.contiguous()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
