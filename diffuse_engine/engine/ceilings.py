"""The ceilings of a device for the roofline cost model (:mod:`.cost_model`): its bandwidth, matmul rate and
launch overheads, as presets per device (measured ones come from :mod:`.calibration`). Plain numbers: nothing here
touches a device."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DeviceCeilings:
    """Measured limits of one device for one dtype.

    ``bandwidth_gbs``: copy bandwidth, GB/s (1e9 bytes/s, bytes read + written). ``peak_tflops``: dense matmul
    rate in the model dtype. ``matmul_half_rows``: rows at which a matmul reaches half of ``peak_tflops``
    (small-M efficiency). ``attention_half_dim``: the head dim at which attention (inner dimension ``head_dim``,
    a softmax between its matmuls) runs at half the matmul rate. ``overlap``: the share of the shorter of a
    kernel's memory and compute times that hides under the longer (1: the ideal roofline, GPUs; 0: they add
    up, as measured on the CPU). ``alloc_write_gbs``: write rate into a freshly mapped buffer, for outputs past
    ``fresh_alloc_bytes`` (the CPU allocator maps buffers past 32 MiB anew and pays page faults; None: the copy
    bandwidth, as with CUDA's caching allocator). ``step_overhead_s``: fixed cost of one forward;
    ``layer_overhead_s``: per layer; ``seq_overhead_s`` / ``cached_seq_overhead_s``: per layer and sequence,
    without / with cached context (one attention call each). ``row_padding``: matmul rows are padded to a
    multiple of it (the CPU's batch-invariant matmuls, ``ops.INVARIANT_ROWS``).
    """

    name: str
    bandwidth_gbs: float
    peak_tflops: float
    step_overhead_s: float
    layer_overhead_s: float = 0.0
    seq_overhead_s: float = 0.0
    cached_seq_overhead_s: float = 0.0
    matmul_half_rows: float = 0.0
    attention_half_dim: float = 0.0
    overlap: float = 1.0
    alloc_write_gbs: float | None = None
    fresh_alloc_bytes: float = 32 * 2 ** 20
    row_padding: int = 1
    source: str = "preset"

    def __post_init__(self) -> None:
        for name in ("bandwidth_gbs", "peak_tflops", "step_overhead_s", "layer_overhead_s", "seq_overhead_s",
                     "cached_seq_overhead_s", "matmul_half_rows", "attention_half_dim", "fresh_alloc_bytes"):
            value, positive = getattr(self, name), name in ("bandwidth_gbs", "peak_tflops")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and not value):
                raise ValueError(f"DeviceCeilings.{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {value!r}.")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"DeviceCeilings.overlap must be in [0, 1], got {self.overlap!r}.")
        if self.alloc_write_gbs is not None and not self.alloc_write_gbs > 0:
            raise ValueError(f"DeviceCeilings.alloc_write_gbs must be positive or None, got {self.alloc_write_gbs!r}.")
        if not isinstance(self.row_padding, int) or self.row_padding < 1:
            raise ValueError(f"DeviceCeilings.row_padding must be a positive integer, got {self.row_padding!r}.")

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity at which a kernel turns compute-bound: ``peak / bandwidth``."""
        return self.peak_tflops * 1e12 / (self.bandwidth_gbs * 1e9)

    def matmul_rate(self, rows: int) -> float:
        """FLOP/s of a matmul with ``rows`` rows (after padding)."""
        return self.peak_tflops * 1e12 * rows / (rows + self.matmul_half_rows)

    def attention_rate(self, rows: int, head_dim: int) -> float:
        """FLOP/s of attention for ``rows`` queries per sequence and heads of ``head_dim``."""
        return self.matmul_rate(rows) * head_dim / (head_dim + self.attention_half_dim)

    def kernel_seconds(self, nbytes: float, flops: float, rate: float | None = None) -> float:
        """Roofline time of one kernel: ``max(memory, compute) + (1 - overlap) * min(memory, compute)``."""
        m = nbytes / (self.bandwidth_gbs * 1e9)
        c = flops / (rate if rate is not None else self.peak_tflops * 1e12)
        return max(m, c) + (1.0 - self.overlap) * min(m, c)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> DeviceCeilings:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


# Presets: bf16 for the GPUs (measured copy and 8k matmul, shared/DESIGN.md section 5); overheads are estimates
# for the eager engine (a few microseconds per launch, ~25 launches per layer) until a device is calibrated.
H100 = DeviceCeilings("H100", bandwidth_gbs=3000.0, peak_tflops=798.0, step_overhead_s=1.0e-3,
                      layer_overhead_s=150e-6, seq_overhead_s=25e-6, cached_seq_overhead_s=60e-6,
                      matmul_half_rows=32.0, attention_half_dim=32.0)
H200 = DeviceCeilings("H200", bandwidth_gbs=4300.0, peak_tflops=790.0, step_overhead_s=1.0e-3,
                      layer_overhead_s=150e-6, seq_overhead_s=25e-6, cached_seq_overhead_s=60e-6,
                      matmul_half_rows=32.0, attention_half_dim=32.0)
A100 = DeviceCeilings("A100", bandwidth_gbs=1600.0, peak_tflops=280.0, step_overhead_s=1.0e-3,
                      layer_overhead_s=150e-6, seq_overhead_s=25e-6, cached_seq_overhead_s=60e-6,
                      matmul_half_rows=32.0, attention_half_dim=32.0)
# A conservative CPU (two cores, fp32): below what our 2-core CI machine measures.
CPU = DeviceCeilings("CPU", bandwidth_gbs=10.0, peak_tflops=0.1, step_overhead_s=200e-6, layer_overhead_s=300e-6,
                     seq_overhead_s=30e-6, cached_seq_overhead_s=60e-6, matmul_half_rows=24.0,
                     attention_half_dim=24.0, overlap=0.0, alloc_write_gbs=2.5, row_padding=16)
PRESETS: dict[str, DeviceCeilings] = {"H100": H100, "H200": H200, "A100": A100, "CPU": CPU}


def preset_for(device: torch.device | str) -> DeviceCeilings:
    """The preset matching ``device``: H100 / H200 / A100 by CUDA device name, CPU for the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key in ("H200", "H100", "A100"):
            if key in name:
                return PRESETS[key]
        raise ValueError(f"no preset for {name!r}; calibrate it (ceilings_for(..., calibrate=True)).")
    raise ValueError(f"no preset for device {device}; use 'cpu' or an available CUDA device.")


@dataclass(frozen=True, slots=True)
class LinkCeilings:
    """The link between tensor-parallel ranks, as an all-reduce sees it: ``bandwidth_gbs`` is the bus bandwidth
    (GB/s; a ring all-reduce of n bytes over r ranks moves ``2 (r - 1) / r * n`` bytes through each link) and
    ``latency_s`` the fixed cost of one collective. Measured when a tensor-parallel engine starts
    (:meth:`diffuse_engine.distributed.TPContext.measure_link`), else a preset."""

    name: str
    bandwidth_gbs: float
    latency_s: float
    source: str = "preset"

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth_gbs, (int, float)) and math.isfinite(self.bandwidth_gbs)
                and self.bandwidth_gbs > 0):
            raise ValueError(f"LinkCeilings.bandwidth_gbs must be a finite number > 0, got {self.bandwidth_gbs!r}.")
        if not (isinstance(self.latency_s, (int, float)) and math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"LinkCeilings.latency_s must be a finite number >= 0, got {self.latency_s!r}.")

    def all_reduce_seconds(self, nbytes: float, ranks: int) -> float:
        """One ring all-reduce of ``nbytes`` per rank over ``ranks`` ranks."""
        if ranks <= 1:
            return 0.0
        return self.latency_s + 2.0 * (ranks - 1) / ranks * nbytes / (self.bandwidth_gbs * 1e9)


# Presets, not measured here: NVLink 4 between H100 / H200 cards (a round figure for NCCL's all-reduce bus bandwidth
# at large messages on an 8-GPU HGX board, as nccl-tests reports it; small messages are latency-bound), and gloo
# between processes of one host (in the range this project's 2-core CPU machine measures at start-up).
NVLINK = LinkCeilings("NVLink", bandwidth_gbs=360.0, latency_s=10e-6)
LOOPBACK = LinkCeilings("gloo-loopback", bandwidth_gbs=2.0, latency_s=60e-6)


def link_preset_for(device: torch.device | str) -> LinkCeilings:
    return NVLINK if torch.device(device).type == "cuda" else LOOPBACK
