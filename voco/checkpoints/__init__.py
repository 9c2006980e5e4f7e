"""Checkpoint files: atomic writing, safe reading."""
