"""The registry of ``diffuse-engine profile``: for each op an :class:`OpSpec` (its shape keys, default grid, inputs,
fp64 reference, error measure, counted bytes / FLOPs) and its :class:`Variant` s, each of which says whether it
runs on a device and builds the callable that is checked, then timed.

The ops' modules (:mod:`.ops_attention`, :mod:`.ops_sampling`, :mod:`.ops_misc`, :mod:`.ops_moe`) register
themselves when :func:`spec` first loads them; ``profile step`` is :mod:`.ops_step`. A test (or a user) adds a
variant with :func:`register`.

Correctness (:func:`judge`): a variant's output is compared with the reference computed in fp64 on the same
(rounded) inputs. Float outputs: its error must be at most twice plain torch's error in the profiled dtype (the
torch reference run in that dtype), plus the op's small absolute floor (for cases where plain torch's error is 0).
Integer outputs (tokens, commit masks, noise bits) are exact: at most as many mismatches as plain torch has.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

OP_MODULES = {"attention": "ops_attention", "row_stats": "ops_sampling", "lm_head_stats": "ops_sampling",
              "commit": "ops_misc", "noise": "ops_misc", "moe": "ops_moe"}


class Unavailable(Exception):
    """Raised by a variant's ``build`` (or its first call) when it cannot run on these inputs; the message is
    the reason listed in the table."""


@dataclass(slots=True)
class Variant:
    """One implementation of an op. ``build(case)`` returns a no-argument callable whose result is compared with
    the reference (and then timed); ``available(device, dtype, shape)`` returns None when it can run, else the
    reason; ``note`` is shown next to its time (e.g. "interpreter timing")."""

    name: str
    build: Callable[[Any], Callable[[], Any]]
    available: Callable[[torch.device, torch.dtype, dict], str | None] = lambda device, dtype, shape: None
    note: Callable[[torch.device], str] = lambda device: ""


@dataclass(slots=True)
class OpSpec:
    """How ``profile`` runs one op.

    ``keys``: shape keys with defaults (None: required; a ``--shape`` may leave out the others); ``grid(config,
    device, quick)``: the default shapes from a model config; ``make(shape, dtype, device)``: the inputs (a case
    object the variants read); ``reference(case)``: the fp64 result; ``plain(case)``: plain torch in the profiled
    dtype; ``error(out, ref) -> (float error, integer mismatches)``; ``cost(shape, dtype) -> (bytes, flops)``
    (flops 0 for memory-bound ops); ``floor_atol``: the absolute floor of the float rule."""

    name: str
    keys: dict[str, int | str | None]
    grid: Callable[[Any, torch.device, bool], list[dict]]
    make: Callable[[dict, torch.dtype, torch.device], Any]
    reference: Callable[[Any], Any]
    plain: Callable[[Any], Any]
    error: Callable[[Any, Any], tuple[float, int]]
    cost: Callable[[dict, torch.dtype], tuple[float, float]]
    floor_atol: float = 1e-6
    variants: dict[str, Variant] = field(default_factory=dict)
    check_shape: Callable[[dict], None] = lambda shape: None
    label: Callable[[dict], str] = lambda shape: ",".join(f"{k}={v}" for k, v in shape.items())
    fixed_dtype: str | None = None  # the dtype the op works in whatever --dtype says (commit, noise: float32)


REGISTRY: dict[str, OpSpec] = {}


def define(op: OpSpec) -> OpSpec:
    """Add an op to the registry (its module calls this on import)."""
    REGISTRY[op.name] = op
    return op


def spec(name: str) -> OpSpec:
    """The :class:`OpSpec` of ``name``, its module imported on first use."""
    if name not in OP_MODULES:
        raise ValueError(f"unknown op {name!r}; choose one of {', '.join(OP_MODULES)}.")
    if name not in REGISTRY:
        importlib.import_module(f"{__package__}.{OP_MODULES[name]}")
    return REGISTRY[name]


def register(op: str, variant: Variant) -> Variant:
    """Add (or replace) a variant of ``op``."""
    spec(op).variants[variant.name] = variant
    return variant


def judge(op: OpSpec, err: tuple[float, int], plain_err: tuple[float, int]) -> bool:
    """Whether a variant's ``(float error, integer mismatches)`` passes: float error <= 2x plain torch's + the op's
    floor, mismatches <= plain torch's."""
    return err[0] <= 2 * plain_err[0] + op.floor_atol and err[1] <= plain_err[1]


# ------------------------------------------------------------------------------------------ shared availability
def needs_cuda(device: torch.device, dtype: torch.dtype, shape: dict) -> str | None:
    """Availability of a CUDA-only variant."""
    return None if device.type == "cuda" else "needs CUDA"


def native_reason(device: torch.device, dtype: torch.dtype, shape: dict, cpu_dtypes=(torch.float32,)) -> str | None:
    """Availability of a native (``_C``) variant: the module is built; on the CPU the C++ twin takes ``cpu_dtypes``."""
    from ..ops import native_status

    module, why = native_status()
    if module is None:
        return f"native module unavailable: {why}"
    if device.type == "cpu" and cpu_dtypes is not None and dtype not in cpu_dtypes:
        return f"the C++ twin takes {', '.join(str(d)[6:] for d in cpu_dtypes)} only"
    return None


def triton_reason(device: torch.device, dtype: torch.dtype, shape: dict) -> str | None:
    """Availability of a Triton variant: CUDA, or the CPU interpreter under TRITON_INTERPRET=1."""
    from ..ops import triton_runs

    ok, why = triton_runs(device)
    return None if ok else why


def interpreter_note(device: torch.device) -> str:
    """The note on Triton timings taken under the CPU interpreter."""
    return "interpreter timing" if device.type != "cuda" else ""


def native_name(device: torch.device) -> str:
    """The native variant's name: ``cuda`` on a GPU, ``c++`` (the CPU twin) otherwise."""
    return "cuda" if device.type == "cuda" else "c++"


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in fp64, NaN where both are NaN counted as equal."""
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    if diff.numel() == 0:
        return 0.0
    return float("inf") if bool(torch.isnan(diff).any()) else float(diff.max())
