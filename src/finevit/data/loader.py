"""The data loader: mixed corpora -> native-resolution images -> packed micro-batches, resumable.

Per data-parallel rank:

    sampler.EpochPlan   stream position g -> (corpus, sample index, pass); a pure function of the
                        seed and the corpus sizes, identical on every rank
    state.Phase         which positions this rank reads, in order (its k-th read)
    _Requests           those positions as requests, looked up a chunk at a time
    _Reader (workers)   request -> row (Corpus, i.e. a StreamingDataset's shard cache) -> checks ->
                        decode, resize, normalise, patchify, tokenise -> packing.Sample; in
                        stage 2 also the conversation (ids + labels, data/conversation.py)
    torch DataLoader    worker processes and prefetch; results arrive in request order, so the
                        stream does not depend on the number of workers
    packing.Packer      (main process) lookahead buffer -> token-budget batch (patches, and in
                        stage 2 LLM tokens) -> PackedBatch

`state_dict()` is a plain dict (phase, `read`, the buffered samples' k, counters); `load_state_dict`
takes the states of all ranks of a checkpoint and resumes exactly (same DP size) or reshards (other
DP size). state.py states the guarantee.

The DP rank and size are arguments, never inferred: tensor- and pipeline-parallel ranks of one
replica build the loader with the same DP rank and get identical batches. mosaicml-streaming still
reads the launcher's RANK / LOCAL_RANK / LOCAL_WORLD_SIZE, but only to share its shard cache and
shared memory among the processes of a node; it never decides which rank reads what.

A sample that cannot be read (undecodable image, bad box, missing caption, I/O error) is skipped,
counted by reason and logged with its id; it still counts as consumed, so ranks never disagree
about positions and every rank always yields its next batch. Skipping has a budget
(data.bad_samples): when too many recent samples fail, or every one since the start, the loader
raises BadSampleBudget with the reasons and counts instead of reading on.
"""

import logging
from collections import Counter, deque
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finevit.config.data import BadSampleConfig, DataConfig
from finevit.data.conversation import ConversationEncoder
from finevit.data.corpus import Corpus, open_corpus
from finevit.data.node_lock import node_exclusive
from finevit.data.packing import PackedBatch, Packer, Sample, collate
from finevit.data.preprocess import PatchSpec, Preprocessor
from finevit.data.sampler import EpochPlan
from finevit.data.schema import Limits, RecordError, check_label, check_region
from finevit.data.state import STATE_VERSION, Phase, StateError, check_states, reshard
from finevit.data.tokenizer import CaptionTokenizer

log = logging.getLogger("finevit.data")


class BadSampleBudget(RuntimeError):
    """Too many samples of this rank could not be used (data.bad_samples); one sentence."""


class _SkipBudget:
    """The bad-sample budget of one rank since the loader started (see BadSampleConfig)."""

    def __init__(self, cfg: BadSampleConfig, dp_rank: int):
        self.cfg, self.dp_rank = cfg, dp_rank
        self.recent: deque = deque(maxlen=cfg.window)  # reason, or None for a good sample
        self.seen = self.good = 0
        self.last_error = ""

    def record(self, sample_id: str, error: Optional[str]) -> None:
        self.seen += 1
        self.good += error is None
        self.recent.append(None if error is None else error.split(":", 1)[0])
        if error is not None:
            self.last_error = f"{sample_id}: {error}"
            self._check()

    def _check(self) -> None:
        cfg = self.cfg
        if 0 < cfg.first == self.seen and self.good == 0:
            self._fail(f"all of the first {self.seen} samples", list(self.recent), "first")
        bad = [r for r in self.recent if r is not None]
        if len(self.recent) == cfg.window and len(bad) > cfg.max_fraction * cfg.window:
            self._fail(f"{len(bad)} of the last {cfg.window} samples", bad, "max_fraction")

    def _fail(self, what: str, reasons: list, knob: str) -> None:
        counts = ", ".join(f"{r} {n}" for r, n in Counter(reasons).most_common())
        raise BadSampleBudget(
            f"{what} on data-parallel rank {self.dp_rank} could not be used ({counts}; last: "
            f"{self.last_error}); fix the corpus or the paths, or change data.bad_samples.{knob}")


class _Reader(Dataset):
    """Request (key, k, corpus, index, pass) -> Sample. Runs inside DataLoader workers."""

    def __init__(self, corpora: Sequence[Corpus], preprocessor: Preprocessor, seed: int,
                 tokenizer: Optional[CaptionTokenizer], max_text_len: int, limits: Limits,
                 encoder: Optional[ConversationEncoder] = None):
        self.corpora, self.preprocessor, self.seed = list(corpora), preprocessor, seed
        self.tokenizer, self.max_text_len, self.limits = tokenizer, max_text_len, limits
        self.encoder = encoder

    def __getitem__(self, request: tuple) -> Sample:
        key, k, c, index, p = request
        rid = f"{self.corpora[c].name}[{index}]"
        try:
            row = self.corpora[c][index]
            rid = str(row.get("id", rid))
            return self._process(row, Sample(key, k, rid, c), index, p)
        except RecordError as e:
            error = f"{e.reason}: {e}"
        except Exception as e:  # noqa: BLE001 - one unreadable sample must not stop a rank
            error = f"read_error: {type(e).__name__}: {e}"
        return Sample(key, k, rid, c, error=error)

    def _process(self, row: dict, out: Sample, index: int, p: int) -> Sample:
        # One generator per (sample, pass): caption choice and augmentation are reproducible
        # on resume and differ from pass to pass.
        rng = np.random.default_rng([self.seed, out.corpus, index, p])
        corpus = self.corpora[out.corpus]
        if corpus.schema == "recaption":
            caps = [c for c in row.get("captions") or [] if isinstance(c, str) and c.strip()]
            if not caps:
                raise RecordError("missing_caption", "no caption")
            out.caption, regions = caps[int(rng.integers(len(caps)))], []
        elif corpus.schema == "classify":  # an image and its class: nothing to tokenise
            out.label, regions = check_label(row.get("label"), len(corpus.manifest["classes"])), []
        else:
            out.caption = row.get("global_caption") or ""
            if not out.caption.strip():
                raise RecordError("missing_caption", "no global caption")
            regions = [check_region(r, row["width"], row["height"], self.limits, f"regions[{i}]")
                       for i, r in enumerate(row.get("regions") or [])]
        boxes = np.array([r["box"] for r in regions], np.float32).reshape(-1, 4)
        img = self.preprocessor(row["image"], boxes, rng, expect_size=(row["width"], row["height"]))
        out.pixel_values, out.grid_thw, out.boxes = img.pixel_values, img.grid_thw, img.boxes
        out.region_texts = [r["text"] for r in regions]
        out.region_kinds = [r["kind"] for r in regions]
        if self.tokenizer is not None and out.caption:
            out.text_ids = self.tokenizer.encode(out.caption, self.max_text_len)
        if self.encoder is not None:
            ids, labels, turns = self.encoder(out, rng)
            out.llm_ids, out.llm_labels = torch.from_numpy(ids), torch.from_numpy(labels)
            out.tasks = [t.task for t in turns]
        return out


class _Requests(Sampler):
    """This rank's requests: first the restored buffer's k (in order), then k = start, start + 1..."""

    def __init__(self, plan: EpochPlan, phase: Phase, rank: int, carry: Sequence[int], start: int,
                 limit: Optional[int], chunk: int = 256):
        self.plan, self.phase, self.rank, self.carry = plan, phase, rank, list(carry)
        self.start, self.limit, self.chunk = start, limit, chunk

    def _requests(self, ks: list[int]) -> list[tuple]:
        keys = [self.phase.rank_position(self.rank, k) for k in ks]
        if self.limit is not None:
            ks, keys = [k for k, g in zip(ks, keys) if g < self.limit], [g for g in keys if g < self.limit]
        where = self.plan.locate(keys)
        return [(g, k, int(c), int(i), int(p)) for g, k, (c, i, p) in zip(keys, ks, where)]

    def __iter__(self) -> Iterator[tuple]:
        yield from self._requests(self.carry)
        k = self.start
        while True:
            ks = list(range(k, k + self.chunk))
            yield from self._requests(ks)
            k += self.chunk
            past_pending = self.rank + k * self.phase.dp_size >= len(self.phase.pending)
            if self.limit is not None and past_pending and self.phase.rank_position(self.rank, k) >= self.limit:
                return


def _identity(x):
    return x


class PackedLoader:
    """Endless (or `epochs`-long) iterator of PackedBatch for one data-parallel rank."""

    def __init__(self, corpora: Sequence[Corpus], cfg: DataConfig, spec: PatchSpec = PatchSpec(),
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 weights: Optional[Sequence[float]] = None, epochs: Optional[int] = None,
                 limits: Optional[Limits] = None, owns_corpora: bool = False,
                 encoder: Optional[ConversationEncoder] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        self.corpora, self.cfg, self.spec = list(corpora), cfg, spec
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self._owns_corpora = owns_corpora
        self.plan = EpochPlan([len(c) for c in self.corpora], [c.shard_sizes for c in self.corpora],
                              weights, cfg.samples_per_epoch, seed, cfg.shuffle_algo, cfg.shuffle_block_size)
        self.limit = epochs * self.plan.length if epochs else None
        self.tokenizer = CaptionTokenizer(cfg.tokenizer) if cfg.tokenizer else None
        pre = Preprocessor(spec, cfg.min_pixels, cfg.max_pixels, cfg.jpeg_draft, cfg.augment)
        self.reader = _Reader(self.corpora, pre, seed, self.tokenizer, cfg.max_text_len, limits or Limits(), encoder)
        self.max_llm_tokens = encoder.cfg.max_tokens if encoder is not None else None
        self.llm_pad_id = encoder.tok.pad_id if encoder is not None else 0
        self.max_text_len = cfg.max_text_len
        self._restore(Phase(dp_size), read=0, carry=[], counters={})

    # ------------------------------------------------------------------ iteration

    def _restore(self, phase: Phase, read: int, carry: list, counters: dict) -> None:
        self.close_workers()
        self.phase, self.read = phase, read
        self.packer = Packer(self.cfg.max_tokens, self.cfg.pack_lookahead, self.spec.merge_unit, self.max_llm_tokens)
        self._carry = deque(carry)  # buffered k still to be re-read into the packer
        self.skipped = Counter(counters.get("skipped", {}))
        self.batches = int(counters.get("batches", 0))
        self.images = int(counters.get("images", 0))
        self.tokens = int(counters.get("tokens", 0))
        self._new_skips: list = []
        self._budget = _SkipBudget(self.cfg.bad_samples, self.dp_rank)
        self._it, self._exhausted = None, False

    def _start(self) -> Iterator[Sample]:
        if self.limit is not None:  # a finite run never requests positions past its end
            self._carry = deque(k for k in self._carry
                                if self.phase.rank_position(self.dp_rank, k) < self.limit)
        requests = _Requests(self.plan, self.phase, self.dp_rank, list(self._carry), self.read, self.limit)
        n = self.cfg.num_workers
        loader = DataLoader(self.reader, batch_size=None, sampler=requests, num_workers=n,
                            collate_fn=_identity, prefetch_factor=self.cfg.prefetch_factor if n else None,
                            # fork: workers inherit the opened corpora; spawn would re-import
                            # streaming (seconds) and re-attach its shared memory per worker.
                            multiprocessing_context="fork" if n else None)
        return iter(loader)

    def _receive(self) -> None:
        try:
            s = next(self._it)
        except StopIteration:
            self._exhausted = True
            return
        if self._carry and s.k == self._carry[0]:
            self._carry.popleft()
        else:
            self.read = s.k + 1
        if s.error is None and s.num_tokens > self.cfg.max_tokens:
            s.error = f"too_many_tokens: {s.num_tokens} tokens exceed data.max_tokens={self.cfg.max_tokens}"
        if s.error is None:
            self._budget.record(s.id, None)
            self.packer.add(s)
            return
        reason = s.error.split(":", 1)[0]
        self.skipped[reason] += 1
        self._new_skips.append((s.id, reason))
        log.warning("skipped sample %s (corpus %s, position %d): %s", s.id, self.corpora[s.corpus].name, s.key, s.error)
        self._budget.record(s.id, s.error)  # may raise BadSampleBudget

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> PackedBatch:
        if self._it is None:
            self._it = self._start()
        while self._carry and not self._exhausted:  # restore the buffer before packing anything
            self._receive()
        while not self.packer.full() and not self._exhausted:
            self._receive()
        if not len(self.packer):
            raise StopIteration
        samples = self.packer.pop()
        batch = collate(samples, self.cfg.max_tokens, self.spec.patch_dim, self.max_text_len,
                        self.tokenizer.pad_id if self.tokenizer else 0, self._new_skips,
                        self.max_llm_tokens, self.llm_pad_id)
        self._new_skips = []
        self.batches += 1
        self.images += batch.num_images
        self.tokens += batch.num_tokens
        return batch

    def set_pixel_budget(self, min_pixels: int, max_pixels: int) -> None:
        """Resize images into [min_pixels, max_pixels] from the next batch on (a schedule phase).

        Buffered samples were preprocessed at the old budget, so they go back to be re-read,
        in order, before anything new: the batches after the switch depend only on the stream
        and the new budget, which is what makes a resume across the switch exact.
        """
        pre = self.reader.preprocessor
        if (pre.min_pixels, pre.max_pixels) == (int(min_pixels), int(max_pixels)):
            return
        pre.min_pixels, pre.max_pixels = int(min_pixels), int(max_pixels)
        requeue = [s.k for s in self.packer.pop_all()] + list(self._carry)
        self.close_workers()  # workers hold a copy of the old preprocessor and prefetched samples
        self._carry = deque(requeue)
        self._exhausted = False

    @property
    def pixel_budget(self) -> tuple[int, int]:
        return self.reader.preprocessor.min_pixels, self.reader.preprocessor.max_pixels

    def set_max_text_len(self, n: int) -> None:
        """Caption tokens kept from the next batch on (at most data.max_text_len, what workers keep)."""
        self.max_text_len = max(1, min(int(n), self.cfg.max_text_len))

    @property
    def epoch(self) -> int:
        """Epoch of this rank's next unread position."""
        return self.plan.epoch_of(self.phase.rank_position(self.dp_rank, self.read))

    @property
    def padding_fraction(self) -> float:
        """Padding over all batches this rank yielded since the start of the run."""
        return 1.0 - self.tokens / (self.batches * self.cfg.max_tokens) if self.batches else 0.0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
            "fingerprint": self.plan.fingerprint(), "phase": self.phase.to_dict(), "read": self.read,
            "buffer": [s.k for s in self.packer.buffer] + list(self._carry),
            "max_text_len": self.max_text_len, "pixel_budget": list(self.pixel_budget),
            "counters": {"skipped": dict(self.skipped), "batches": self.batches, "images": self.images,
                         "tokens": self.tokens},
        }

    def load_state_dict(self, states: Union[dict, Sequence[dict]]) -> None:
        """Resume from this rank's state (same DP size) or from all ranks' states (any DP size)."""
        states = [states] if isinstance(states, dict) else list(states)
        if not states:
            raise StateError("no loader states to restore from")
        for s in states:
            if s.get("fingerprint") != self.plan.fingerprint():
                raise StateError(
                    f"the data stream differs from the checkpoint's (saved {s.get('fingerprint')}, now "
                    f"{self.plan.fingerprint()}): corpora, weights, seed or shuffle changed, so the "
                    "position cannot be carried over")
        self.max_text_len = int(states[0].get("max_text_len", self.cfg.max_text_len))
        budget = states[0].get("pixel_budget", [self.cfg.min_pixels, self.cfg.max_pixels])
        self.reader.preprocessor.min_pixels, self.reader.preprocessor.max_pixels = map(int, budget)
        own = [s for s in states if int(s["dp_rank"]) == self.dp_rank and int(s["dp_size"]) == self.dp_size]
        if own and all(int(s["dp_size"]) == self.dp_size for s in states):
            s = own[0]
            self._restore(Phase.from_dict(s["phase"]), int(s["read"]), [int(k) for k in s["buffer"]], s["counters"])
            return
        check_states(states)
        totals: dict = {"skipped": Counter()}
        if self.dp_rank == 0:  # keep run totals once, on rank 0
            for s in states:
                totals["skipped"].update(s["counters"]["skipped"])
                for key in ("batches", "images", "tokens"):
                    totals[key] = totals.get(key, 0) + s["counters"][key]
        self._restore(reshard(states, self.dp_size), read=0, carry=[], counters=totals)

    # ------------------------------------------------------------------ lifetime

    def close_workers(self) -> None:
        it = getattr(self, "_it", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._it = None

    def close(self) -> None:
        self.close_workers()
        if self._owns_corpora:
            for c in self.corpora:
                c.close()

    def __enter__(self) -> "PackedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_loader(cfg: DataConfig, spec: PatchSpec = PatchSpec(), dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, epochs: Optional[int] = None,
                 encoder: Optional[ConversationEncoder] = None) -> PackedLoader:
    """Open cfg.corpora and build this rank's loader (which closes them on close()); `encoder`
    turns each sample into an LLM conversation (stage 2)."""
    if not cfg.corpora:
        raise ValueError("data.corpora is empty: name at least one corpus directory")
    weighted = [c.weight is not None for c in cfg.corpora]
    if any(weighted) and not all(weighted):
        raise ValueError("data.corpora must give a weight to every corpus or to none")
    corpora = []
    try:
        with node_exclusive():  # another job on this node may be opening corpora now
            for c in cfg.corpora:
                corpora.append(open_corpus(c.path, cache=c.cache, name=c.name))
    except Exception:
        for c in corpora:
            c.close()
        raise
    weights = [c.weight for c in cfg.corpora] if all(weighted) else None
    return PackedLoader(corpora, cfg, spec, dp_rank, dp_size, seed, weights, epochs, owns_corpora=True,
                        encoder=encoder)
