"""``profile commit`` and ``profile noise``: the commit / re-mask step (exact: canvas, committed mask and counters
equal the oracle's) and counter-based noise (uniforms exact to the bit; Gumbel noise within twice plain torch's
error against fp64).

Shapes: commit ``B=32,R=32`` (B requests of R candidate rows each; modes top-k, threshold, factor and entropy budget
in turn); noise ``M=256,V=126464,kind=gumbel`` (kind uniform or gumbel). Noise has no standalone Triton kernel (its
Triton form, ``kernels/noise_tl.py``, is inlined into the sampling kernels), and is fp32 whatever ``--dtype``.
"""

from __future__ import annotations

import torch

from ..commit_batch import CommitBatch
from ..kernels import reference as ref
from .variants import (
    OpSpec,
    Variant,
    define,
    interpreter_note,
    max_abs,
    native_reason,
    triton_reason,
)

MASK_ID = 126336


# --------------------------------------------------------------------------------------------------- commit
def _commit_grid(config, device: torch.device, quick: bool) -> list[dict]:
    block = 32
    batches = (1, 32, 128) if device.type == "cuda" else (4, 16)
    return [{"B": b, "R": block} for b in batches[: 2 if quick else None]]


def _commit_case(shape: dict, dtype: torch.dtype, device: torch.device) -> CommitBatch:
    b, r = shape["B"], shape["R"]
    gen = torch.Generator().manual_seed(b * 131 + r)
    m = b * r
    n = 2 * m
    canvas = torch.full((n,), MASK_ID, dtype=torch.int64)
    f32 = dict(dtype=torch.float32)
    return CommitBatch(
        canvas=canvas.to(device), row_offsets=torch.arange(0, m + 1, r, dtype=torch.int64).to(device),
        row_index=torch.randperm(n, generator=gen)[:m].to(device),
        token=torch.randint(0, 1000, (m,), generator=gen).to(device),
        score=torch.rand(m, generator=gen, **f32).to(device),
        entropy=(torch.rand(m, generator=gen, **f32) * 0.5).to(device),
        mode=(torch.arange(b, dtype=torch.int32) % 4).to(device), count=torch.full((b,), 2, dtype=torch.int32,
                                                                                    device=device),
        threshold=torch.full((b,), 0.7, device=device, **f32), factor=torch.ones(b, device=device, **f32),
        eb_gamma=torch.full((b,), 0.3, device=device, **f32), mask_id=MASK_ID)


def _fresh(batch: CommitBatch) -> CommitBatch:
    fields = {f: getattr(batch, f) for f in CommitBatch.__slots__}
    return CommitBatch(**{**fields, "canvas": batch.canvas.clone()})


def _commit_run(impl):
    def build(batch: CommitBatch):
        mine = _fresh(batch)
        return lambda: (mine.canvas, *impl(mine))
    return build


def _commit_ref(batch: CommitBatch):
    mine = _fresh(batch)
    return (mine.canvas, *ref.commit_reference(mine))


def _commit_plain(batch: CommitBatch):
    from ..kernels.commit_torch import commit_torch

    mine = _fresh(batch)
    return (mine.canvas, *commit_torch(mine, max_rows=int(batch.row_offsets[1] - batch.row_offsets[0])))


def _commit_error(out, reference) -> tuple[float, int]:
    return 0.0, sum(int((a.cpu().long() != b.cpu().long()).sum()) for a, b in zip(out, reference, strict=True))


def _commit_cost(shape: dict, dtype: torch.dtype) -> tuple[float, float]:
    m = shape["B"] * shape["R"]
    return 40.0 * m + 40.0 * shape["B"], 0.0  # kernels/commit.py: ~40 B per row and per request


def _commit_variants() -> dict[str, Variant]:
    from ..kernels.commit_torch import commit_torch

    def torch_path(batch):
        return commit_torch(batch, max_rows=int(batch.row_offsets[1] - batch.row_offsets[0]))

    def native_commit(batch):
        from .. import native

        return native.commit(batch)

    def triton_commit(batch):
        from ..kernels.commit import commit

        return commit(batch, max_rows=int(batch.row_offsets[1] - batch.row_offsets[0]))

    return {
        "torch": Variant("torch", _commit_run(torch_path)),
        "native": Variant("native", _commit_run(native_commit), lambda d, t, s: native_reason(d, t, s, None)),
        "triton": Variant("triton", _commit_run(triton_commit), triton_reason, interpreter_note),
    }


def _check_commit(shape: dict) -> None:
    if not 1 <= shape["R"] <= 1024 or shape["B"] < 1:
        raise ValueError(f"commit takes B >= 1 requests of 1 to 1024 rows (R); got B={shape['B']}, R={shape['R']}.")


define(OpSpec(name="commit", keys={"B": None, "R": 32}, grid=_commit_grid, make=_commit_case,
              reference=_commit_ref, plain=_commit_plain, error=_commit_error, cost=_commit_cost, floor_atol=0.0,
              variants=_commit_variants(), check_shape=_check_commit, fixed_dtype="float32"))


# ---------------------------------------------------------------------------------------------------- noise
def _noise_grid(config, device: torch.device, quick: bool) -> list[dict]:
    rows = (32, 256, 1024) if device.type == "cuda" else (4, 32)
    return [{"M": m, "V": config.vocab_size, "kind": kind} for kind in ("uniform", "gumbel")
            for m in rows[: 1 if quick else None]]


def _noise_case(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    m = shape["M"]
    g = torch.Generator().manual_seed(m)
    keys = [torch.randint(-(2**62), 2**62, (m,), generator=g, dtype=torch.int64),
            torch.randint(0, 2**32, (m,), generator=g, dtype=torch.int64),
            torch.randint(0, 2**32, (m,), generator=g, dtype=torch.int64)]
    return {"keys": [k.to(device) for k in keys], "cols": shape["V"], "gumbel": shape["kind"] == "gumbel"}


def _noise_plain(case: dict) -> torch.Tensor:
    fn = ref.counter_gumbel if case["gumbel"] else ref.counter_uniform
    return fn(*case["keys"], ref.STREAM_SAMPLE, case["cols"])


def _noise_ref(case: dict) -> torch.Tensor:
    u = ref.counter_uniform(*case["keys"], ref.STREAM_SAMPLE, case["cols"])
    return -torch.log(-torch.log(u.double())) if case["gumbel"] else u


def _noise_error(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    if reference.dtype == torch.float64:  # Gumbel: a float comparison
        return max_abs(out, reference), 0
    return 0.0, int((out.view(torch.int32) != reference.view(torch.int32)).sum())


def _noise_native(case: dict):
    from .. import native

    out = torch.empty((case["keys"][0].shape[0], case["cols"]), dtype=torch.float32, device=case["keys"][0].device)
    return lambda: native.counter_noise(*case["keys"], ref.STREAM_SAMPLE, case["cols"], gumbel=case["gumbel"],
                                        out=out)


def _check_noise(shape: dict) -> None:
    if shape["kind"] not in ("uniform", "gumbel"):
        raise ValueError(f"noise kind must be 'uniform' or 'gumbel'; got {shape['kind']!r}.")


define(OpSpec(name="noise", keys={"M": None, "V": None, "kind": "gumbel"}, grid=_noise_grid, make=_noise_case,
              reference=_noise_ref, plain=_noise_plain, error=_noise_error,
              cost=lambda s, dtype: (4.0 * s["M"] * s["V"], 0.0), floor_atol=1e-6, check_shape=_check_noise,
              fixed_dtype="float32",
              variants={"torch": Variant("torch", lambda case: lambda: _noise_plain(case)),
                        "native": Variant("native", _noise_native, lambda d, t, s: native_reason(d, t, s, None))}))
