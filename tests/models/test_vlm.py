"""The VLM equals Hugging Face's Qwen2_5_VLForConditionalGeneration on the same (tiny, random)
weights: a packed row of two samples (three odd-sized images between texts) and padding gives,
sample by sample, HF's logits within 1e-4 (fp32); M-RoPE positions are HF's get_rope_index."""

import dataclasses

import torch

from finevit.config import ModelConfig, ParallelConfig, VisionConfig
from finevit.convert import qwen2 as conv
from finevit.convert.qwen2_5_vl import hf_config_from_vision
from finevit.models.llm.packing import segments, text_positions
from finevit.models.vlm import build_vlm, mrope_positions
from finevit.parallel.shards import load_full_state
from tiny_llm import TINY
from unit_scale import randomize_

VISION = VisionConfig(num_layers=2, hidden_size=32, num_heads=2, ffn_hidden_size=48, out_hidden_size=64,
                      window_size=56)
LLM = dataclasses.replace(TINY, vocab_size=100)
IMAGE, START, END = 97, 95, 96  # <image_pad>, <vision_start>, <vision_end>
GRIDS = [[1, 4, 6], [1, 2, 2], [1, 4, 4]]  # patches; merged: 2x3, 1x1, 2x2 tokens


def sample(texts: list[list[int]], images: list[int]) -> list[int]:
    """Text runs with an image block (<vision_start>, N x <image_pad>, <vision_end>) between them."""
    out = list(texts[0])
    for grid, text in zip(images, texts[1:]):
        t, h, w = GRIDS[grid]
        out += [START] + [IMAGE] * (t * h * w // 4) + [END] + list(text)
    return out


SAMPLES = [(sample([[5, 6, 7], [8, 9, 10, 11]], [0]), [0]),
           (sample([[12, 13], [14], [15, 16, 17]], [1, 2]), [1, 2])]


def hf_vlm(llm=LLM):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = conv.hf_config_from_llm(llm)
    text.pop("architectures"), text.pop("model_type")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": list(llm.mrope_section)}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=hf_config_from_vision(VISION).to_dict(),
                              image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END,
                              video_token_id=98)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    randomize_(model, seed=5)
    return model


def packed_row(pad: int):
    """(pixels [S, patch_dim], grid_thw [3 images, 3], input ids [s], LLMPackedSeqParams, positions
    [3, 1, s], and per sample (tokens, its pixels, its grid_thw)) for SAMPLES and `pad` tokens."""
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(t * h * w, VISION.patch_dim, generator=g) for t, h, w in GRIDS]
    row = torch.tensor([t for tokens, _ in SAMPLES for t in tokens] + [0] * pad)
    params = segments([len(t) for t, _ in SAMPLES], len(row))
    order = [i for _, gs in SAMPLES for i in gs]
    grid = torch.tensor([GRIDS[i] for i in order])
    positions = mrope_positions(row == IMAGE, params.cu_seqlens, grid // torch.tensor([1, 2, 2]))
    per_sample = [(tokens, torch.cat([pixels[i] for i in gs]), torch.tensor([GRIDS[i] for i in gs]))
                  for tokens, gs in SAMPLES]
    return torch.cat([pixels[i] for i in order]), grid, row, params, positions, per_sample


def test_mrope_positions_are_hugging_faces(dist):
    hf = hf_vlm()
    *_, positions, per_sample = packed_row(pad=3)
    start = 0
    for tokens, _, grid in per_sample:
        theirs, _ = hf.model.get_rope_index(torch.tensor([tokens]), grid)
        assert torch.equal(positions[:, 0, start:start + len(tokens)], theirs[:, 0]), tokens
        start += len(tokens)
    assert torch.equal(positions[:, 0, start:], torch.arange(3).expand(3, 3))  # padding: a text run of its own


def test_logits_equal_hugging_face(solo_groups):
    hf = hf_vlm()
    model = build_vlm(ModelConfig(vision=VISION, llm=LLM), ParallelConfig(), solo_groups, use_te=False).eval()
    state = conv.vlm_hf_to_canonical(hf.state_dict(), VISION, LLM)
    load_full_state([model], state, 0, 1)
    x, grid, row, params, positions, per_sample = packed_row(pad=3)
    with torch.no_grad():
        ours = model(x, grid, row[None], row == IMAGE, positions, params)
        # controls: the images and the 3-D positions both reach the logits
        blind = model(torch.zeros_like(x), grid, row[None], row == IMAGE, positions, params)
        flat = model(x, grid, row[None], row == IMAGE, text_positions(params), params)
        assert (blind - ours).abs().max() > 1e-2 and (flat - ours).abs().max() > 1e-2
        start = 0
        for tokens, their_pixels, their_grid in per_sample:
            theirs = hf(input_ids=torch.tensor([tokens]), pixel_values=their_pixels, image_grid_thw=their_grid).logits
            diff = (ours[:, start:start + len(tokens)] - theirs).abs().max().item()
            print(f"sample of {len(tokens)} tokens: max |ours - HF| = {diff:.2e}, logits std {theirs.std():.2f}")
            assert diff < 1e-4
            start += len(tokens)


def test_parameters_carry_their_tower_and_a_step_counts_both_towers_flops(solo_groups):
    from finevit.models.llm.flops import llm_train_flops
    from finevit.models.towers import TOWER_ATTR
    from finevit.models.vlm.flops import vlm_train_flops

    model = build_vlm(ModelConfig(vision=VISION, llm=LLM), ParallelConfig(), solo_groups, use_te=False)
    towers = {n.split(".")[0] + (".merger" if ".merger." in n else ""): getattr(p, TOWER_ATTR)
              for n, p in model.named_parameters()}
    assert towers == {"vision": "vision", "vision.merger": "projector", "llm": "llm"}
    # One 4x6-patch image (h 32, ffn 48, 2 layers, patch_dim 1176; merged width 128 -> 64) and one
    # 15-token sample (the LLM's count, checked on its own in test_llm.py).
    n, h, f = 24, 32, 48
    per_layer = 2 * n * h * 3 * h + 2 * n * h * h + 2 * n * h * 2 * f + 2 * n * f * h + 4 * n * n * h
    encoder = 2 * n * VISION.patch_dim * h + 2 * per_layer + 2 * 6 * 128 * 128 + 2 * 6 * 128 * 64
    assert vlm_train_flops(ModelConfig(vision=VISION, llm=LLM), torch.tensor([[1, 4, 6]]), [15]) == \
        3 * encoder + llm_train_flops(LLM, [15])


def test_a_frozen_encoder_builds_no_graph_and_changes_no_output(solo_groups):
    model = build_vlm(ModelConfig(vision=VISION, llm=LLM), ParallelConfig(), solo_groups, use_te=False)
    x, grid, row, params, positions, _ = packed_row(pad=3)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(x, grid, row[None], row == IMAGE, positions, params)
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    live, grads = run()
    model.vision.frozen = True
    frozen, frozen_grads = run()
    torch.testing.assert_close(frozen, live, rtol=0, atol=0)
    for name, grad in frozen_grads.items():
        if name.startswith("vision.") and ".merger." not in name:
            assert grad is None, name  # no graph: not even a zero gradient
        else:  # the projector and the LLM learn as before
            torch.testing.assert_close(grad, grads[name], rtol=1e-6, atol=1e-7)
