"""The global sample stream: position g -> (corpus, sample index, pass), for any mix of corpora.

Positions g = 0, 1, 2, ... enumerate an endless stream; epoch e is positions [e*L, (e+1)*L).
An epoch holds n_c samples of corpus c: its size N_c when no corpus has a weight (every corpus
exactly once), else a share of L (data.samples_per_epoch, default sum N_c) proportional to the
weights. Corpus c's samples come from its own endless stream: pass p is a permutation of its N_c
samples (mosaicml-streaming's shard-aware shuffle, seeded by the run seed, c and p) and epoch e
takes that stream's items [e*n_c, (e+1)*n_c), so an undersampled corpus continues where the last
epoch stopped and an oversampled one wraps into its next pass. Within an epoch the corpora are
interleaved by a seeded permutation of the n_c labels.

Everything is a pure function of (seed, corpus sizes, shard sizes, weights): every rank and every
resumed run computes the same stream, and nothing about it needs to be checkpointed.
Tables are built with numpy once per epoch, never per sample.
"""

from typing import Optional, Sequence

import numpy as np


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder; exact sum)."""
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    raw = w * total
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class EpochPlan:
    def __init__(self, corpus_sizes: Sequence[int], shard_sizes: Sequence[np.ndarray],
                 weights: Optional[Sequence[float]] = None, samples_per_epoch: Optional[int] = None,
                 seed: int = 0, shuffle_algo: str = "py1e", shuffle_block_size: int = 1 << 18):
        self.sizes = [int(n) for n in corpus_sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"every corpus needs at least one sample, sizes {self.sizes}")
        self.shard_sizes = [np.asarray(s, np.int64) for s in shard_sizes]
        self.seed, self.algo, self.block = int(seed), shuffle_algo, int(shuffle_block_size)
        if weights is None:
            self.counts = list(self.sizes)
        else:
            self.counts = apportion(samples_per_epoch or sum(self.sizes), weights)
        self.length = sum(self.counts)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def fingerprint(self) -> dict:
        """What a checkpointed position means; a resume with another fingerprint is refused."""
        return {"sizes": self.sizes, "counts": self.counts, "seed": self.seed, "shuffle": self.algo,
                "block": self.block}

    def epoch_of(self, key: int) -> int:
        return int(key) // self.length

    def _perm(self, corpus: int, p: int) -> np.ndarray:
        if (corpus, p) not in self._perms:
            n = self.sizes[corpus]
            if self.algo == "none":
                perm = np.arange(n, dtype=np.int64)
            else:
                from streaming.base.shuffle import get_shuffle
                corpus_seed = int(np.random.SeedSequence([self.seed, corpus]).generate_state(1)[0] >> 1)
                # A block smaller than a shard would shuffle that shard only within itself.
                block = max(self.block, int(self.shard_sizes[corpus].max()))
                perm = get_shuffle(self.algo, self.shard_sizes[corpus], 1, corpus_seed, p, block)
            if len(self._perms) >= 4 * len(self.sizes):
                self._perms.pop(next(iter(self._perms)))
            self._perms[(corpus, p)] = np.asarray(perm, np.int64)
        return self._perms[(corpus, p)]

    def _table(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(corpus, sample index, pass) of every position of `epoch`, as arrays of length L."""
        if epoch in self._tables:
            return self._tables[epoch]
        counts = np.asarray(self.counts, np.int64)
        labels = np.repeat(np.arange(len(counts), dtype=np.int16), counts)
        if len(counts) > 1:
            labels = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(labels)
        order = np.argsort(labels, kind="stable")
        rank_in_corpus = np.empty(self.length, np.int64)
        rank_in_corpus[order] = np.arange(self.length) - np.repeat(np.cumsum(counts) - counts, counts)
        index = np.empty(self.length, np.int64)
        passes = np.empty(self.length, np.int64)
        for c, n_c in enumerate(self.counts):
            where = labels == c
            stream = epoch * n_c + rank_in_corpus[where]  # position in corpus c's own stream
            p, j = np.divmod(stream, self.sizes[c])
            idx = np.empty(len(stream), np.int64)
            for q in np.unique(p):
                sel = p == q
                idx[sel] = self._perm(c, int(q))[j[sel]]
            index[where], passes[where] = idx, p
        if len(self._tables) >= 2:
            self._tables.pop(min(self._tables))
        self._tables[epoch] = (labels.astype(np.int64), index, passes)
        return self._tables[epoch]

    def locate(self, keys: Sequence[int]) -> np.ndarray:
        """[len(keys), 3] int64 rows (corpus, sample index, pass) for global positions `keys`."""
        keys = np.asarray(keys, np.int64)
        out = np.empty((len(keys), 3), np.int64)
        epochs = keys // self.length
        for e in np.unique(epochs):
            sel = epochs == e
            corpus, index, passes = self._table(int(e))
            pos = keys[sel] - e * self.length
            out[sel] = np.stack([corpus[pos], index[pos], passes[pos]], axis=1)
        return out
