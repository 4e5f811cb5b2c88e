"""The global stream (EpochPlan) and the resume / reshard bookkeeping (state.py), without images."""

import numpy as np
import pytest

from finevit.data.sampler import EpochPlan, apportion
from finevit.data.state import Phase, StateError, reshard


def test_each_epoch_is_a_shuffled_permutation():
    plan = EpochPlan([50], [np.array([20, 20, 10])], seed=1)
    e0, e1 = plan.locate(range(50)), plan.locate(range(50, 100))
    assert sorted(e0[:, 1]) == list(range(50)) == sorted(e1[:, 1])
    assert list(e0[:, 1]) != list(e1[:, 1]) and list(e0[:, 1]) != list(range(50))
    assert set(e0[:, 2]) == {0} and set(e1[:, 2]) == {1}
    assert (plan.locate([7, 60]) == np.stack([e0[7], e1[10]])).all()  # random access agrees
    assert (EpochPlan([50], [np.array([20, 20, 10])], seed=1).locate(range(50)) == e0).all()


def test_mixing_by_weight_is_exact_and_continues_each_corpus():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3] and sum(apportion(997, [0.2, 0.5, 0.3])) == 997
    plan = EpochPlan([30, 8], [np.array([30]), np.array([8])], weights=[1, 1], samples_per_epoch=20, seed=0)
    assert plan.counts == [10, 10]
    rows = plan.locate(range(60))  # three epochs
    for e in range(3):
        chunk = rows[20 * e:20 * (e + 1)]
        assert (chunk[:, 0] == 0).sum() == 10 and (chunk[:, 0] == 1).sum() == 10
    big = rows[rows[:, 0] == 0]  # 30 samples, 10 per epoch: one pass over 3 epochs, no repeat
    assert sorted(big[:, 1]) == list(range(30)) and set(big[:, 2]) == {0}
    small = rows[rows[:, 0] == 1]  # 8 samples, 10 per epoch: whole passes, each a permutation
    for p in range(3):
        assert sorted(small[small[:, 2] == p][:, 1]) == list(range(8))


def simulate_run(rng, dp_sizes, total=400):
    """Drive ranks through several phases with random progress and random carry-over (as a
    packer would leave), resharding in between; return every position consumed, in order."""
    phase, consumed = Phase(dp_sizes[0]), []
    for n, dp in enumerate(dp_sizes):
        if n:
            phase = reshard(states, dp)
        states = []
        for r in range(dp):
            reads = int(rng.integers(0, total // (dp * len(dp_sizes)) + 3))
            if n == len(dp_sizes) - 1:  # the last phase reads far enough to cover the bound
                reads = total
            ks = list(range(reads))
            buffer = sorted(rng.choice(reads, min(reads, int(rng.integers(0, 6))), replace=False).tolist()) if reads else []
            if n == len(dp_sizes) - 1:
                buffer = []
            consumed += [phase.rank_position(r, k) for k in ks if k not in buffer]
            states.append({"version": 1, "dp_rank": r, "dp_size": dp, "phase": phase.to_dict(),
                           "read": reads, "buffer": buffer})
    return consumed


@pytest.mark.parametrize("dp_sizes", [[2, 3], [4, 2], [3, 1, 4], [2, 2, 5, 3]])
def test_reshard_consumes_every_position_exactly_once(dp_sizes):
    for seed in range(20):
        consumed = simulate_run(np.random.default_rng(seed), dp_sizes)
        bound = 300
        early = [p for p in consumed if p < bound]
        assert sorted(early) == list(range(bound)), (dp_sizes, seed)


def test_reshard_refuses_incomplete_states():
    phase = Phase(2).to_dict()
    s0 = {"version": 1, "dp_rank": 0, "dp_size": 2, "phase": phase, "read": 3, "buffer": []}
    with pytest.raises(StateError, match="all 2 data-parallel ranks"):
        reshard([s0], 3)
    with pytest.raises(StateError, match="version"):
        reshard([{**s0, "version": 0}, {**s0, "dp_rank": 1, "version": 0}], 3)
    # Same progress everywhere, nothing buffered: the new phase starts where the old one ended.
    assert reshard([s0, {**s0, "dp_rank": 1}], 3) == Phase(3, [], 6)
