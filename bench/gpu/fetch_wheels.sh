#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU check on a lent device machine that has no
# internet: downloads into .whl/ (git-ignored) the wheels finevit needs beyond that machine's
# image (PyTorch, transformers, sentencepiece, numpy, pillow, tensorboard, ... are there).
# Then: device run with carry [".whl"] and command "bash bench/gpu/check.sh".
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
# megatron-core and the pieces of mosaicml-streaming's stack that `import streaming` touches;
# its cloud SDKs (boto3, azure, google-cloud, oci, paramiko) load only for remote corpora.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    "megatron-core>=0.19.2,<0.20" "mosaicml-streaming==0.13.0" "omegaconf==2.3.0" catalogue zstd \
    python-snappy brotli
# omegaconf's parser runtime is published as an sdist only: build the (pure Python) wheel here.
$PY -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
du -sh .whl
ls .whl
