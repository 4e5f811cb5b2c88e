"""Corpus statistics: sizes, resolutions, vision-token counts, caption lengths, regions per kind.

Token counts are those the loader would produce (smart resize into [min_pixels, max_pixels]),
computed from the stored width / height columns: no image is decoded.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from finevit.data.preprocess import PatchSpec, smart_resize
from finevit.data.schema import REGION_KINDS, RecordError


@dataclass
class CorpusStats:
    name: str
    schema: str
    samples: int = 0
    widths: list = field(default_factory=list)
    heights: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # vision patches per image after smart resize
    caption_chars: list = field(default_factory=list)  # every caption (recaption) / global caption
    captions_per_sample: list = field(default_factory=list)
    regions: Counter = field(default_factory=Counter)  # kind -> count
    regions_per_image: list = field(default_factory=list)
    unreadable: int = 0  # rows whose size cannot be resized (aspect ratio > 200)


def corpus_stats(corpus, spec: PatchSpec = PatchSpec(), min_pixels: int = 336 * 336,
                 max_pixels: int = 448 * 448, limit: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None) -> CorpusStats:
    st = CorpusStats(corpus.name, corpus.schema)
    n = len(corpus) if limit is None else min(limit, len(corpus))
    for i in range(n):
        row = corpus[i]
        st.samples += 1
        w, h = int(row["width"]), int(row["height"])
        st.widths.append(w)
        st.heights.append(h)
        try:
            rh, rw = smart_resize(h, w, spec.factor, min_pixels, max_pixels)
            st.tokens.append(rh * rw // spec.patch_size ** 2)
        except RecordError:
            st.unreadable += 1
        if corpus.schema == "recaption":
            st.caption_chars += [len(c) for c in row["captions"]]
            st.captions_per_sample.append(len(row["captions"]))
        else:
            st.caption_chars.append(len(row["global_caption"]))
            st.captions_per_sample.append(1)
            st.regions.update(r["kind"] for r in row["regions"])
            st.regions_per_image.append(len(row["regions"]))
        if progress:
            progress(1)
    return st


def _summary(values: Sequence[float]) -> str:
    if not len(values):
        return "-"
    v = np.asarray(values, np.float64)
    return f"{v.mean():.0f} ({np.percentile(v, 5):.0f}-{np.percentile(v, 95):.0f})"


def format_table(stats: Sequence[CorpusStats]) -> str:
    """One column per corpus; cells are mean (5th-95th percentile)."""
    rows = [("corpus", [s.name for s in stats]), ("schema", [s.schema for s in stats]),
            ("samples", [str(s.samples) for s in stats]),
            ("width px", [_summary(s.widths) for s in stats]),
            ("height px", [_summary(s.heights) for s in stats]),
            ("vision tokens", [_summary(s.tokens) for s in stats]),
            ("total tokens", [str(int(np.sum(s.tokens))) for s in stats]),
            ("captions/sample", [_summary(s.captions_per_sample) for s in stats]),
            ("caption chars", [_summary(s.caption_chars) for s in stats])]
    rows += [(f"regions {k}", [str(s.regions.get(k, 0)) if s.schema == "finecap" else "-" for s in stats])
             for k in REGION_KINDS]
    rows.append(("regions/image", [_summary(s.regions_per_image) for s in stats]))
    if any(s.unreadable for s in stats):
        rows.append(("unresizable", [str(s.unreadable) for s in stats]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][j]) for r in rows) for j in range(len(stats))]
    return "\n".join(f"{name:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cols))
                     for name, cells in rows)


def plot(stats: Sequence[CorpusStats], path: str) -> None:
    """Histograms of resolution (megapixels), tokens, caption length and regions per image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("megapixels", lambda s: np.asarray(s.widths) * np.asarray(s.heights) / 1e6),
              ("vision tokens / image", lambda s: s.tokens),
              ("caption characters", lambda s: s.caption_chars),
              ("regions / image", lambda s: s.regions_per_image)]
    for ax, (title, get) in zip(axes, panels):
        for s in stats:
            values = np.asarray(get(s), np.float64)
            if len(values):
                ax.hist(values, bins=30, alpha=0.6, label=s.name)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
