"""Run in a fresh process that must not import finevit: embeds images and captions with an
exported stage-1 directory through transformers + safetensors only, as docs/convert.md shows.

    python hf_stage1_embed.py EXPORT_DIR INPUTS.safetensors OUTPUT.safetensors
INPUTS: pixel_values [S, patch_dim], grid_thw [n, 3], and text_i [L_i] (caption ids, unpadded).
OUTPUT: images [n, d], texts [m, d] (L2-normalised), logits [n, m].
"""

import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SiglipTextModel, SiglipVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead


def image_head(export: str):
    head = load_file(f"{export}/head.safetensors")
    with safe_open(f"{export}/head.safetensors", "pt") as f:
        meta = f.metadata()
    width = head["norm.weight"].shape[0]
    norm = torch.nn.LayerNorm(width, eps=float(meta["norm_eps"]))
    norm.load_state_dict({k[5:]: v for k, v in head.items() if k.startswith("norm.")})
    pool = SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(
        hidden_size=width, num_attention_heads=int(meta["pool_heads"]),
        intermediate_size=head["pool.mlp.fc1.weight"].shape[0], layer_norm_eps=float(meta["norm_eps"])))
    pool.load_state_dict({k[5:]: v for k, v in head.items() if k.startswith("pool.")})
    proj = torch.nn.Linear(width, head["proj.weight"].shape[0])
    proj.load_state_dict({k[5:]: v for k, v in head.items() if k.startswith("proj.")})
    return norm, pool, proj, head["logit_scale"], head.get("logit_bias")


@torch.no_grad()
def main(export: str, inputs: str, output: str) -> None:
    x = load_file(inputs)
    vision = Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(f"{export}/vision").eval()
    states = []  # the encoder's patch states: its merger's input
    vision.merger.register_forward_pre_hook(lambda module, args: states.append(args[0]))
    vision(x["pixel_values"], grid_thw=x["grid_thw"])
    norm, pool, proj, scale, bias = image_head(export)
    sizes = (x["grid_thw"].prod(-1)).tolist()
    # Window attention reorders tokens within each image only; pooling is order-free.
    images = torch.cat([proj(pool(norm(s)[None]))[0:1] for s in states[0].split(sizes)])
    text = SiglipTextModel.from_pretrained(f"{export}/text").eval()
    texts = torch.cat([text(input_ids=x[k][None]).pooler_output
                       for k in sorted((k for k in x if k.startswith("text_")), key=lambda k: int(k[5:]))])
    images, texts = (torch.nn.functional.normalize(t, dim=-1) for t in (images, texts))
    logits = scale.exp() * images @ texts.T + (bias if bias is not None else 0)
    assert not any(m.startswith("finevit") for m in sys.modules), "the export must load without finevit"
    save_file({"images": images.contiguous(), "texts": texts.contiguous(), "logits": logits.contiguous()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
