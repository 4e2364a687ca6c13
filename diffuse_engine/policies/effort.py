"""The effort knob: ``low`` / ``medium`` / ``high``, or a number in [0, 1], as decoding settings.

Effort sets the parameter of a decoding policy, chosen from the measured accuracy-vs-NFE curves of the shipped
models (``benchmarks/results/quality/``: 500 held-out examples each, CPU, fp32, greedy, no cache, one block):

============  ======================  ==========================  ======================
effort        settings                sudoku4x4: accuracy / NFE   addition: accuracy / NFE
============  ======================  ==========================  ======================
low (0)       threshold, 0.9          92.8% / 1.67                100% / 1.00
0.25          threshold, 0.945        96.2% / 1.79                100% / 1.00
medium (0.5)  threshold, 0.99         98.8% / 2.24                100% / 1.00
0.75          threshold, 0.995        99.2% / 2.46                100% / 1.00
high (1)      threshold, 1.0          99.6% / 15.77               100% / 3.60
============  ======================  ==========================  ======================

(0.945, 0.995 and 1.0 measured with ``diffuse-engine eval --model M --task M --limit 500 --policy threshold
--threshold T`` at commit 9f7565c; the other rows are the sweep's CSV rows.) Threshold decoding is the knob
because it holds the frontier: fixed steps need 8 forwards for 98.6% and 16 for 99.6% on sudoku4x4, threshold
0.99 needs 2.24 for 98.8%, and threshold 1.0 (only certain tokens commit together, else one per step) matches one
token per step (99.6%) at fewer forwards. A number interpolates the threshold linearly between the named points.

Family rules: LLaDA and Dream decode the whole canvas (or the request's blocks) by threshold; block-diffusion
models (SDAR) decode by threshold inside the checkpoint's fixed block (effort never sets ``block_length``). Every
family supports the same four decoding policies, so the rule is the same for all three.

A request that names its ``policy`` keeps it, and effort sets that policy's parameter instead, through its own
measured points on sudoku4x4 (log-linear between them):

========  ===========================================  ======================================
policy    low / medium / high                          sudoku4x4: accuracy / NFE
========  ===========================================  ======================================
fixed     steps = gen_length / 4, / 2, / 1             94.0% / 4, 98.6% / 8, 99.6% / 16
eb        eb_gamma 0.1, 0.01, 0.001                    94.4% / 1.82, 97.4% / 2.50, 99.4% / 3.80
factor    factor 1.0, 0.5, 0.1                         90.6% / 1.47, 93.2% / 1.60, 96.0% / 1.97
========  ===========================================  ======================================

Fields the request gives explicitly always win over effort; effort wins over a model folder's generation defaults.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..sampling_params import SamplingParams

__all__ = ["EFFORT_FAMILIES", "EFFORT_LEVELS", "EFFORT_POINTS", "effort_overrides", "params_with_effort",
           "parse_effort"]

EFFORT_LEVELS = {"low": 0.0, "medium": 0.5, "high": 1.0}
# The decoding rule of each model family (ModelConfig.arch): the policy effort picks when the request names none.
EFFORT_FAMILIES = {"llada": "threshold", "dream": "threshold", "sdar": "threshold", "llada_moe": "threshold",
                   "llada2": "threshold"}
# Per policy: (field, values at effort 0, 0.5 and 1, interpolation). "fixed" sets a fraction of gen_length as steps.
EFFORT_POINTS: dict[str, tuple[str, tuple[float, float, float], str]] = {
    "threshold": ("threshold", (0.9, 0.99, 1.0), "linear"),
    "fixed": ("steps", (0.25, 0.5, 1.0), "log"),
    "eb": ("eb_gamma", (0.1, 0.01, 0.001), "log"),
    "factor": ("factor", (1.0, 0.5, 0.1), "log"),
}


def parse_effort(value: object, name: str = "effort") -> float:
    """``value`` as a number in [0, 1]: ``"low"`` 0, ``"medium"`` 0.5, ``"high"`` 1, or a number (a numeric
    string too, as a command line passes it). Anything else raises ValueError naming ``name``."""
    shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:60]}..."
    if isinstance(value, str):
        key = value.strip().lower()
        if key in EFFORT_LEVELS:
            return EFFORT_LEVELS[key]
        try:
            value = float(key)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"{name} must be 'low', 'medium', 'high' or a number in [0, 1]; got {shown}.")


def _interpolate(effort: float, points: tuple[float, float, float], how: str) -> float:
    """The value at ``effort`` on the piecewise curve through ``points`` at 0, 0.5 and 1."""
    lo, hi, t = (points[0], points[1], effort / 0.5) if effort <= 0.5 else (points[1], points[2], effort / 0.5 - 1)
    if how == "log":
        return math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    return lo + t * (hi - lo)


def effort_overrides(effort: object, arch: str, *, policy: str | None = None, gen_length: int = 1,
                     num_blocks: int = 1) -> dict[str, Any]:
    """The SamplingParams fields that ``effort`` sets for a model of family ``arch`` (``"llada"``, ``"dream"``,
    ``"sdar"``, ``"llada_moe"``, ``"llada2"``). ``policy``: the policy the request names (None: the family's,
    :data:`EFFORT_FAMILIES`); ``gen_length`` / ``num_blocks``: the request's canvas, for the steps of ``"fixed"``
    (a multiple of the number of blocks). A policy without measured points (a registered plug-in) gets no overrides."""
    level = parse_effort(effort)
    if arch not in EFFORT_FAMILIES:
        raise ValueError(f"effort has no rule for model family {arch!r}; known: {', '.join(EFFORT_FAMILIES)}.")
    chosen = policy if policy is not None else EFFORT_FAMILIES[arch]
    if chosen not in EFFORT_POINTS:
        return {}
    field, points, how = EFFORT_POINTS[chosen]
    value = _interpolate(level, points, how)
    if field == "steps":
        per_block = max(1, round(value * gen_length / num_blocks))
        value = min(per_block * num_blocks, gen_length)
    else:
        value = round(value, 6)
    return {"policy": chosen, field: value}


def params_with_effort(effort: object, arch: str, defaults: dict[str, Any],
                       overrides: dict[str, Any]) -> SamplingParams:
    """SamplingParams from ``defaults`` (a model folder's), then what ``effort`` sets, then ``overrides`` (the fields
    the request gives explicitly, which win). ``effort`` None: defaults and overrides only."""
    from ..sampling_params import SamplingParams

    chosen = {**defaults, **overrides}
    if effort is None:
        return SamplingParams(**chosen)
    canvas = SamplingParams(**{k: chosen[k] for k in ("gen_length", "block_length") if k in chosen})
    extra = effort_overrides(effort, arch, policy=overrides.get("policy"), gen_length=canvas.gen_length,
                             num_blocks=canvas.num_blocks)
    return SamplingParams(**{**defaults, **extra, **overrides})
