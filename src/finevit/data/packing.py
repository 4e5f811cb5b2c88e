"""Token-budget packing of native-resolution images into fixed-size micro-batches.

Images arrive in stream order with h*w patch tokens each (and in stage 2 an LLM sequence each). The packer fills a lookahead buffer
until it holds at least `lookahead` samples and two budgets' worth of tokens (fewer leave nothing
to choose from); a micro-batch always takes the oldest buffered sample (so a sample waits at most
as many batches as there were samples ahead of it) and then the subset of the other buffered
samples that fills the remaining budget best (an exact subset sum in units of one merged token,
preferring older samples). Its choices depend only on the buffer and the incoming stream, so replaying the same
stream into the same buffer reproduces the same batches: the loader's resume relies on it.

With a second budget (stage 2: LLM tokens per row) the exact subset sum runs on the LLM tokens,
and when the chosen subset overflows the patch budget the batch is filled first-fit in stream
order under both instead (still a pure function of the buffer).

The packed batch is padded to exactly `max_tokens` rows (and `max_llm_tokens`) so pipeline-parallel
shapes are static.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class Sample:
    """One preprocessed image on its way from a worker to the packer (or a skipped bad one)."""

    key: int  # global stream position (see finevit.data.sampler)
    k: int  # index in this rank's read order (see finevit.data.state)
    id: str
    corpus: int
    pixel_values: Optional[torch.Tensor] = None  # [h*w, patch_dim] float32
    grid_thw: tuple = (1, 0, 0)
    caption: str = ""
    text_ids: Optional[torch.Tensor] = None  # [n] int64, already cut to data.max_text_len
    boxes: Optional[torch.Tensor] = None  # [r, 4] float32 in resized pixels
    region_texts: list = field(default_factory=list)
    region_kinds: list = field(default_factory=list)
    label: int = -1  # class index (classify corpora), -1 elsewhere
    llm_ids: Optional[torch.Tensor] = None  # [s] int64, stage 2's conversation (data/conversation.py)
    llm_labels: Optional[torch.Tensor] = None  # [s] int64, -100 off the answers
    tasks: list = field(default_factory=list)  # the conversation's turns' task names
    error: Optional[str] = None  # "reason: detail" for a sample skipped at read time

    @property
    def num_tokens(self) -> int:
        return self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2]

    @property
    def num_llm_tokens(self) -> int:
        return 0 if self.llm_ids is None else len(self.llm_ids)

    # Samples cross from DataLoader workers to the main process by pickle. Torch tensors would go
    # through shared memory with a file-descriptor handshake per tensor (~3 ms each, whatever the
    # size); numpy arrays travel as bytes in the pipe: about twice as fast for a small image, no
    # slower at 1K-4K patches (measured on 2 cores), and torch.from_numpy on arrival shares their
    # memory instead of copying.
    _TENSORS = ("pixel_values", "text_ids", "boxes", "llm_ids", "llm_labels")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._TENSORS:
            if isinstance(state[name], torch.Tensor):
                state[name] = state[name].numpy()
        return state

    def __setstate__(self, state: dict) -> None:
        for name in self._TENSORS:
            if isinstance(state[name], np.ndarray):
                state[name] = torch.from_numpy(state[name])
        self.__dict__.update(state)


@dataclass
class PackedBatch:
    """One packed micro-batch for the vision encoder (and, in stage 1, its captions).

    Shapes (N = max_tokens, n = images in the batch, D = C * T * patch * patch, 1176 by default):
      pixel_values  [N, D] float32; image i is rows cu_seqlens[i]:cu_seqlens[i+1] in Qwen2.5-VL
                    token order (see finevit.data.preprocess); rows >= cu_seqlens[-1] are zero
                    padding, which the model treats as one more segment of its own.
      grid_thw      [n, 3] int64, (t, h, w) in patches; h * w == cu_seqlens[i+1] - cu_seqlens[i].
      cu_seqlens    [n + 1] int32 over the real tokens: 0, then cumulative h * w.
      sample_keys   [n] int64 global stream positions; sample_ids the corpus ids (str).
      corpus        [n] int64 index of each image's corpus in data.corpora.
      text_ids      [n, L] int64 caption tokens padded with text_pad_id, L = longest in batch
                    (None without a tokenizer or captions: classify corpora); text_lengths [n].
      boxes         list of n float32 tensors [r_i, 4], region boxes (x0, y0, x1, y1) in the
                    resized image's pixels; region_texts / region_kinds the matching strings.
      labels        [n] int64 class index of each image (classify corpora), -1 elsewhere.
      llm_ids       stage 2: [L] int64, the samples' conversations back to back, padded with
                    llm_pad_id to L = max_llm_tokens; llm_labels [L] (-100 off the answers and on
                    padding); llm_cu_seqlens [n + 1] int32 sample bounds over the real tokens;
                    tasks[i] the task of each of sample i's turns. None in stage 1.
      skipped       (id, reason) of bad samples dropped since the previous batch of this rank.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    cu_seqlens: torch.Tensor
    sample_keys: torch.Tensor
    sample_ids: list
    corpus: torch.Tensor
    captions: list
    text_ids: Optional[torch.Tensor] = None
    text_lengths: Optional[torch.Tensor] = None
    text_pad_id: int = 0
    boxes: list = field(default_factory=list)
    region_texts: list = field(default_factory=list)
    region_kinds: list = field(default_factory=list)
    labels: Optional[torch.Tensor] = None  # [n] int64 class indices, -1 for unlabelled images
    skipped: list = field(default_factory=list)
    llm_ids: Optional[torch.Tensor] = None
    llm_labels: Optional[torch.Tensor] = None
    llm_cu_seqlens: Optional[torch.Tensor] = None
    tasks: list = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.cu_seqlens[-1])

    @property
    def max_tokens(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.max_tokens

    @property
    def num_llm_tokens(self) -> int:
        return 0 if self.llm_cu_seqlens is None else int(self.llm_cu_seqlens[-1])

    @property
    def num_answer_tokens(self) -> int:
        return 0 if self.llm_labels is None else int((self.llm_labels != -100).sum())

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) if self.num_images else 0


def select_batch(sizes: list[int], budget: int, unit: int = 4) -> list[int]:
    """Indices (ascending) of the samples for one batch: sizes[0] always, then the subset of the
    rest whose sum fills `budget - sizes[0]` best, preferring lower indices (older samples)."""
    if sizes[0] > budget:
        raise ValueError(f"a sample of {sizes[0]} tokens cannot fit a budget of {budget}")
    if any(s % unit for s in sizes) or budget % unit:
        unit = 1
    cap = (budget - sizes[0]) // unit
    items = [s // unit for s in sizes[1:]]
    # reach[i] has bit t set when some subset of items[:i] sums to t (Python ints as bitsets).
    mask = (1 << (cap + 1)) - 1
    reach = [1]
    for s in items:
        reach.append((reach[-1] | (reach[-1] << s)) & mask)
    best = reach[-1].bit_length() - 1
    chosen = []
    for i in range(len(items) - 1, -1, -1):
        if not (reach[i] >> best) & 1:  # best is unreachable without item i: take it
            chosen.append(i + 1)
            best -= items[i]
    return [0] + chosen[::-1]


def select_two_budgets(sizes: list[int], llm_sizes: list[int], budget: int, llm_budget: int,
                       unit: int = 4) -> list[int]:
    """Indices (ascending) for one batch under a patch budget and an LLM-token budget: the exact
    subset sum on LLM tokens when its choice fits the patches, else first-fit in stream order."""
    if sizes[0] > budget or llm_sizes[0] > llm_budget:
        raise ValueError(f"a sample of {sizes[0]} patches / {llm_sizes[0]} LLM tokens cannot fit budgets "
                         f"of {budget} / {llm_budget}")
    picked = select_batch(llm_sizes, llm_budget, unit=1)
    if sum(sizes[i] for i in picked) <= budget:
        return picked
    picked, used, llm_used = [0], sizes[0], llm_sizes[0]
    for i in range(1, len(sizes)):
        if used + sizes[i] <= budget and llm_used + llm_sizes[i] <= llm_budget:
            picked.append(i)
            used, llm_used = used + sizes[i], llm_used + llm_sizes[i]
    return picked


class Packer:
    """The lookahead buffer and its batch selection (state: the buffered samples, in order)."""

    def __init__(self, max_tokens: int, lookahead: int = 64, unit: int = 4, max_llm_tokens: Optional[int] = None):
        self.max_tokens, self.lookahead, self.unit = max_tokens, lookahead, unit
        self.max_llm_tokens = max_llm_tokens
        self.buffer: list[Sample] = []
        self.tokens = self.llm_tokens = 0  # in the buffer

    def __len__(self) -> int:
        return len(self.buffer)

    def full(self) -> bool:
        if len(self.buffer) < self.lookahead:
            return False
        if self.max_llm_tokens is not None and self.llm_tokens < 2 * self.max_llm_tokens:
            return False
        return self.tokens >= 2 * self.max_tokens or self.max_llm_tokens is not None

    def add(self, sample: Sample) -> None:
        if sample.num_tokens > self.max_tokens:
            raise ValueError(f"sample {sample.id} has {sample.num_tokens} tokens, more than max_tokens={self.max_tokens}")
        if self.max_llm_tokens is not None and sample.num_llm_tokens > self.max_llm_tokens:
            raise ValueError(f"sample {sample.id} has {sample.num_llm_tokens} LLM tokens, more than "
                             f"max_llm_tokens={self.max_llm_tokens}")
        self.buffer.append(sample)
        self.tokens += sample.num_tokens
        self.llm_tokens += sample.num_llm_tokens

    def pop(self) -> list[Sample]:
        sizes = [s.num_tokens for s in self.buffer]
        if self.max_llm_tokens is None:
            picked = select_batch(sizes, self.max_tokens, self.unit)
        else:
            picked = select_two_budgets(sizes, [s.num_llm_tokens for s in self.buffer], self.max_tokens,
                                        self.max_llm_tokens, self.unit)
        taken = set(picked)
        batch = [self.buffer[i] for i in picked]
        self.buffer = [s for i, s in enumerate(self.buffer) if i not in taken]
        self.tokens -= sum(s.num_tokens for s in batch)
        self.llm_tokens -= sum(s.num_llm_tokens for s in batch)
        return batch

    def pop_all(self) -> list[Sample]:
        """Empty the buffer, oldest first (for re-reading under new preprocessing)."""
        batch, self.buffer, self.tokens, self.llm_tokens = self.buffer, [], 0, 0
        return batch


def _collate_llm(samples: list[Sample], max_llm_tokens: int, pad_id: int) -> dict:
    """Stage 2's row: the conversations back to back, padded (labels -100 on padding)."""
    lengths = [s.num_llm_tokens for s in samples]
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    ids = torch.full((max_llm_tokens,), pad_id, dtype=torch.int64)
    labels = torch.full((max_llm_tokens,), -100, dtype=torch.int64)
    real = int(cu[-1])
    if samples:
        torch.cat([s.llm_ids for s in samples], out=ids[:real])
        torch.cat([s.llm_labels for s in samples], out=labels[:real])
    return {"llm_ids": ids, "llm_labels": labels, "llm_cu_seqlens": cu, "tasks": [s.tasks for s in samples]}


def collate(samples: list[Sample], max_tokens: int, patch_dim: int, max_text_len: Optional[int] = None,
            text_pad_id: int = 0, skipped: Optional[list] = None, max_llm_tokens: Optional[int] = None,
            llm_pad_id: int = 0) -> PackedBatch:
    """Concatenate samples into one PackedBatch padded to max_tokens rows (and, with
    max_llm_tokens, their conversations into one LLM row of that length)."""
    lengths = [s.num_tokens for s in samples]
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    # empty + explicit zero tail: every row is written once (zeros() then cat would write twice).
    pixel_values = torch.empty(max_tokens, patch_dim, dtype=torch.float32)
    real = int(cu[-1])
    if samples:
        torch.cat([s.pixel_values for s in samples], out=pixel_values[:real])
    pixel_values[real:].zero_()
    text_ids = text_lengths = None
    if samples and all(s.text_ids is not None for s in samples):
        ids = [s.text_ids[:max_text_len] if max_text_len else s.text_ids for s in samples]
        text_lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)
        text_ids = torch.full((len(ids), max(1, int(text_lengths.max()))), text_pad_id, dtype=torch.int64)
        for row, t in zip(text_ids, ids):
            row[: len(t)] = t
    return PackedBatch(
        pixel_values=pixel_values,
        grid_thw=torch.tensor([list(s.grid_thw) for s in samples], dtype=torch.int64).reshape(-1, 3),
        cu_seqlens=cu,
        sample_keys=torch.tensor([s.key for s in samples], dtype=torch.int64),
        sample_ids=[s.id for s in samples],
        corpus=torch.tensor([s.corpus for s in samples], dtype=torch.int64),
        captions=[s.caption for s in samples],
        text_ids=text_ids, text_lengths=text_lengths, text_pad_id=text_pad_id,
        boxes=[s.boxes if s.boxes is not None else torch.zeros(0, 4) for s in samples],
        region_texts=[s.region_texts for s in samples],
        region_kinds=[s.region_kinds for s in samples],
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        skipped=list(skipped or []),
        **(_collate_llm(samples, max_llm_tokens, llm_pad_id) if max_llm_tokens is not None else {}),
    )


def pad_to_largest_fraction(token_counts: list[int], batch_images: int) -> float:
    """Padding fraction of the naive alternative: fixed-size batches padded to their largest
    image (the comparison bench/data_loader.py prints next to the packer's)."""
    real = padded = 0
    for i in range(0, len(token_counts), batch_images):
        chunk = token_counts[i:i + batch_images]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1.0 - real / padded if padded else 0.0
