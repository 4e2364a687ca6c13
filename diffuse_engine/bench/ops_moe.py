"""``profile moe``: the routed experts of a mixture-of-experts feed-forward (:func:`ops.moe_experts`).

Shape ``N=32,D=2048,I=512,E=256,K=8``: N tokens, hidden size D, expert intermediate size I, E experts, top-K. Routing
is a fixed function of the shape (each token's K distinct experts from seeded random scores, softmax weights), so
the bytes counted and the outputs checked are the same in every run. Variants: ``per-expert-loop`` (the masked loop
over all E experts that published MoE code runs; the baseline of the speedup column), ``grouped`` (the engine's
torch path), ``grouped_mm`` (``torch._grouped_mm`` for the three projections, where torch has it), ``triton``
(kernels/moe.py) and, on CUDA, ``triton[block_m=64]``.

Floor: the active weights stream once, bytes = (distinct experts touched) x 3 I D x dtype bytes + x and the output
(N D each) + ids and routing weights; FLOPs = 6 N K D I. Default grid: a small shape on the CPU; on CUDA the
LLaDA2.0-mini experts (hidden 2048, moe_intermediate_size 512, 256 experts, top-8) at batch 1 and 32 of a 32-token
block (N = 32 and 1024).
"""

from __future__ import annotations

import torch

from ..kernels import moe_torch
from ..kernels.reference import moe_experts_reference
from .variants import OpSpec, Unavailable, Variant, define, interpreter_note, max_abs, needs_cuda, triton_reason

# LLaDA2.0-mini (inclusionAI, model_type llada2_moe): hidden_size, moe_intermediate_size, num_experts,
# num_experts_per_tok of its config.json.
LLADA2_MINI = {"D": 2048, "I": 512, "E": 256, "K": 8}
BLOCK = 32  # LLaDA2.x decodes blocks of 32 tokens


def _grid(config, device: torch.device, quick: bool) -> list[dict]:
    if device.type == "cuda":
        return [{"N": batch * BLOCK, **LLADA2_MINI} for batch in (1, 32)[: 1 if quick else None]]
    return [{"N": 64, "D": 256, "I": 128, "E": 16, "K": 4}]


def _routing(shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, K] int64, weights [N, K] fp32): K distinct experts per token, softmax over their scores."""
    gen = torch.Generator().manual_seed(shape["N"] * 31 + shape["E"])
    scores = torch.randn(shape["N"], shape["E"], generator=gen)
    top = scores.topk(shape["K"], dim=1)
    return top.indices, torch.softmax(top.values, dim=1)


def _case(shape: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    n, d, i, e = shape["N"], shape["D"], shape["I"], shape["E"]
    gen = torch.Generator(device=device).manual_seed(d + i + e)

    def randn(*size: int, scale: float) -> torch.Tensor:  # drawn on the device: 0.8 GB of weights at LLaDA2 size
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    ids, weights = _routing(shape)
    return (randn(n, d, scale=1.0), randn(e, i, d, scale=d ** -0.5), randn(e, i, d, scale=d ** -0.5),
            randn(e, d, i, scale=i ** -0.5), ids.to(device), weights.to(device))


def _cost(shape: dict, dtype: torch.dtype) -> tuple[float, float]:
    n, d, i, k = shape["N"], shape["D"], shape["I"], shape["K"]
    ids, _ = _routing(shape)
    size = torch.finfo(dtype).bits // 8
    touched = int(ids.unique().numel())
    return float(touched * 3 * i * d * size + 2 * n * d * size + n * k * (8 + 4)), 6.0 * n * k * d * i


def _grouped_mm_reason(device: torch.device, dtype: torch.dtype, shape: dict) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if device.type == "cuda" and (dtype != torch.bfloat16 or shape["D"] % 8 or shape["I"] % 8):
        return "torch._grouped_mm on CUDA takes bf16 with D and I multiples of 8"
    return None


def _triton(block_m: int | None = None):
    def build(case: tuple):
        from ..kernels.moe import moe_experts

        if case[0].dtype == torch.float64:
            raise Unavailable("the kernel reads fp32, fp16 or bf16")
        return lambda: moe_experts(*case, block_m=block_m, check_ids=False)
    return build


def _grouped(case: tuple):
    from ..ops import INVARIANT_ROWS, linear

    pad = INVARIANT_ROWS if case[0].device.type == "cpu" else 1
    return lambda: moe_torch.moe_experts_grouped(*case, linear=linear, pad_rows=pad, grouped_mm=False)


def _check(shape: dict) -> None:
    if min(shape["N"], shape["D"], shape["I"], shape["E"], shape["K"]) < 1:
        raise ValueError(f"moe needs N, D, I, E and K >= 1; got {shape}.")
    if shape["K"] > shape["E"]:
        raise ValueError(f"moe routes each token to K distinct experts of E: K must be <= E; got K={shape['K']}, "
                         f"E={shape['E']}.")


define(OpSpec(
    name="moe", keys={"N": None, "D": None, "I": None, "E": None, "K": None}, grid=_grid, make=_case,
    reference=lambda case: moe_experts_reference(*case),
    plain=lambda case: moe_experts_reference(*case, dtype=case[0].dtype),
    error=lambda out, ref: (max_abs(out, ref), 0), cost=_cost, floor_atol=1e-5, check_shape=_check,
    variants={
        "per-expert-loop": Variant("per-expert-loop", lambda case: lambda: moe_torch.moe_experts_loop(*case)),
        "grouped": Variant("grouped", _grouped),
        "grouped_mm": Variant("grouped_mm", lambda case: lambda: moe_torch.moe_experts_grouped(*case, grouped_mm=True),
                              _grouped_mm_reason),
        "triton": Variant("triton", _triton(), triton_reason, interpreter_note),
        "triton[block_m=64]": Variant("triton[block_m=64]", _triton(64), needs_cuda),
    }))
