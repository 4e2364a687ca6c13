"""Exceptions of the package that callers may want to catch by type."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A model folder is missing a file or holds a corrupt or inconsistent one.

    The message is a full sentence that names the folder or file at fault (and, for weights, the tensor).
    It subclasses :class:`ValueError`, so code that catches bad input in general catches it too.
    """
