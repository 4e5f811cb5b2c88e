"""finevit.data: corpora, native-resolution preprocessing, packing and the resumable loader.

Imports are lazy (PEP 562): `import finevit.data.schema` stays cheap, and mosaicml-streaming
(seconds to import) loads only when a corpus is written or opened. See docs/data.md.
"""

import importlib

_EXPORTS = {
    "schema": ("SCHEMAS", "REGION_KINDS", "Limits", "RecordError", "validate_record", "check_region"),
    "corpus": ("Corpus", "CorpusError", "CorpusWriter", "open_corpus", "read_manifest", "MANIFEST"),
    "build": ("BuildOptions", "BuildSummary", "BuildError", "build_corpus"),
    "preprocess": ("PatchSpec", "Preprocessor", "Processed", "smart_resize", "patchify", "CLIP_MEAN", "CLIP_STD"),
    "packing": ("PackedBatch", "Packer", "Sample", "collate", "select_batch", "pad_to_largest_fraction"),
    "sampler": ("EpochPlan",),
    "state": ("Phase", "StateError", "reshard"),
    "loader": ("PackedLoader", "build_loader"),
    "tokenizer": ("CaptionTokenizer", "train_sentencepiece"),
    "demo": ("write_demo_corpus", "demo_record", "parse_caption"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"finevit.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'finevit.data' has no attribute {name!r}")
