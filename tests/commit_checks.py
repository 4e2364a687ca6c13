"""What the commit tests share (``test_commit.py`` for the Triton kernel, ``test_commit_torch.py`` for the torch
twin): the comparison of a commit's results with the reference's."""

from __future__ import annotations


def assert_same(got: tuple, want: tuple) -> None:
    """``(canvas, committed, counters)`` of a commit equal to the reference's: dtype, shape and every value (the
    message names the first differing positions)."""
    for name, g, w in zip(("canvas", "committed", "counters"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype} {tuple(g.shape)} vs {w.dtype}"
        bad = (g != w).nonzero()
        assert bad.numel() == 0, f"{name} differs at {bad[:8].tolist()}: got {g[tuple(bad[:8].T)].tolist()}, " \
                                 f"want {w[tuple(bad[:8].T)].tolist()}"
