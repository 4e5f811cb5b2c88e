"""Single-process behaviour of the text tower: shapes, pooling, padding, position stretching."""

import dataclasses

import pytest
import torch

from finevit.config import ParallelConfig, TextConfig
from finevit.models.text.build import build_text_encoder
from finevit.models.text.encoder import pad_to_length

TINY = TextConfig(vocab_size=64, max_positions=16, num_layers=2, hidden_size=32, num_heads=4,
                  ffn_hidden_size=48, pad_id=0)
EMBED = 24


@pytest.fixture(scope="module")
def groups(dist, parallel_groups):
    return parallel_groups()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(groups, **overrides):
    torch.manual_seed(0)
    return build_text_encoder(dataclasses.replace(TINY, **overrides), EMBED, ParallelConfig(),
                              groups, use_te=False).eval()


def texts(lengths, seq_len, seed=1, pad=0):
    """[n, seq_len] random ids in 1..63 up to each length, `pad` after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY.vocab_size, (len(lengths), seq_len), generator=g)
    for row, n in zip(ids, lengths):
        row[n:] = pad
    return ids, torch.tensor(lengths)


def test_shapes_and_length_limit(groups):
    model = build(groups)
    for seq_len in (5, TINY.max_positions):
        ids, _ = texts([3, seq_len, 1], seq_len)
        assert model(ids).shape == (3, EMBED)
    with pytest.raises(ValueError, match="exceed max_positions=16"):
        model(torch.zeros(2, 17, dtype=torch.long))


def test_last_pooling_reads_the_final_padded_position(groups):
    model = build(groups)
    ids, _ = texts([4, 6], 8)
    with torch.no_grad():
        out = model(ids)
        # SigLIP: the final position even when it is padding, so the padded length matters
        longer = model(pad_to_length(ids, 10, TINY.pad_id))
        hidden = model.decoder(
            (model.word_embeddings(ids) + model.position_embeddings.weight[:8]).transpose(0, 1),
            attention_mask=None)
        want = model.head(hidden[-1])
    torch.testing.assert_close(out, want)
    assert (out - longer).abs().max() > 1e-3


def test_eos_pooling_ignores_padding(groups):
    model = build(groups, pooling="eos")
    ids, lengths = texts([3, 7, 1, 5], 8)
    other_pad, _ = texts([3, 7, 1, 5], 8, pad=9)
    with torch.no_grad():
        out = model(ids, lengths)
        # different pad tokens, and more of them: same output
        torch.testing.assert_close(model(other_pad, lengths), out, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(pad_to_length(ids, 12, 5), lengths), out, atol=1e-6, rtol=0)
        # each text alone, unpadded
        alone = torch.cat([model(ids[i:i + 1, :n], lengths[i:i + 1]) for i, n in enumerate([3, 7, 1, 5])])
    torch.testing.assert_close(alone, out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='"eos" pooling needs the text lengths'):
        model(ids)


def test_eos_equals_last_on_unpadded_texts(groups):
    last, eos = build(groups), build(groups, pooling="eos")
    eos.load_state_dict(last.state_dict())
    ids, lengths = texts([8, 8], 8)
    with torch.no_grad():
        torch.testing.assert_close(eos(ids, lengths), last(ids), atol=1e-6, rtol=0)


def test_every_parameter_gets_a_gradient(groups):
    model = build(groups, pooling="eos").train()
    ids, lengths = texts([3, 8, 5], 8)
    model(ids, lengths).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # positions beyond the texts' length are not used
    assert model.position_embeddings.weight.grad[8:].abs().sum() == 0


def test_extend_positions_stretches_in_place(groups):
    model = build(groups)
    table = model.position_embeddings.weight
    before = table.detach().clone()
    model.extend_positions(3, 5)
    assert model.position_embeddings.weight is table and table.shape == before.shape
    after = table.detach()
    # 3 rows over 5: new rows sit at old positions 0, 0.5, 1, 1.5, 2
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    torch.testing.assert_close(after[2], before[1])
    torch.testing.assert_close(after[4], before[2], atol=0, rtol=0)
    torch.testing.assert_close(after[1], (before[0] + before[1]) / 2)
    torch.testing.assert_close(after[3], (before[1] + before[2]) / 2)
    assert torch.equal(after[5:], before[5:])
    model.extend_positions(5, 16)  # the whole table
    torch.testing.assert_close(after[15], before[2], atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot stretch 4 positions over 17"):
        model.extend_positions(4, 17)


def test_pad_to_length():
    ids = torch.tensor([[5, 6], [7, 0]])
    assert pad_to_length(ids, 4, 0).tolist() == [[5, 6, 0, 0], [7, 0, 0, 0]]
    with pytest.raises(ValueError, match="do not fit"):
        pad_to_length(ids, 1, 0)


def test_unknown_pooling_is_refused(groups):
    with pytest.raises(ValueError, match="unknown text pooling 'mean'"):
        build(groups, pooling="mean")
