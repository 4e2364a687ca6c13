"""Roofline cost model of one denoising step (shared/DESIGN.md section 5), and the device ceilings it reads.

A step is one packed forward over a batch of sequences plus the LM head over the rows that may commit. Each
sequence is an item ``(query_tokens, context_tokens, head_rows)``: tokens recomputed this step, cached keys
they read, rows that go through the LM head. The step runs as a chain of kernels, each bound by its own
roofline, so the predicted time is the sum over the step's phases of ``max(bytes / bandwidth, FLOPs / rate)``
plus the launch / Python overhead of the forward. (On a device whose kernels do not hide memory traffic under
arithmetic, ``overlap < 1`` adds part of the shorter of the two; the CPU measures as ``overlap = 0``.)

- body matmuls: every layer's weights are streamed once; ``2 * weights`` FLOPs per query token, at the
  matmul rate for that many rows (``peak * M / (M + matmul_half_rows)``, rows padded as the device pads them);
- attention, per sequence (one SDPA call each): ``4 * q * (context + q) * heads * head_dim`` FLOPs per layer
  (at the matmul rate scaled by ``head_dim / (head_dim + attention_half_dim)``) and the cached K/V it reads
  (counted :attr:`CostModel.kv_passes` times: the eager path gathers, concatenates and reads them);
- activations: elementwise traffic per query token and layer (norms, RoPE, SwiGLU, residuals), bandwidth-bound;
- LM head: ``d * V`` weights streamed once, ``2 * d * V`` FLOPs per head row, and the logits written (nothing
  when the head is fused); a logits buffer past ``fresh_alloc_bytes`` is freshly mapped memory, written at
  ``alloc_write_gbs`` (page faults on the CPU).

The whole step's totals give its arithmetic intensity and regime: ``"compute"`` when its FLOPs at peak take
longer than its bytes at bandwidth, i.e. when the intensity reaches the device's ridge ``peak / bandwidth``.
When one phase dominates, the sum equals DESIGN's ``max(bytes / BW, FLOPs / peak) + overhead``.

Ceilings come from presets or from :func:`calibrate` (a copy, a fresh-buffer write, matmuls, attention and tiny
forwards of our model, cached per device, dtype, threads and torch version under ``$DIFFUSE_CACHE_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops import INVARIANT_ROWS

CACHE_ENV = "DIFFUSE_CACHE_DIR"
CACHE_FILE = "ceilings.json"


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


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """Predicted cost of one step. ``seconds``: the predicted time; ``bytes`` / ``flops``: the step's traffic
    and useful FLOPs (rows padded for the device are not counted); ``intensity``: FLOPs per byte; ``regime``:
    ``"compute"`` when the intensity reaches the device's ridge, else ``"memory"``. ``memory_s`` /
    ``compute_s``: the step's bytes at bandwidth and FLOPs at peak; ``overhead_s``: the launch share of
    ``seconds``; ``phases``: seconds per phase (body, attention, activations, head)."""

    seconds: float
    bytes: float
    flops: float
    regime: str
    intensity: float
    memory_s: float
    compute_s: float
    overhead_s: float
    phases: dict[str, float]


def _nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class CostModel:
    """Predicts step times of ``config`` on a device with ``ceilings``, weights and activations in
    ``dtype_bytes``-byte elements. ``fused_head``: the LM head never writes logits (``ops.lm_head_stats``).
    ``activation_elems``: elementwise traffic per query token and layer, in elements, as
    ``(per hidden unit, per attention unit, per MLP unit)``; the defaults count the reads and writes of the
    eager LLaDA / Dream block (RMSNorm x2, RoPE on q and k, SwiGLU, residual adds, head transposes).
    ``kv_passes``: how many times the cached K/V of a sequence cross memory per layer (gather, concatenate,
    attend: 3 reads + 2 writes in the eager path)."""

    def __init__(self, config: ModelConfig, ceilings: DeviceCeilings, dtype_bytes: int = 2, *,
                 fused_head: bool = False, activation_elems: tuple[float, float, float] = (25.0, 26.0, 8.0),
                 kv_passes: float = 5.0) -> None:
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}.")
        if not isinstance(ceilings, DeviceCeilings):
            raise ValueError(f"ceilings must be a DeviceCeilings, got {type(ceilings).__name__}.")
        if dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"dtype_bytes must be 1, 2, 4 or 8 (bytes per element), got {dtype_bytes!r}.")
        if len(activation_elems) != 3 or any(not a >= 0 for a in activation_elems) or not kv_passes >= 0:
            raise ValueError("activation_elems must be three numbers >= 0 and kv_passes a number >= 0.")
        self.config, self.ceilings, self.dtype_bytes = config, ceilings, dtype_bytes
        self.fused_head = fused_head
        c = config
        d, hd = c.hidden_size, c.head_dim
        self.attn_width = c.num_heads * hd
        self.kv_width = c.num_kv_heads * hd
        # Matmul weights of one layer (q, k, v, o, gate, up, down); biases and norms are negligible.
        self.layer_weights = 2 * d * self.attn_width + 2 * d * self.kv_width + 3 * d * c.intermediate_size
        self.head_weights = d * c.vocab_size
        a_d, a_h, a_i = activation_elems
        self.act_elems_per_token_layer = a_d * d + a_h * (self.attn_width + self.kv_width) / 2 \
            + a_i * c.intermediate_size
        self.kv_passes = kv_passes

    def _pad(self, rows: int) -> int:
        p = self.ceilings.row_padding
        return -(-rows // p) * p

    def _check(self, items: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
            raise ValueError("items must be a non-empty list of (query_tokens, context_tokens, head_rows) tuples.")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 3 or not all(_nonneg_int(v) for v in item):
                raise ValueError(f"item {i} must be a tuple of three integers >= 0 (query_tokens, context_tokens, "
                                 f"head_rows), got {item!r}.")
            q, ctx, rows = item
            if q < 1:
                raise ValueError(f"item {i} recomputes no token; every sequence of a step has query_tokens >= 1.")
            if rows > q:
                raise ValueError(f"item {i} sends {rows} rows through the head but recomputes only {q} tokens; "
                                 f"head_rows must be at most query_tokens.")
            out.append((q, ctx, rows))
        return out

    def predict(self, items: Sequence[tuple[int, int, int]]) -> StepEstimate:
        """The cost of one step over ``items`` (one ``(query_tokens, context_tokens, head_rows)`` per
        sequence). Raises ValueError for malformed items."""
        items = self._check(items)
        c, ce, b = self.config, self.ceilings, self.dtype_bytes
        layers = c.num_layers
        tokens = sum(q for q, _, _ in items)
        head_rows = sum(r for _, _, r in items)
        # Body matmuls: weights once, rows padded for the device.
        body_bytes = self.layer_weights * layers * b
        body_flops = 2.0 * self.layer_weights * layers * tokens
        m = self._pad(tokens)
        body_s = ce.kernel_seconds(body_bytes, body_flops * m / tokens, ce.matmul_rate(m))
        # Attention: per sequence and layer, over its cached context plus its own fresh tokens.
        attn_bytes = attn_flops = attn_s = 0.0
        for q, ctx, _ in items:
            f = 4.0 * q * (ctx + q) * self.attn_width * layers
            kv = 2.0 * ctx * self.kv_width * layers * b * self.kv_passes
            attn_bytes += kv
            attn_flops += f
            attn_s += ce.kernel_seconds(kv, f, ce.attention_rate(q, c.head_dim))
        # Activations: elementwise traffic of every query token in every layer, plus its embedding row.
        act_bytes = (self.act_elems_per_token_layer * layers + 2 * c.hidden_size) * tokens * b
        act_s = ce.kernel_seconds(act_bytes, 0.0)
        # LM head: its weights once, padded rows, and the logits written unless fused.
        head_bytes = head_flops = head_s = 0.0
        if head_rows:
            hm = self._pad(head_rows)
            head_flops = 2.0 * self.head_weights * head_rows
            w = self.head_weights * b
            logits = 0.0 if self.fused_head else hm * c.vocab_size * b
            head_bytes = w + logits * head_rows / hm
            fresh = ce.alloc_write_gbs is not None and logits > ce.fresh_alloc_bytes
            write_bw = (ce.alloc_write_gbs if fresh else ce.bandwidth_gbs) * 1e9
            head_s = ce.kernel_seconds(w, head_flops * hm / head_rows, ce.matmul_rate(hm)) + logits / write_bw
        overhead = ce.step_overhead_s + layers * ce.layer_overhead_s \
            + layers * sum(ce.cached_seq_overhead_s if ctx else ce.seq_overhead_s for _, ctx, _ in items)
        nbytes = body_bytes + attn_bytes + act_bytes + head_bytes
        flops = body_flops + attn_flops + head_flops
        memory_s, compute_s = nbytes / (ce.bandwidth_gbs * 1e9), flops / (ce.peak_tflops * 1e12)
        phases = {"body": body_s, "attention": attn_s, "activations": act_s, "head": head_s}
        return StepEstimate(
            seconds=sum(phases.values()) + overhead, bytes=nbytes, flops=flops,
            regime="compute" if compute_s >= memory_s else "memory", intensity=flops / nbytes,
            memory_s=memory_s, compute_s=compute_s, overhead_s=overhead, phases=phases)

    def ridge_tokens(self, context_tokens: int = 0, head_fraction: float = 1.0) -> float:
        """Query tokens per step (one sequence reading ``context_tokens`` cached keys, ``head_fraction`` of its
        tokens through the LM head) at which the step becomes compute-bound; ``math.inf`` when it never does
        (activation traffic per token outweighs its FLOPs at the device's ridge)."""
        if not _nonneg_int(context_tokens):
            raise ValueError(f"context_tokens must be an integer >= 0, got {context_tokens!r}.")
        if not 0.0 <= head_fraction <= 1.0:
            raise ValueError(f"head_fraction must be in [0, 1], got {head_fraction!r}.")

        def compute_bound(n: int) -> bool:
            return self.predict([(n, context_tokens, int(n * head_fraction))]).regime == "compute"

        hi = 1
        while not compute_bound(hi):
            hi *= 2
            if hi > 1 << 26:
                return math.inf
        lo = hi // 2  # memory-bound (or 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if compute_bound(mid) else (mid, hi)
        return float(hi)


# -------------------------------------------------------------------------------------------------- calibration
def cache_path() -> Path:
    """The JSON file of calibrated ceilings: ``$DIFFUSE_CACHE_DIR/ceilings.json`` (default
    ``~/.cache/diffuse-engine``)."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "diffuse-engine")
    return Path(root) / CACHE_FILE


def device_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """Cache key: device name (CPU: processor and thread count), dtype and torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"
    return f"{name}|{str(dtype).replace('torch.', '')}|torch {torch.__version__}"


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after a warm-up run (synchronised on CUDA)."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[reps // 2]


def _overheads(device: torch.device, dtype: torch.dtype) -> tuple[float, float, float, float]:
    """(step, layer, sequence-layer, cached sequence-layer) launch overheads from tiny forwards of our model."""
    from ..models import TokenLayout, build_model
    from .attention_plan import AttentionPlan, SeqPlan
    from .kv_cache import PagedKVCache

    def tiny(layers: int):
        cfg = ModelConfig(arch="llada", hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=2,
                          intermediate_size=64, vocab_size=64, mask_token_id=63, eos_token_id=62)
        return build_model(cfg, device=device, dtype=dtype).init_random_(0).eval()

    n = 8
    cache = PagedKVCache(4, 2, 16, 8, 16, dtype, device)
    pages = [cache.allocate(2 * n) for _ in range(4)]

    def forward(model, seqs: int, cached: bool) -> Callable[[], object]:
        tokens = torch.zeros(seqs * n, dtype=torch.int64, device=device)
        if cached:
            plans = [SeqPlan(n, n, torch.arange(n, 2 * n), [(0, n)], None, pages[i]) for i in range(seqs)]
            pos = torch.arange(n, 2 * n, device=device).repeat(seqs)
        else:
            plans, pos = None, torch.arange(n, device=device).repeat(seqs)

        @torch.inference_mode()
        def run() -> object:
            kv = AttentionPlan(cache, plans, device) if cached else None
            h = model.hidden_states(tokens, pos, TokenLayout.packed([n] * seqs, kv=kv))
            return model.logits_from_hidden(h[:1])
        return run

    one, four = tiny(1), tiny(4)
    t11 = median_seconds(forward(one, 1, False), device, 15)
    t41 = median_seconds(forward(four, 1, False), device, 15)
    t44 = median_seconds(forward(four, 4, False), device, 15)
    t41c = median_seconds(forward(four, 1, True), device, 15)
    t44c = median_seconds(forward(four, 4, True), device, 15)
    seq = max(0.0, (t44 - t41) / 12)
    cached_seq = max(0.0, (t44c - t41c) / 12)
    layer = max(0.0, (t41 - t11) / 3 - seq)
    step = max(0.0, t11 - layer - seq)
    return step, layer, seq, cached_seq


def _copy_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float | None]:
    """Copy bandwidth (GB/s, read + written) and, on the CPU, the write rate into a freshly allocated buffer."""
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes // torch.tensor([], dtype=dtype).element_size(), device=device, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    bandwidth = 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, 7) / 1e9
    if cuda:
        return bandwidth, None
    return bandwidth, nbytes / median_seconds(lambda: torch.empty_like(src).fill_(1), device, 5) / 1e9


def _matmul_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Dense matmul FLOP/s (square, 8192 on CUDA, 1024 on the CPU) and the rows at which a matmul reaches half of
    it (CPU: 16 rows against a cache-resident weight; CUDA: there a 16-row matmul over a large weight is
    memory-bound, so the matching preset's value is kept)."""
    mm = 8192 if device.type == "cuda" else 1024
    a = torch.randn(mm, mm, device=device).to(dtype)
    b = torch.randn(mm, mm, device=device).to(dtype)
    peak = 2 * mm ** 3 / median_seconds(lambda: F.linear(a, b), device, 5 if device.type == "cuda" else 3)
    if device.type == "cuda":
        try:
            return peak, preset_for(device).matmul_half_rows
        except ValueError:
            return peak, 32.0
    rows, k = 16, 512
    x, w = a[:rows, :k].contiguous(), b[:k, :k].contiguous()
    small = 2 * rows * k * k / median_seconds(lambda: F.linear(x, w), device, 31)
    return peak, max(0.0, rows * (peak / small - 1))


def _attention_half_dim(device: torch.device, dtype: torch.dtype, peak: float, half_rows: float) -> float:
    """The ``attention_half_dim`` that explains SDPA's measured rate at head dim 32 (small head dims spend
    relatively more on the softmax)."""
    heads, seq, hd = (32, 1024, 32) if device.type == "cuda" else (4, 256, 32)
    q, k, v = (torch.randn(1, heads, seq, hd, device=device).to(dtype) for _ in range(3))
    rate = 4 * seq * seq * heads * hd / median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), device, 11)
    eff = rate / (peak * seq / (seq + half_rows))
    return max(0.0, hd * (1 / eff - 1))


def calibrate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
              use_cache: bool = True) -> DeviceCeilings:
    """Measure the ceilings of ``device`` for ``dtype`` (under 2 s on a CPU): copy bandwidth, the rate of a
    large and of a 16-row matmul, the write rate into fresh buffers, and the launch overheads of tiny forwards
    of our model. The result is stored in (and, with ``use_cache``, read back from) :func:`cache_path`."""
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"cannot calibrate device {device}: only 'cpu' and CUDA devices are supported.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot calibrate {device}: CUDA is not available here.")
    key = device_key(device, dtype)
    path = cache_path()
    stored = _read_cache(path)
    if use_cache and isinstance(stored.get(key), dict):
        try:
            return DeviceCeilings.from_json(stored[key])
        except (TypeError, ValueError):
            pass  # an entry from another version of this file, or edited by hand: measure again
    cuda = device.type == "cuda"
    bandwidth, fresh_gbs = _copy_rates(device, dtype)
    peak, half_rows = _matmul_rates(device, dtype)
    half_dim = _attention_half_dim(device, dtype, peak, half_rows)
    step, layer, seq, cached_seq = _overheads(device, dtype)
    ceilings = DeviceCeilings(
        name=key, bandwidth_gbs=bandwidth, peak_tflops=peak / 1e12,
        step_overhead_s=step, layer_overhead_s=layer, seq_overhead_s=seq, cached_seq_overhead_s=cached_seq,
        matmul_half_rows=half_rows, attention_half_dim=half_dim, overlap=1.0 if cuda else 0.0,
        alloc_write_gbs=fresh_gbs, row_padding=1 if cuda else INVARIANT_ROWS,
        source="calibrated")
    stored = _read_cache(path)
    stored[key] = ceilings.to_json()
    _write_cache(path, stored)
    return ceilings


def _read_cache(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    """Write atomically (a temporary file, then rename) so that concurrent calibrations never leave half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


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


def ceilings_for(device: torch.device | str, dtype: torch.dtype = torch.float32, calibrate: bool = True
                 ) -> DeviceCeilings:
    """Ceilings of ``device`` for ``dtype``: the cached calibration, measured now when absent (``calibrate``),
    or the device's preset (``calibrate=False``)."""
    if calibrate:
        return _calibrate(device, dtype)
    return preset_for(device)


_calibrate = calibrate
