"""Mixture-of-experts pieces shared by LLaDA-MoE and LLaDA2: the router, the stacked routed experts (one
``[E, I, d]`` / ``[E, d, I]`` parameter per projection, for the grouped op :func:`ops.moe_experts`), the SwiGLU MLP
(dense layers and shared experts), and the mapping between stacked experts and the per-expert tensor names of the
published checkpoints (``...experts.{j}.{gate,up,down}_proj.weight``).

Routing depends on each token alone: no capacity factor, nothing dropped, so a token's experts and weights do not
depend on the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from .layers import swiglu

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """How a router turns logits into ``top_k`` (expert, weight) pairs per token: ``score`` ("softmax" or
    "sigmoid") of the logits; the pick is the top-k of ``score + bias`` among the experts of the best
    ``topk_group`` of ``n_group`` groups (a group scored by the sum of its two best biased scores); the weights are
    the unbiased scores of the picked experts (``bias_weighs``: the biased ones), normalised to sum 1 when
    ``normalize`` and ``top_k > 1``, times ``scale``."""

    top_k: int
    score: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    normalize: bool = False
    scale: float = 1.0
    bias_weighs: bool = False


def route(logits: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_ids [N, k] int64, topk_weights [N, k])`` of router ``logits`` ``[N, E]``, in the logits' dtype."""
    scores = logits.softmax(-1) if spec.score == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    if spec.topk_group < spec.n_group:
        n, e = choice.shape
        grouped = choice.view(n, spec.n_group, e // spec.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // spec.n_group, dim=1), float("-inf"))
    picked, ids = choice.topk(spec.top_k, dim=-1)
    weights = picked if spec.bias_weighs else scores.gather(1, ids)
    if spec.normalize and spec.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * spec.scale


class Router(nn.Module):
    """``weight`` ``[E, d]`` (the published ``mlp.gate.weight``) and, for LLaDA2, ``expert_bias`` ``[E]``
    (``mlp.gate.expert_bias``). ``fp32``: logits from fp32 copies of input and weight (LLaDA2); otherwise in the
    model dtype (LLaDA-MoE's ``nn.Linear``), the scores in fp32 either way (fp64 for fp64 models)."""

    def __init__(self, hidden: int, num_experts: int, spec: RouterSpec, *, own_bias: bool, fp32: bool) -> None:
        super().__init__()
        self.spec, self.fp32 = spec, fp32
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        if own_bias:
            self.expert_bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.fp32:
            logits = ops.linear(x.to(work), self.weight.to(work))
        else:
            logits = ops.linear(x, self.weight).to(work)
        if bias is None:
            bias = getattr(self, "expert_bias", None)
        return route(logits, bias, self.spec)


class StackedExperts(nn.Module):
    """The routed experts of one layer: ``gate_proj`` and ``up_proj`` ``[E, I, d]``, ``down_proj`` ``[E, d, I]``
    (under tensor parallelism a rank's slice ``I / tp`` of every expert: its output is that rank's partial sum,
    already weighted by the routing weights)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return ops.moe_experts(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights, check_ids=False)


class SwiGLU(nn.Module):
    """``down(silu(gate x) * up x)``: a dense layer's MLP, or the shared experts of a MoE layer. Under tensor
    parallelism it holds a slice of the intermediate width and returns its rank's partial output, which the layer
    sums over the ranks (:func:`~.layers.sum_over_ranks`)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = swiglu(ops.linear(x, self.gate_proj.weight), ops.linear(x, self.up_proj.weight))
        return ops.linear(g, self.down_proj.weight)


# ------------------------------------------------------------------------------------ checkpoint tensor names
def stacked_experts(model: nn.Module) -> dict[str, int]:
    """``{module name: number of experts}`` of every :class:`StackedExperts` in ``model``."""
    return {name: m.gate_proj.shape[0] for name, m in model.named_modules() if isinstance(m, StackedExperts)}


def expert_tensor_name(module: str, expert: int, projection: str) -> str:
    """The published name of one expert's projection: ``{module}.{expert}.{projection}.weight``."""
    return f"{module}.{expert}.{projection}.weight"


def checkpoint_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Tensor name -> shape of ``model``'s checkpoint in the published layout: its state dict with every stacked
    expert parameter ``{module}.{projection}`` ``[E, ...]`` replaced by ``E`` tensors
    ``{module}.{j}.{projection}.weight``."""
    stacked = stacked_experts(model)
    out: dict[str, torch.Size] = {}
    for name, t in model.state_dict().items():
        module, _, proj = name.rpartition(".")
        if module in stacked and proj in EXPERT_PROJECTIONS:
            out.update({expert_tensor_name(module, j, proj): t.shape[1:] for j in range(stacked[module])})
        else:
            out[name] = t.shape
    return out


def unstack(state: dict[str, torch.Tensor], stacked: dict[str, int]) -> dict[str, torch.Tensor]:
    """``state`` (a model's state dict) with each stacked expert parameter split into the published per-expert
    tensors (views: no copy)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        module, _, proj = name.rpartition(".")
        if module in stacked and proj in EXPERT_PROJECTIONS:
            out.update({expert_tensor_name(module, j, proj): t[j] for j in range(t.shape[0])})
        else:
            out[name] = t
    return out


class ExpertStacker:
    """Collects the per-expert tensors of a checkpoint as they are read and yields each stacked parameter once all
    its experts have arrived (so a loader holds at most one projection's experts at a time)."""

    def __init__(self, stacked: dict[str, int]) -> None:
        self.stacked = stacked
        self.parts: dict[str, dict[int, torch.Tensor]] = {}
        self.by_name = {expert_tensor_name(m, j, p): (f"{m}.{p}", j)
                        for m, e in stacked.items() for p in EXPERT_PROJECTIONS for j in range(e)}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """``(parameter name, stacked tensor)`` when ``name`` completes a parameter; None otherwise (also for a name
        that is not an expert's: check :attr:`by_name` first)."""
        param, j = self.by_name[name]
        parts = self.parts.setdefault(param, {})
        parts[j] = tensor
        if len(parts) < self.stacked[param.rpartition(".")[0]]:
            return None
        del self.parts[param]
        return param, torch.stack([parts[i] for i in range(len(parts))])
