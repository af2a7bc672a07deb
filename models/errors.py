"""Errors raised while reading or loading weights."""


class CheckpointError(Exception):
    """A weights file cannot be used: unreadable, not a state dict, wrong file, or required tensors missing."""
