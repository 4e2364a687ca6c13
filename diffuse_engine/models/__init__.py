"""Model families, registered by ``ModelConfig.arch``."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .base import DiffusionLM
from .dream import DreamModel
from .layers import TokenLayout
from .llada import LLaDAModelLM
from .llada2 import LLaDA2MoeModelLM
from .llada_moe import LLaDAMoEModelLM
from .sdar import SDARModel

MODEL_REGISTRY: dict[str, type[DiffusionLM]] = {"llada": LLaDAModelLM, "dream": DreamModel, "sdar": SDARModel,
                                                "llada_moe": LLaDAMoEModelLM, "llada2": LLaDA2MoeModelLM}


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                meta: bool = False) -> DiffusionLM:
    """An uninitialised model of ``config``: parameters allocated (not filled) on ``device`` in ``dtype``, or
    left on the meta device when ``meta`` so that a loader can assign checkpoint tensors without a first
    allocation. Fill it with ``init_random_`` or a loader."""
    cls = MODEL_REGISTRY[config.arch]
    with torch.device("meta"):
        model = cls(config)
    if meta:
        return model
    # Materialise each parameter directly in the target dtype and device (no fp32 copy of an 8B model).
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                              requires_grad=False)
    return model


__all__ = ["MODEL_REGISTRY", "DiffusionLM", "DreamModel", "LLaDA2MoeModelLM", "LLaDAMoEModelLM", "LLaDAModelLM",
           "SDARModel", "TokenLayout", "build_model"]
