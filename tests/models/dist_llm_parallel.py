"""Multi-rank: the LLM under TP=2 (with and without sequence parallelism) computes Hugging Face's
logits, each rank its half of the vocabulary, from a HF checkpoint loaded into the TP layout.

Run through tests/parallel/test_multirank.py (4 gloo ranks: TP=2 x DP=2).
"""

import pytest
import torch

from finevit.config import ParallelConfig
from finevit.convert import qwen2 as conv
from finevit.models.llm import build_llm, text_positions
from tiny_llm import CASES, LENGTHS, hf_model, packed_batch


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen3"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_logits_equal_hugging_face(parallel_groups, name, sp):
    llm = CASES[name]
    hf = hf_model(llm)  # same seed on every rank
    pg = parallel_groups(tp=2)
    rank = pg.tp.rank()
    torch.manual_seed(0)
    model = build_llm(llm, ParallelConfig(tensor=2, sequence_parallel=sp), pg, use_te=False).eval()
    conv.load_hf_llm([model], hf.state_dict(), llm, rank, 2)
    ids, params = packed_batch(llm)
    half = llm.vocab_size // 2
    with torch.no_grad():
        ours = model(ids, text_positions(params), None, packed_seq_params=params)  # [1, s, V / 2]
        assert ours.shape[-1] == half
        start = 0
        for n in LENGTHS:
            theirs = hf(input_ids=ids[:, start:start + n]).logits[..., rank * half:(rank + 1) * half]
            torch.testing.assert_close(ours[:, start:start + n], theirs, atol=1e-4, rtol=1e-4)
            start += n


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_vlm_tp2_logits_equal_hugging_face(parallel_groups, sp):
    """The spliced image tokens survive tensor and sequence parallelism (scattered after the splice)."""
    from finevit.config import ModelConfig
    from finevit.models.vlm import build_vlm
    from finevit.parallel.shards import load_full_state
    from test_vlm import IMAGE, LLM, VISION, hf_vlm, packed_row

    hf = hf_vlm()
    pg = parallel_groups(tp=2)
    rank = pg.tp.rank()
    model = build_vlm(ModelConfig(vision=VISION, llm=LLM), ParallelConfig(tensor=2, sequence_parallel=sp), pg,
                      use_te=False).eval()
    load_full_state([model], conv.vlm_hf_to_canonical(hf.state_dict(), VISION, LLM), rank, 2)
    x, grid, row, params, positions, per_sample = packed_row(pad=2)  # 32 tokens: even, for the SP split
    half = LLM.vocab_size // 2
    with torch.no_grad():
        ours = model(x, grid, row[None], row == IMAGE, positions, params)
        start = 0
        for tokens, their_pixels, their_grid in per_sample:
            theirs = hf(input_ids=torch.tensor([tokens]), pixel_values=their_pixels,
                        image_grid_thw=their_grid).logits[..., rank * half:(rank + 1) * half]
            torch.testing.assert_close(ours[:, start:start + len(tokens)], theirs, atol=1e-4, rtol=1e-4)
            start += len(tokens)


@pytest.mark.parametrize("first_stage_layers", [1, 2])
def test_vlm_pp2_logits_equal_hugging_face(parallel_groups, first_stage_layers):
    """Encoder + projector + embedding + the first LLM layers on stage 0, the rest of a 3-layer LLM
    on stage 1, through megatron's pipeline schedule: the last stage computes HF's logits."""
    import dataclasses

    from finevit.config import ModelConfig
    from finevit.models.vlm import build_vlm
    from finevit.parallel.schedule import forward_backward
    from finevit.parallel.shards import load_full_state
    from test_vlm import IMAGE, LLM, VISION, hf_vlm, packed_row

    llm = dataclasses.replace(LLM, num_layers=3)
    hf = hf_vlm(llm)
    pg = parallel_groups(pp=2)
    model = build_vlm(ModelConfig(vision=VISION, llm=llm), ParallelConfig(pipeline=2), pg, use_te=False,
                      first_stage_layers=first_stage_layers).eval()
    assert (model.vision is not None) == (pg.pp.rank() == 0)
    layers = first_stage_layers if pg.pp.rank() == 0 else 3 - first_stage_layers
    assert len(model.llm.decoder.layers) == layers
    load_full_state([model], conv.vlm_hf_to_canonical(hf.state_dict(), VISION, llm), 0, 1)
    x, grid, row, params, positions, per_sample = packed_row(pad=2)
    logits = []

    def forward(chunk, _):
        out = chunk(x, grid, row[None], row == IMAGE, positions, params)

        def keep(output):
            logits.append(output.detach())
            return output.sum() * 0, {}
        return out, keep

    with torch.no_grad():
        forward_backward([model], [None], forward, pg, seq_length=len(row), forward_only=True)
    if pg.pp.rank() == 0:
        assert not logits
        return
    (ours,) = logits
    start = 0
    for tokens, their_pixels, their_grid in per_sample:
        theirs = hf(input_ids=torch.tensor([tokens]), pixel_values=their_pixels, image_grid_thw=their_grid).logits
        torch.testing.assert_close(ours[:, start:start + len(tokens)], theirs, atol=1e-4, rtol=1e-4)
        start += len(tokens)
