"""Trained tiny models shipped with the package (one folder each, in the LLaDA Hugging Face layout, with a
model card). Wherever a model folder is expected, the name of a shipped model works too:
``diffuse-engine generate --model addition --prompt "123+456="``. The lookup lives in :mod:`diffuse_engine.loader`
(which finds the folders here without importing this package)."""

from __future__ import annotations

from ...loader import ZOO_DIR, resolve_model_path, shipped_models

__all__ = ["ZOO_DIR", "resolve_model_path", "shipped_models"]
