"""Fixtures for the data tests: one small demo corpus per session, opened corpora that release
their streaming shared memory, and a small-image data config so loader tests stay fast."""

import os

import pytest

from finevit.config.data import DataConfig

DEMO_TRAIN, DEMO_HELDOUT = 64, 16


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from finevit.data.demo import write_demo_corpus
    out = tmp_path_factory.mktemp("demo")
    write_demo_corpus(str(out), seed=0, train=DEMO_TRAIN, heldout=DEMO_HELDOUT)
    return out


@pytest.fixture(scope="session")
def recap(demo_dir):
    from finevit.data.corpus import open_corpus
    corpus = open_corpus(os.path.join(demo_dir, "recaption", "train"))
    yield corpus
    corpus.close()


@pytest.fixture(scope="session")
def heldout(demo_dir):
    """16 recaption samples: for tests that run whole epochs."""
    from finevit.data.corpus import open_corpus
    corpus = open_corpus(os.path.join(demo_dir, "recaption", "heldout"))
    yield corpus
    corpus.close()


@pytest.fixture(scope="session")
def finecap(demo_dir):
    from finevit.data.corpus import open_corpus
    corpus = open_corpus(os.path.join(demo_dir, "finecap", "train"))
    yield corpus
    corpus.close()


@pytest.fixture
def small_config():
    """small_config(**overrides) -> DataConfig with 16-64 tokens per image and an 8-image
    lookahead: the packing and resume logic at a cost the tests can afford."""
    def make(**overrides) -> DataConfig:
        base = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, max_tokens=256, pack_lookahead=8,
                    num_workers=0, prefetch_factor=2)
        base.update(overrides)
        return DataConfig(**base)
    return make
