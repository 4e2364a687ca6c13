"""Roofline cost model of one denoising step (shared/DESIGN.md section 5), and the device ceilings it reads.

A step is one packed forward over a batch of sequences plus the LM head over the rows that may commit. Each
sequence is an item ``(query_tokens, context_tokens, head_rows)``: tokens recomputed this step, cached keys
they read, rows that go through the LM head. The step runs as a chain of kernels, each bound by its own
roofline, so the predicted time is the sum over the step's phases of ``max(bytes / bandwidth, FLOPs / rate)``
plus the launch / Python overhead of the forward. (On a device whose kernels do not hide memory traffic under
arithmetic, ``overlap < 1`` adds part of the shorter of the two; the CPU measures as ``overlap = 0``.)

- body matmuls: every layer's weights are streamed once; ``2 * weights`` FLOPs per query token, at the
  matmul rate for that many rows (``peak * M / (M + matmul_half_rows)``, rows padded as the device pads them).
  Mixture-of-experts layers stream their router, shared experts and only the routed experts the step's tokens
  reach: with T tokens each picking k of E experts, ``E * (1 - (1 - k/E)^T)`` distinct experts are expected per
  layer (:meth:`CostModel.expected_experts`); each token costs the FLOPs of its k experts. So a MoE step stays
  memory-bound for many more tokens than a dense model of the same total weights (its ridge lies further right);
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

The model reads only the model's config and the device's ceilings (plain numbers: :mod:`.ceilings`, presets or
measured by :mod:`.calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ModelConfig
from .ceilings import A100, CPU, H100, H200, LOOPBACK, NVLINK, PRESETS, DeviceCeilings, LinkCeilings, preset_for

__all__ = ["A100", "CPU", "H100", "H200", "PRESETS", "CostModel", "DeviceCeilings", "LinkCeilings", "StepEstimate",
           "preset_for"]


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
                 kv_passes: float = 5.0, tensor_parallel: int = 1, link: LinkCeilings | None = None) -> None:
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}.")
        if not isinstance(ceilings, DeviceCeilings):
            raise ValueError(f"ceilings must be a DeviceCeilings, got {type(ceilings).__name__}.")
        if dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"dtype_bytes must be 1, 2, 4 or 8 (bytes per element), got {dtype_bytes!r}.")
        if len(activation_elems) != 3 or any(not a >= 0 for a in activation_elems) or not kv_passes >= 0:
            raise ValueError("activation_elems must be three numbers >= 0 and kv_passes a number >= 0.")
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}.")
        if link is not None and not isinstance(link, LinkCeilings):
            raise ValueError(f"link must be a LinkCeilings or None, got {type(link).__name__}.")
        self.config, self.ceilings, self.dtype_bytes = config, ceilings, dtype_bytes
        self.fused_head = fused_head
        self.tp = tensor_parallel
        self.link = link if link is not None else (LOOPBACK if ceilings.name == "CPU" else NVLINK)
        c, tp = config, tensor_parallel
        d, hd = c.hidden_size, c.head_dim
        # One rank's share (all of it on one device): heads, key/value heads (replicated when fewer than ranks),
        # MLP width, every expert's width (routed and shared) and vocabulary are split; the hidden width and the
        # router are not. The all-reduces stay two per layer (attention output; the MLP, or a MoE layer's routed
        # plus shared partial sums).
        self.attn_width = c.num_heads * hd // tp
        self.kv_width = max(c.num_kv_heads // tp, 1) * hd
        mlp = c.intermediate_size // tp
        # Matmul weights streamed by every step (q, k, v, o of every layer; the MLP of dense layers; the router and
        # shared experts of MoE layers); biases and norms are negligible. Routed experts are counted per step.
        moe = c.num_moe_layers
        attn = 2 * d * self.attn_width + 2 * d * self.kv_width
        self.fixed_weights = c.num_layers * attn + (c.num_layers - moe) * 3 * d * mlp
        if moe:
            self.fixed_weights += moe * (c.num_experts * d + c.num_shared_experts * c.expert_parameters() // tp)
        self.expert_weights = c.expert_parameters() // tp  # one routed expert (a rank's slice of it)
        self.moe_layers = moe
        self.head_weights = d * -(-c.vocab_size // tp)
        a_d, a_h, a_i = activation_elems
        expert_width = (c.moe_intermediate_size or 0) // tp
        mlp_width = mlp if not moe else (c.num_experts_per_tok + c.num_shared_experts) * expert_width
        self.act_elems_per_token_layer = a_d * d + a_h * (self.attn_width + self.kv_width) / 2 + a_i * mlp_width
        self.kv_passes = kv_passes

    def expected_experts(self, tokens: int) -> float:
        """Distinct routed experts a MoE layer is expected to read for ``tokens`` tokens, each picking
        ``k = num_experts_per_tok`` of ``E = num_experts`` (as if uniformly): ``E * (1 - (1 - k/E)^tokens)``."""
        c = self.config
        if not self.moe_layers:
            return 0.0
        e, k = c.num_experts, c.num_experts_per_tok
        return e * (1.0 - (1.0 - k / e) ** tokens)

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
        # Body matmuls: weights once (the routed experts the tokens reach), rows padded for the device. The dense
        # weights see every token; a routed expert only its share, tokens * k / (experts touched) rows, at the matmul
        # rate of that many rows (each expert's group padded on its own).
        m = self._pad(tokens)
        dense_flops = 2.0 * self.fixed_weights * tokens
        body_s = ce.kernel_seconds(self.fixed_weights * b, dense_flops * m / tokens, ce.matmul_rate(m))
        body_bytes, body_flops = self.fixed_weights * b, dense_flops
        if self.moe_layers:
            touched = self.expected_experts(tokens)
            pairs = tokens * c.num_experts_per_tok
            per_expert = self._pad(max(1, math.ceil(pairs / touched)))
            routed_bytes = self.moe_layers * touched * self.expert_weights * b
            routed_flops = 2.0 * self.moe_layers * self.expert_weights * pairs
            padded = routed_flops * touched * per_expert / pairs
            body_s += ce.kernel_seconds(routed_bytes, padded, ce.matmul_rate(per_expert))
            body_bytes += routed_bytes
            body_flops += routed_flops
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
            logits = 0.0 if self.fused_head else hm * c.vocab_size * b / self.tp
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
        if self.tp > 1:  # two all-reduces of the hidden states per layer, one after the embedding, the head's gather
            hidden = tokens * c.hidden_size * b
            phases["comm"] = (2 * layers + 1) * self.link.all_reduce_seconds(hidden, self.tp) \
                + self.link.all_reduce_seconds(head_rows * 64, self.tp)
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

