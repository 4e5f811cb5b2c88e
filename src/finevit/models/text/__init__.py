"""The text tower: a SigLIP / SigLIP2 text encoder on megatron-core blocks."""
