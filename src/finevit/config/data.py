"""Data configuration: corpora, native-resolution preprocessing and packing.

The runtime that reads these fields lives in `finevit.data` (see docs/data.md).
"""

from dataclasses import dataclass, field
from typing import Optional

SHUFFLE_ALGOS = ("py1e", "py1br", "py1s", "py2s", "naive", "none")


@dataclass
class CorpusConfig:
    """One corpus directory (built by data_tools/build_shards.py or make_demo_corpus.py)."""

    # A local directory, or an object-store URL (s3://, gs://, oci://, ...) whose shards are
    # cached under `cache`.
    path: str = ""
    cache: Optional[str] = None  # local cache directory for a remote `path`
    # Relative share of the epoch's samples. When every corpus leaves it unset, an epoch is each
    # corpus exactly once; when set, corpora are sampled by weight (oversampled corpora repeat,
    # undersampled ones continue where the previous epoch stopped).
    weight: Optional[float] = None
    name: Optional[str] = None  # label in logs and stats; default: the directory name


@dataclass
class AugmentConfig:
    """Augmentations that keep region boxes consistent with the pixels (all off by default)."""

    # Mirror left-right. Boxes are mirrored too, but rendered text and words such as "left" in a
    # caption are not, so keep it off for OCR and position-aware captions.
    hflip_prob: float = 0.0
    # Draw the image's pixel budget log-uniformly from [min_pixels, max_pixels] instead of using
    # its natural size (clamped to the range): a resolution curriculum within one run.
    scale_jitter: bool = False


@dataclass
class BadSampleConfig:
    """When skipping unreadable samples means the data, not a sample, is broken: the run stops
    with the reasons instead of looping over a corpus it cannot read. Counted per data-parallel
    rank, from the start of each launch."""

    window: int = 1000  # recent samples the failure share is measured over
    # Stop when more than this share of the last `window` samples failed (1.0: never).
    max_fraction: float = 0.25
    # Stop when each of the first `first` samples failed (0: never), long before a full window.
    first: int = 50


# The five FineCap tasks a finecap record is cast into (data/conversation.py), with the kind of
# region each needs: "caption" the global caption; the others one region of a kind.
CONVERSATION_TASKS = ("caption", "box_to_text", "text_to_box", "box_to_ocr", "ocr_to_box")
BOX_FORMATS = ("absolute", "norm1000")


@dataclass
class LLMDataConfig:
    """Stage 2's sequences: images and conversations in the LLM's chat template, packed."""

    # A Hugging Face tokenizer directory (AutoTokenizer): the LLM's own. Default: model.llm.init_from.
    tokenizer: Optional[str] = None
    # LLM tokens of one packed row (image tokens after the 2x2 merge + text); rows are padded to
    # it so pipeline shapes are static. data.max_tokens still bounds the row's ViT patches.
    max_tokens: int = 4096
    # Relative weights of the five tasks (data/conversation.py). A task a record has no material
    # for (no OCR line, say) is left out of that record's draw.
    tasks: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in CONVERSATION_TASKS})
    # Region turns per sample after the first (several regions of one image, the image encoded once).
    max_turns: int = 6
    # absolute: pixel coordinates on the resized image, Qwen2.5-VL's convention; norm1000: 0..1000
    # of the image's width and height (Qwen2-VL's, Qwen3-VL's).
    box_format: str = "absolute"
    system_prompt: Optional[str] = None

    def problems(self) -> list[str]:
        out = []
        if self.max_tokens < 1:
            out.append(f"data.llm.max_tokens={self.max_tokens} must be a positive integer")
        if self.max_turns < 0:
            out.append(f"data.llm.max_turns={self.max_turns} must not be negative")
        unknown = [t for t in self.tasks if t not in CONVERSATION_TASKS]
        if unknown:
            out.append(f"data.llm.tasks names {', '.join(unknown)}, not one of {', '.join(CONVERSATION_TASKS)}")
        if any(not w >= 0 for w in self.tasks.values()) or not sum(self.tasks.values()) > 0:
            out.append(f"data.llm.tasks={self.tasks} must be non-negative weights, not all zero")
        if self.box_format not in BOX_FORMATS:
            out.append(f"data.llm.box_format='{self.box_format}' is not one of {', '.join(BOX_FORMATS)}")
        return out


@dataclass
class DataConfig:
    corpora: list[CorpusConfig] = field(default_factory=list)
    # Samples per epoch when corpora carry weights; default: the sum of the corpus sizes.
    samples_per_epoch: Optional[int] = None
    # Token budget of one packed micro-batch (vision patches, before the 2x2 merge). Packed
    # sequences are padded up to it so pipeline-parallel shapes stay static.
    max_tokens: int = 16384
    min_pixels: int = 336 * 336
    max_pixels: int = 448 * 448
    num_workers: int = 2
    prefetch_factor: int = 8  # samples each worker keeps ready
    # Samples the packer looks ahead over to fill a micro-batch; larger packs tighter, delays more.
    pack_lookahead: int = 64
    shuffle_algo: str = "py1e"  # mosaicml-streaming's shard-aware shuffles, or "none"
    shuffle_block_size: int = 1 << 18
    # Decode JPEGs at a reduced scale (1/2, 1/4, 1/8) when the target is that much smaller: much
    # faster for large sources, pixels differ slightly from a full decode followed by a resize.
    jpeg_draft: bool = True
    tokenizer: Optional[str] = None  # sentencepiece .model for the captions (stage 1)
    max_text_len: int = 256  # caption tokens kept per image (phases may use fewer)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    bad_samples: BadSampleConfig = field(default_factory=BadSampleConfig)
    llm: Optional[LLMDataConfig] = None  # stage 2's LLM sequences (unset in stage 1)

    def problems(self) -> list[str]:
        """One sentence per invalid data setting (called from config.validate)."""
        out = []
        for i, c in enumerate(self.corpora):
            if not c.path:
                out.append(f"data.corpora[{i}].path is empty")
            if c.weight is not None and not c.weight > 0:
                out.append(f"data.corpora[{i}].weight={c.weight} must be positive (or null)")
        weighted = [c.weight is not None for c in self.corpora]
        if any(weighted) and not all(weighted):
            out.append("data.corpora must give a weight to every corpus or to none")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            out.append(f"data.samples_per_epoch={self.samples_per_epoch} must be positive")
        for key in ("num_workers",):
            if getattr(self, key) < 0:
                out.append(f"data.{key}={getattr(self, key)} must not be negative")
        for key in ("prefetch_factor", "pack_lookahead", "shuffle_block_size", "max_text_len"):
            if getattr(self, key) < 1:
                out.append(f"data.{key}={getattr(self, key)} must be a positive integer")
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            out.append(f"data.shuffle_algo='{self.shuffle_algo}' is not one of {', '.join(SHUFFLE_ALGOS)}")
        bad = self.bad_samples
        if bad.window < 1:
            out.append(f"data.bad_samples.window={bad.window} must be a positive integer")
        if not 0.0 < bad.max_fraction <= 1.0:
            out.append(f"data.bad_samples.max_fraction={bad.max_fraction} must lie in (0, 1]")
        if bad.first < 0:
            out.append(f"data.bad_samples.first={bad.first} must not be negative (0 turns the check off)")
        if not 0.0 <= self.augment.hflip_prob <= 1.0:
            out.append(f"data.augment.hflip_prob={self.augment.hflip_prob} must lie in [0, 1]")
        return out + (self.llm.problems() if self.llm is not None else [])
