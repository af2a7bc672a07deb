"""Errors raised while reading or loading weights."""
from utils.errors import UserError


class CheckpointError(UserError):
    """A weights file cannot be used: unreadable, not a state dict, wrong file, or required tensors missing."""
