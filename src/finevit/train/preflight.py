"""Every file a config names, checked before any process group starts: one sentence per problem.

A wrong path must cost seconds, not a job: a missing tokenizer used to make every sample a bad
sample and the run loop over its corpus forever; a directory that is not a checkpoint ended in a
traceback from deep inside a load. What is checked here: the training and evaluation corpora
(their manifests), data.tokenizer (loads as a sentencepiece model), model.llm.init_from (a Hugging
Face Qwen2 / Qwen3 directory of the configured shape), checkpoint.load (a complete finevit
checkpoint whose files unpickle no code), then whatever the task names (its `preflight`:
init_from directories, what its data must be).
"""

from finevit.checkpointing import files
from finevit.convert.qwen2 import ConversionError, check_hf_llm_dir
from finevit.data.corpus import CorpusError, read_manifest
from finevit.data.tokenizer import TokenizerError, check_tokenizer


class InputError(ValueError):
    """Inputs a run cannot start with; `problems` holds one sentence each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _corpus_problems(corpora: list, key: str) -> list[str]:
    out = []
    for c in corpora:
        try:
            read_manifest(c.path, c.cache)
        except CorpusError as e:
            out.append(f"{key}: {e}")
    return out


def check_inputs(cfg, task) -> None:
    """InputError listing every unusable input of `cfg` (and of `task`, when it has a preflight)."""
    problems = _corpus_problems(cfg.data.corpora, "data.corpora") + _corpus_problems(cfg.eval.corpora, "eval.corpora")
    if cfg.data.tokenizer:
        try:
            check_tokenizer(cfg.data.tokenizer)
        except TokenizerError as e:
            problems.append(str(e))
    if cfg.model.llm is not None and cfg.model.llm.init_from:
        try:
            check_hf_llm_dir(cfg.model.llm.init_from, cfg.model.llm)
        except ConversionError as e:
            problems.append(str(e))
    if cfg.checkpoint.load:
        try:
            step = files.resolve(cfg.checkpoint.load)
            files.verify_loadable(step)
            files.read_state(step)
        except files.CheckpointError as e:
            problems.append(str(e))
    if not problems and hasattr(task, "preflight"):  # task checks may rely on readable inputs
        problems += task.preflight()
    if problems:
        raise InputError(problems)
