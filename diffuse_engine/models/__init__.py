"""Model families, registered by ``ModelConfig.arch``."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .base import DiffusionLM
from .dream import DreamModel
from .layers import TokenLayout
from .llada import LLaDAModelLM

MODEL_REGISTRY: dict[str, type[DiffusionLM]] = {"llada": LLaDAModelLM, "dream": DreamModel}


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                meta: bool = False) -> DiffusionLM:
    """An uninitialised model of ``config`` (parameters allocated on ``device`` in ``dtype``, or on the meta
    device when ``meta`` so that a loader can assign checkpoint tensors without a first allocation)."""
    cls = MODEL_REGISTRY[config.arch]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if meta else device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model


__all__ = ["MODEL_REGISTRY", "DiffusionLM", "DreamModel", "LLaDAModelLM", "TokenLayout", "build_model"]
