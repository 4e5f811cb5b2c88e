"""Which stream positions each data-parallel rank reads, and how that survives a resume.

A *phase* deals positions of the global stream (finevit.data.sampler) to D ranks. Its virtual
sequence is V = pending + [start, start + 1, ...]; rank r's k-th read is V[r + k*D]. A run starts
in phase (D, pending=[], start=0): plain striding over the stream.

A rank's state is its phase, `read` (how many of its positions the packer has received) and
`buffer` (the k of the samples received but not yet put in a batch, in packer order). A position
is *consumed* once it is received and not buffered: it went into a yielded batch, or it was a bad
sample and was skipped.

Resume with the same D: rank r restores its own state, re-reads its buffered samples into the
packer in order, then reads on from k = read. The packer sees the same inputs in the same order,
so the batches are those of the uninterrupted run.

Resume with another D' (`reshard`): a new phase starts at the old one's frontier. With F the
smallest virtual position not consumed by any rank and M one past the largest one received,
pending' = the unconsumed positions among V[F : max(M, len(pending))], in order, and start' =
the stream position right after that range. Everything before F was consumed, everything from
the end of the range on was never read: each position of the stream is consumed exactly once,
whatever sequence of DP sizes the run goes through. Buffered (carry-over) samples are simply
unconsumed, so they are dealt out again.
"""

from dataclasses import asdict, dataclass, field

STATE_VERSION = 1


class StateError(ValueError):
    """Loader states that cannot be restored; one sentence."""


@dataclass
class Phase:
    dp_size: int
    pending: list = field(default_factory=list)  # stream positions dealt first, in order
    start: int = 0  # then positions start, start + 1, ...

    def position(self, v: int) -> int:
        n = len(self.pending)
        return self.pending[v] if v < n else self.start + (v - n)

    def rank_position(self, rank: int, k: int) -> int:
        return self.position(rank + k * self.dp_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Phase":
        return cls(int(d["dp_size"]), [int(p) for p in d["pending"]], int(d["start"]))


def check_states(states: list[dict]) -> Phase:
    """The common phase of a complete set of rank states (one per rank of its DP size)."""
    if not states:
        raise StateError("no loader states to restore from")
    versions = {s.get("version") for s in states}
    if versions != {STATE_VERSION}:
        raise StateError(f"loader state version {sorted(map(str, versions))} is not {STATE_VERSION}; it was saved by another finevit")
    phase = Phase.from_dict(states[0]["phase"])
    ranks = sorted(int(s["dp_rank"]) for s in states)
    if ranks != list(range(phase.dp_size)) or any(Phase.from_dict(s["phase"]) != phase for s in states):
        raise StateError(
            f"need the loader states of all {phase.dp_size} data-parallel ranks of one checkpoint, "
            f"got ranks {ranks}")
    return phase


def reshard(states: list[dict], dp_size: int) -> Phase:
    """The phase that continues, on `dp_size` ranks, where the ranks of `states` stopped."""
    phase = check_states(states)
    D = phase.dp_size
    read = [0] * D
    buffered: list[set] = [set() for _ in range(D)]
    for s in states:
        r = int(s["dp_rank"])
        read[r], buffered[r] = int(s["read"]), {int(k) for k in s["buffer"]}

    def consumed(v: int) -> bool:
        r, k = v % D, v // D
        return k < read[r] and k not in buffered[r]

    first_free = [min(min(buffered[r], default=read[r]), read[r]) * D + r for r in range(D)]
    lo = min(first_free)
    hi = max(max((read[r] - 1) * D + r + 1 for r in range(D)), len(phase.pending))
    pending = [phase.position(v) for v in range(lo, hi) if not consumed(v)]
    return Phase(dp_size, pending, phase.start + (hi - len(phase.pending)))
