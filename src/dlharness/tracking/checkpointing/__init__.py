"""Checkpoints as run artifacts: stored, listed, fetched and loaded safely, written off the
training thread."""
