"""One evaluation pass over a held-out loader: the model in eval mode for its duration."""

from contextlib import contextmanager


@contextmanager
def eval_pass(chunks: list, loader):
    """Chunks in eval mode while the block reads `loader`; afterwards the loader is closed and
    the chunks train again, also when the block raised."""
    for chunk in chunks:
        chunk.eval()
    try:
        yield loader
    finally:
        loader.close()
        for chunk in chunks:
            chunk.train()
