"""`finevit train` with a record of every batch the training loop takes from its loader (the fault
tests run it under torchrun): RECORD_DIR/rank<R>.jsonl, one line per micro-batch, with the
batch's stream positions and sample ids."""

import json
import os
import sys

from finevit.data.loader import PackedLoader
from finevit.train import main

_next = PackedLoader.__next__


def _recording_next(self):
    batch = _next(self)
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps({"keys": batch.sample_keys.tolist(), "ids": batch.sample_ids}) + "\n")
    return batch


if __name__ == "__main__":
    PackedLoader.__next__ = _recording_next
    sys.exit(main.train(sys.argv[1], sys.argv[2:]))
