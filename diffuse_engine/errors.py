"""Exceptions of the package that callers may want to catch by type."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A model folder is missing a file or holds a corrupt or inconsistent one.

    The message is a full sentence that names the folder or file at fault (and, for weights, the tensor).
    It subclasses :class:`ValueError`, so code that catches bad input in general catches it too.
    """


class KVCacheFullError(RuntimeError):
    """The paged KV cache has too few free pages for a request right now (the engine waits for pages to free;
    a request that could never fit is refused with a ValueError when it is added)."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run an op (``DIFFUSE_BACKEND``, ``DIFFUSE_ATTENTION_BACKEND``, a
    ``backend=`` argument, or the native module when it is not built); the message says why."""


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, failed, or did not answer within the engine's timeout. The ranks can no longer
    run steps together: the engine fails every unfinished request with this message and refuses new ones; start a
    new engine. The message names the rank and what happened to it."""
