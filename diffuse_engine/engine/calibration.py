"""Measured device ceilings for the cost model: :func:`calibrate` times a copy, a fresh-buffer write, matmuls,
attention and tiny forwards of our model, and caches the result per device, dtype, threads and torch version under
``$DIFFUSE_CACHE_DIR``; :func:`ceilings_for` picks the calibration or the device's preset."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..models import TokenLayout, build_model
from ..ops import INVARIANT_ROWS
from .attention_plan import AttentionPlan, SeqPlan
from .ceilings import CPU, H100, DeviceCeilings, preset_for
from .kv_cache import PagedKVCache

CACHE_ENV = "DIFFUSE_CACHE_DIR"
CACHE_FILE = "ceilings.json"


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


def tiny_config(config: ModelConfig | None, layers: int) -> ModelConfig:
    """A tiny model of ``config``'s family (None: LLaDA) with ``layers`` layers, for the launch overheads: widths
    shrunk, the routing (experts, top-k, groups, shared experts) kept, every layer a MoE layer when it has experts."""
    base = ModelConfig(arch="llada", hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=2,
                       intermediate_size=64, vocab_size=64, mask_token_id=63, eos_token_id=62)
    if config is None:
        return base
    head_dim = 16 if config.explicit_head_dim is not None else None
    moe = {} if config.num_experts is None else {"moe_intermediate_size": 16, "first_k_dense_replace": 0}
    return config.replace(hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=2, intermediate_size=64,
                          vocab_size=64, mask_token_id=63, eos_token_id=62, pad_token_id=None, bos_token_id=None,
                          eot_token_id=None, explicit_head_dim=head_dim, max_position_embeddings=64, extra={}, **moe)


def _overheads(device: torch.device, dtype: torch.dtype,
               config: ModelConfig | None = None) -> tuple[float, float, float, float]:
    """(step, layer, sequence-layer, cached sequence-layer) launch overheads from tiny forwards of our model (of
    ``config``'s family when given: a MoE layer launches many more kernels than a dense one)."""
    def tiny(layers: int):
        cfg = tiny_config(config, layers)
        return build_model(cfg, device=device, dtype=dtype).init_random_(0).eval()

    n = 8
    cache = PagedKVCache(4, 2, tiny_config(config, 1).head_dim, 8, 16, dtype, device)
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
              use_cache: bool = True, config: ModelConfig | None = None) -> DeviceCeilings:
    """Measure the ceilings of ``device`` for ``dtype`` (under 2 s on a CPU): copy bandwidth, the rate of a
    large and of a 16-row matmul, the write rate into fresh buffers, and the launch overheads of tiny forwards
    of our model (a tiny model of ``config``'s family when it has experts, cached under its own key). The result
    is stored in (and, with ``use_cache``, read back from) :func:`cache_path`."""
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"cannot calibrate device {device}: only 'cpu' and CUDA devices are supported.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot calibrate {device}: CUDA is not available here.")
    key = device_key(device, dtype)
    if config is not None and config.num_experts is not None:
        key += f"|{config.arch} E{config.num_experts} k{config.num_experts_per_tok}"
    else:
        config = None  # dense families share the LLaDA measurement
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
    step, layer, seq, cached_seq = _overheads(device, dtype, config)
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


def ceilings_for(device: torch.device | str, dtype: torch.dtype = torch.float32, calibrate: bool = True,
                 config: ModelConfig | None = None) -> DeviceCeilings:
    """Ceilings of ``device`` for ``dtype``: the cached calibration (for ``config``'s family, see
    :func:`calibrate`), measured now when absent (``calibrate``), or the device's preset (``calibrate=False``)."""
    if calibrate:
        return _calibrate(device, dtype, config=config)
    return preset_for(device)


_calibrate = calibrate


def engine_ceilings(device: torch.device, dtype: torch.dtype, calibrate: bool | None,
                    config: ModelConfig | None = None) -> DeviceCeilings:
    """The ceilings an engine schedules by (``EngineConfig.calibrate``; None: calibrate on CUDA only). An
    automatic calibration that fails (or a GPU without a preset) falls back, with a warning, to the closest preset;
    an explicit ``calibrate=True`` raises."""
    try:
        return ceilings_for(device, dtype, calibrate=calibrate if calibrate is not None else device.type == "cuda",
                            config=config)
    except Exception as exc:  # noqa: BLE001 - scheduling must not stop the engine from running
        if calibrate:
            raise
        fallback = CPU if device.type == "cpu" else H100
        warnings.warn(f"no ceilings for {device} ({type(exc).__name__}: {exc}); the scheduler uses the "
                      f"{fallback.name} preset.", RuntimeWarning, stacklevel=3)
        return fallback
