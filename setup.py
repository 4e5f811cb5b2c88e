"""finevit: distributed pretraining of FineViT-style native-resolution vision encoders."""

from setuptools import find_packages, setup

# torch and torchvision are pinned as a matched pair: an unpinned torchvision (pulled in by
# mosaicml-streaming) would otherwise replace torch with another CUDA build.
RUNTIME = [
    "torch==2.13.0",
    "torchvision==0.28.0",
    "megatron-core>=0.19.2,<0.20",
    "psutil",  # dist_checkpointing.save needs it but megatron-core does not declare it
    "numpy<2.2",
    "omegaconf>=2.3,<2.5",
    "pyyaml",
    "mosaicml-streaming==0.13.0",
    "transformers>=4.57,<5",
    "sentencepiece>=0.2,<0.3",
    "pillow",
    "tqdm",
    "tensorboard",
]

setup(
    name="finevit",
    version="0.1.0",
    description="Distributed pretraining framework for FineViT-style native-resolution vision encoders",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.12",
    install_requires=RUNTIME,
    extras_require={
        # GPU accelerations; the code detects them at import time and falls back without them.
        # NVIDIA apex is not on PyPI (that name is an unrelated package): use an NGC container
        # or build it from source (see README).
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "test": ["pytest>=8", "pytest-timeout", "pyarrow", "matplotlib"],
    },
    entry_points={"console_scripts": ["finevit=finevit.cli:main"]},
)
