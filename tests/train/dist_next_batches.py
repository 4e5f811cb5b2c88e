"""Multi-rank: tensor-parallel peers receive the reading rank's micro-batches whole (tensors by
broadcast, the rest in a small header), and its bad-sample stop.

Run through tests/parallel/test_multirank.py (4 gloo ranks).
"""

import pytest
import torch

from finevit.data.loader import BadSampleBudget
from finevit.data.packing import PackedBatch
from finevit.train.state import next_batches


class FakeLoader:
    """Batches of stage-2 shape whose content depends on the reading rank's data-parallel index."""

    def __init__(self, seed: int, fail_at: int = -1):
        self.g, self.calls, self.fail_at = torch.Generator().manual_seed(seed), 0, fail_at

    def __next__(self) -> PackedBatch:
        self.calls += 1
        if self.calls == self.fail_at:
            raise BadSampleBudget("3 of the last 4 samples on data-parallel rank 0 were bad")
        g = self.g
        return PackedBatch(torch.randn(12, 6, generator=g), torch.tensor([[1, 2, 2], [1, 2, 4]]),
                           torch.tensor([0, 4, 12], dtype=torch.int32), torch.randint(0, 99, (2,), generator=g),
                           ["a-1", "b-2"], torch.zeros(2, dtype=torch.int64), ["", ""],
                           boxes=[torch.rand(1, 4, generator=g), torch.rand(0, 4)], region_texts=[["x"], []],
                           llm_ids=torch.randint(0, 50, (16,), generator=g),
                           llm_labels=torch.full((16,), -100), llm_cu_seqlens=torch.tensor([0, 7, 15], dtype=torch.int32),
                           tasks=[["caption"], ["text_to_box", "box_to_text"]], skipped=[("c-3", "box_outside")])


def _same(a: PackedBatch, b: PackedBatch) -> bool:
    for name, x in vars(a).items():
        y = getattr(b, name)
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and y.device.type == "cpu" and y.dtype == x.dtype and torch.equal(x, y)):
                return False
        elif name == "boxes":
            if len(x) != len(y) or not all(torch.equal(p, q) for p, q in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_tp_peers_receive_the_readers_batches(parallel_groups):
    pg = parallel_groups(tp=2)
    reader = pg.tp.rank() == 0
    # Only the reader's loader is read; a peer's would give other batches if it were.
    loader = FakeLoader(seed=10 + pg.dp.rank() if reader else 99)
    got = next_batches(loader, 2, pg.tp)
    again = FakeLoader(seed=10 + pg.dp.rank())
    expected = [next(again), next(again)]
    assert len(got) == 2 and all(_same(e, g) for e, g in zip(expected, got))
    assert loader.calls == (2 if reader else 0)


def test_a_bad_sample_stop_reaches_the_tp_peer(parallel_groups):
    pg = parallel_groups(tp=2)
    loader = FakeLoader(seed=0, fail_at=2)
    with pytest.raises(BadSampleBudget, match="3 of the last 4"):
        next_batches(loader, 2, pg.tp)
