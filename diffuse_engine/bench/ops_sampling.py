"""``profile row_stats`` (logits -> sampled token, prob, top-1, margin, negative entropy) and ``profile lm_head_stats``
(the same statistics from hidden states and the LM head's weight, logits never written).

Shapes: row_stats ``M=256,V=126464`` (M rows of V logits); lm_head_stats ``M=32,V=126464,D=4096``. Tokens and the
invalid flag are exact (no more mismatches against fp64 than plain torch has); prob, top-1, margin and negative
entropy follow the float rule. Floors: row_stats reads M V logits (bytes / the measured copy bandwidth);
lm_head_stats max(weight + hidden bytes / bandwidth, 2 M V D / the measured matmul rate).
"""

from __future__ import annotations

import torch

from ..kernels import reference as ref
from .variants import OpSpec, Variant, define, interpreter_note, max_abs, native_reason, needs_cuda, triton_reason

FLOAT_KEYS = ("prob", "top1", "margin", "neg_entropy")


def _stats_error(out: dict, reference: dict) -> tuple[float, int]:
    err = max(max_abs(out[k], reference[k]) for k in FLOAT_KEYS)
    bad = sum(int((out[k].cpu().long() != reference[k].cpu().long()).sum()) for k in ("token", "invalid"))
    return err, bad


def _per_row(m: int, device: torch.device, gen: torch.Generator, hot: str = "alternate") -> tuple:
    temperature = torch.where(torch.arange(m) % 2 == 0, 0.0, 1.0) if hot == "alternate" else torch.ones(m)
    return (torch.arange(m, device=device), temperature.to(device),
            torch.randint(0, 2**62, (m,), generator=gen).to(device), torch.zeros(m, dtype=torch.int64, device=device),
            torch.arange(m, dtype=torch.int64, device=device))


# ------------------------------------------------------------------------------------------------ row_stats
def _rs_grid(config, device: torch.device, quick: bool) -> list[dict]:
    rows = (32, 256, 1024) if device.type == "cuda" else (4, 16)
    return [{"M": m, "V": config.vocab_size} for m in rows[: 1 if quick else None]]


def _rs_case(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    m, v = shape["M"], shape["V"]
    gen = torch.Generator().manual_seed(m + v)
    logits = (torch.randn(m, v, generator=gen) * 3).to(device, dtype)
    raw = (torch.arange(m) % 3 == 0).to(device)
    return {"logits": logits, "args": _per_row(m, device, gen), "raw": raw}


def _rs_call(fn, case: dict, logits: torch.Tensor | None = None, **kw):
    return fn(case["logits"] if logits is None else logits, *case["args"], raw_confidence=case["raw"], **kw)


def _rs_native(case: dict):
    from .. import native

    return lambda: _rs_call(native.row_stats, case)


def _rs_triton(block_v: int | None):
    def build(case: dict):
        from ..kernels.row_stats import row_stats

        return lambda: _rs_call(row_stats, case, block_v=block_v)
    return build


def _rs_sliced(slices: int):
    """The tensor-parallel head's arithmetic in one process: the row's vocabulary in ``slices`` slices, each reduced
    to its partial statistics, then combined (:mod:`diffuse_engine.ops.vocab_parallel`)."""
    def build(case: dict):
        from ..ops.vocab_parallel import sliced_row_stats

        def run():
            rows, *per_row = case["args"]
            return sliced_row_stats(case["logits"][rows], slices, *per_row, raw_confidence=case["raw"])
        return run
    return build


def _rs_variants() -> dict[str, Variant]:
    out = {"torch": Variant("torch", lambda case: lambda: _rs_call(ref.row_stats_reference, case)),
           "vocab-parallel[2]": Variant("vocab-parallel[2]", _rs_sliced(2)),
           "vocab-parallel[8]": Variant("vocab-parallel[8]", _rs_sliced(8)),
           "native": Variant("native", _rs_native, native_reason),
           "triton": Variant("triton", _rs_triton(None), triton_reason, interpreter_note)}
    for block_v in (1024, 16384):  # the default tile is 4096 columns
        out[f"triton[block_v={block_v}]"] = Variant(f"triton[block_v={block_v}]", _rs_triton(block_v), needs_cuda)
    return out


define(OpSpec(name="row_stats", keys={"M": None, "V": None}, grid=_rs_grid, make=_rs_case,
              reference=lambda case: _rs_call(ref.row_stats_reference, case, case["logits"].double()),
              plain=lambda case: _rs_call(ref.row_stats_reference, case), error=_stats_error,
              cost=lambda s, dtype: (float(s["M"] * s["V"] * (torch.finfo(dtype).bits // 8)), 0.0),
              floor_atol=1e-6, variants=_rs_variants()))


# -------------------------------------------------------------------------------------------- lm_head_stats
def _lm_grid(config, device: torch.device, quick: bool) -> list[dict]:
    rows = (1, 32, 256, 1024) if device.type == "cuda" else (1, 16)
    return [{"M": m, "V": config.vocab_size, "D": config.hidden_size} for m in rows[: 2 if quick else None]]


def _lm_case(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    m, v, d = shape["M"], shape["V"], shape["D"]
    gen = torch.Generator().manual_seed(m * 7 + v + d)
    weight = (torch.randn(v, d, generator=gen) * d ** -0.5 * 3).to(device, dtype)
    hidden = torch.randn(m, d, generator=gen).to(device, dtype)
    return {"hidden": hidden, "weight": weight, "args": _per_row(m, device, gen, hot="all")}


def _lm_unfused(stats, case: dict, hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None):
    h = case["hidden"] if hidden is None else hidden
    w = case["weight"] if weight is None else weight
    return stats(h @ w.T, *case["args"])


def _lm_native(case: dict):
    from .. import native

    return lambda: _lm_unfused(native.row_stats, case)


def _lm_triton(**tiles):
    def build(case: dict):
        from ..kernels.lm_head_stats import lm_head_stats

        return lambda: lm_head_stats(case["hidden"], case["weight"], *case["args"], **tiles)
    return build


def _lm_variants() -> dict[str, Variant]:
    out = {"matmul+torch": Variant("matmul+torch", lambda case: lambda: _lm_unfused(ref.row_stats_reference, case)),
           "matmul+native": Variant("matmul+native", _lm_native, native_reason),
           "fused-triton": Variant("fused-triton", _lm_triton(), triton_reason, interpreter_note)}
    for block_m in (16, 64):
        name = f"fused-triton[block_m={block_m}]"
        out[name] = Variant(name, _lm_triton(block_m=block_m), needs_cuda)
    return out


def _lm_cost(shape: dict, dtype: torch.dtype) -> tuple[float, float]:
    m, v, d = shape["M"], shape["V"], shape["D"]
    return float((v * d + m * d) * (torch.finfo(dtype).bits // 8)), 2.0 * m * v * d


def _lm_check(shape: dict) -> None:
    if shape["D"] < 16:
        raise ValueError(f"lm_head_stats needs D >= 16 (the tl.dot minimum); got D={shape['D']}.")


define(OpSpec(name="lm_head_stats", keys={"M": None, "V": None, "D": None}, grid=_lm_grid, make=_lm_case,
              reference=lambda case: _lm_unfused(ref.row_stats_reference, case, case["hidden"].double(),
                                                 case["weight"].double()),
              plain=lambda case: _lm_unfused(ref.row_stats_reference, case), error=_stats_error, cost=_lm_cost,
              floor_atol=1e-5, variants=_lm_variants(), check_shape=_lm_check))
