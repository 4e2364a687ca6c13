"""What ``profile`` resolves from its arguments before running an op: shapes (:func:`parse_shape`), the device and
the profiled dtype, the model config of the default grids, and the device's measured ceilings (once per process)."""

from __future__ import annotations

import argparse

import torch

from . import common
from .variants import OpSpec

DEFAULT_PRESET = {"cuda": "llada-8b", "cpu": "llada-tiny"}


def parse_shape(op: OpSpec, text: str) -> dict:
    """A ``--shape`` spec of ``op`` as a dict of every key (defaults filled in); ValueError with a sentence when a
    key is unknown, missing or not a number."""
    given: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"--shape {text!r}: {part!r} is not KEY=VALUE (e.g. {_example(op)}).")
        if key.strip() not in op.keys:
            raise ValueError(f"--shape {text!r}: {op.name} has no key {key.strip()!r}; its keys are "
                             f"{', '.join(op.keys)}.")
        given[key.strip()] = value.strip()
    missing = [k for k, default in op.keys.items() if default is None and k not in given]
    if missing:
        raise ValueError(f"--shape {text!r}: {op.name} needs {', '.join(missing)} (e.g. {_example(op)}).")
    shape = {}
    for key, default in op.keys.items():
        value = given.get(key, default)
        if isinstance(default, str):
            shape[key] = value
            continue
        try:
            shape[key] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--shape {text!r}: {key} must be an integer; got {value!r}.") from None
        if shape[key] < 0:
            raise ValueError(f"--shape {text!r}: {key} must not be negative; got {shape[key]}.")
    op.check_shape(shape)
    return shape


def _example(op: OpSpec) -> str:
    return ",".join(f"{k}={'4' if d is None else d}" for k, d in op.keys.items())


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device (``--device``, default CUDA when available) and profiled dtype (``--dtype``, default bf16 on
    CUDA, fp32 on the CPU)."""
    from ..loader import parse_dtype

    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is visible.")
    name = getattr(args, "dtype", None)
    dtype = parse_dtype(name) if name else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def model_config(args: argparse.Namespace, device: torch.device):
    """The model config the default grid comes from: ``--model DIR``'s config.json, else ``--preset``, else the
    device's default preset."""
    if getattr(args, "model", None):
        from ..config import ModelConfig
        from ..loader import read_json_file, resolve_model_path

        return ModelConfig.from_hf(read_json_file(resolve_model_path(args.model) / "config.json"))
    from ..presets import from_name

    return from_name(getattr(args, "preset", None) or DEFAULT_PRESET.get(device.type, "llada-tiny")).config


_CEILINGS: dict[tuple, dict] = {}


def ceilings(device: torch.device, quick: bool) -> dict:
    """The device's measured ceilings (:func:`common.measure_ceilings`), measured once per process; a smaller copy
    on the CPU when ``quick``."""
    key = (str(device), quick and device.type == "cpu")
    if key not in _CEILINGS:
        _CEILINGS[key] = common.measure_ceilings(device, copy_bytes=(32 << 20) if key[1] else 2 << 30)
    return _CEILINGS[key]
