"""The arguments of the commit op as one object (:class:`CommitBatch`), taken by every implementation:
``kernels.reference.commit_reference`` (the oracle), ``kernels.commit_torch.commit_torch``, the Triton kernel
``kernels.commit.commit``, the native ``native.commit`` and the dispatch ``ops.commit``.

A leaf module (torch and :mod:`diffuse_engine.contract` only), so that ``kernels/`` can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Contract

REVISION_FIELDS = ("revise_offsets", "revise_index", "revise_score", "remask_bound")


@dataclass(slots=True)
class CommitBatch:
    """One commit step of B requests on a flat ``canvas`` of token ids, modified in place.

    Request b owns the candidate rows ``row_offsets[b]:row_offsets[b+1]``: still-masked canvas slots
    ``row_index`` with their sampled ``token``, ranking ``score`` (higher = more confident) and ``entropy``
    (>= 0); its rule is ``mode[b]`` (``COMMIT_*`` of ``kernels/reference.py``) with its ``count``,
    ``threshold``, ``factor`` and ``eb_gamma``. Revision (all four or none): request b's committed slots
    ``revise_index[revise_offsets[b]:revise_offsets[b+1]]`` whose ``revise_score`` is below ``remask_bound[b]`` are
    set back to ``mask_id`` before the step's commits. Rules: :func:`kernels.reference.commit_reference`.

    Dtypes and shapes of the kernels' contract (see :meth:`validate`): canvas ``[N]``, row_offsets ``[B+1]``,
    row_index and token ``[M]``, int64; score and entropy ``[M]`` fp32; mode and count ``[B]`` int32; threshold,
    factor and eb_gamma ``[B]`` fp32; revise_offsets ``[B+1]`` and revise_index ``[R]`` int64, revise_score ``[R]``
    and remask_bound ``[B]`` fp32; all on the canvas' device.
    """

    canvas: torch.Tensor
    row_offsets: torch.Tensor
    row_index: torch.Tensor
    token: torch.Tensor
    score: torch.Tensor
    entropy: torch.Tensor
    mode: torch.Tensor
    count: torch.Tensor
    threshold: torch.Tensor
    factor: torch.Tensor
    eb_gamma: torch.Tensor
    mask_id: int
    revise_offsets: torch.Tensor | None = None
    revise_index: torch.Tensor | None = None
    revise_score: torch.Tensor | None = None
    remask_bound: torch.Tensor | None = None

    @property
    def num_requests(self) -> int:
        """B: one less than the entries of ``row_offsets``."""
        return self.row_offsets.shape[0] - 1

    @property
    def num_rows(self) -> int:
        """M: the candidate rows of the whole batch."""
        return self.row_index.shape[0]

    @property
    def has_revision(self) -> bool:
        return self.revise_offsets is not None

    def validate(self, *, strict: bool = True) -> CommitBatch:
        """Raise ``ValueError`` with a sentence (:mod:`diffuse_engine.contract`) unless every tensor is 1-D on the
        canvas' device with the lengths above, the revision tensors come all four or none, and ``mask_id`` is an
        int64 value; returns the batch. ``strict`` (the Triton and native kernels, which read raw memory) also
        requires the dtypes above and contiguous tensors; without it (the torch paths, which convert) any dtype
        and strides pass. Values (offsets in range, known modes, ...) are each implementation's to check: a check
        on CUDA tensors would synchronise the device."""
        revision = [getattr(self, name) for name in REVISION_FIELDS]
        if any((t is None) == self.has_revision for t in revision):
            raise ValueError(f"{', '.join(REVISION_FIELDS[:3])} and {REVISION_FIELDS[3]} come all together or not at "
                             f"all.")
        mask_id = self.mask_id
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not -(2**63) <= mask_id < 2**63:
            raise ValueError(f"mask_id must be an int64 value, got {mask_id!r}.")
        check = Contract("canvas", self.canvas)

        def vec(name: str, dtype: torch.dtype, length: tuple[int, str] | None = None) -> torch.Tensor:
            return check(name, getattr(self, name), dtype if strict else None, ndim=1, length=length,
                         contiguous=strict)

        vec("canvas", torch.int64)
        offsets = vec("row_offsets", torch.int64)
        if offsets.shape[0] < 1:
            raise ValueError("row_offsets must be [B + 1] with B >= 0 (at least one entry), got 0 entries.")
        b, m = offsets.shape[0] - 1, vec("row_index", torch.int64).shape[0]
        vec("token", torch.int64, (m, "M, as row_index"))
        for name in ("score", "entropy"):
            vec(name, torch.float32, (m, "M, as row_index"))
        for name in ("mode", "count"):
            vec(name, torch.int32, (b, "B, one per request"))
        for name in ("threshold", "factor", "eb_gamma"):
            vec(name, torch.float32, (b, "B, one per request"))
        if self.has_revision:
            vec("revise_offsets", torch.int64, (b + 1, "B + 1, as row_offsets"))
            r = vec("revise_index", torch.int64).shape[0]
            vec("revise_score", torch.float32, (r, "R, as revise_index"))
            vec("remask_bound", torch.float32, (b, "B, one per request"))
        return self
