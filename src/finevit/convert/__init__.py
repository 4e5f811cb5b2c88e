"""Checkpoint conversion between finevit and other frameworks' layouts."""
