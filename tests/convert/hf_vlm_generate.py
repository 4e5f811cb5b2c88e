"""Run in a fresh process that must not import finevit: an exported stage-2 directory loaded with
AutoModelForImageTextToText + AutoProcessor answers a question about an image.

    python hf_vlm_generate.py EXPORT_DIR IMAGE.png "QUESTION" OUTPUT.safetensors MAX_NEW
OUTPUT: input_ids [1, s], pixel_values, image_grid_thw, logits [1, s, V], generated [MAX_NEW].
"""

import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor


@torch.no_grad()
def main(export: str, image: str, question: str, output: str, max_new: str) -> None:
    model = AutoModelForImageTextToText.from_pretrained(export).float().eval()
    processor = AutoProcessor.from_pretrained(export)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=int(max_new), min_new_tokens=int(max_new), do_sample=False)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not any(m.startswith("finevit") for m in sys.modules), "the export must load without finevit"
    save_file({"input_ids": inputs["input_ids"].contiguous(), "pixel_values": inputs["pixel_values"].contiguous(),
               "image_grid_thw": inputs["image_grid_thw"].contiguous(), "logits": logits.contiguous(),
               "generated": out[0, inputs["input_ids"].shape[1]:].contiguous()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
