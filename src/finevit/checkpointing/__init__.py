"""Checkpoint files, readable without megatron or the trainer (see files.py)."""
