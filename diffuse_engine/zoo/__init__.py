"""Trained tiny models shipped with the package (one folder each, in the LLaDA Hugging Face layout, with a
model card). Wherever a model folder is expected, the name of a shipped model works too:
``diffuse-engine generate --model addition --prompt "123+456="``."""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every shipped model."""
    return {p.name: p for p in sorted(ZOO_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_model_path(path: str | Path) -> Path:
    """``path`` itself when it exists; otherwise the shipped model of that name, if there is one."""
    folder = Path(path)
    if folder.exists() or not isinstance(path, str) or "/" in path or "\\" in path:
        return folder
    return shipped_models().get(path, folder)


__all__ = ["ZOO_DIR", "resolve_model_path", "shipped_models"]
