"""Load a LLaDA, Dream, SDAR, LLaDA-MoE or LLaDA2 model folder in the Hugging Face layout: ``config.json``,
safetensors weights (one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``) and, optionally,
the tokenizer. Mixture-of-experts checkpoints hold each expert's projections under its own name; they are stacked
into the model's ``[E, ...]`` parameters as they are read.

Every problem with the folder raises :class:`~diffuse_engine.errors.CheckpointError` with a sentence that
names the file (and tensor or config key) at fault, before any weight reaches the model. Files are named by
their name inside the folder, never by an absolute path, so that a message may be shown to a remote client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import config_moe
from .config import ModelConfig
from .errors import CheckpointError
from .hub import parse_hub_name, snapshot_folder
from .models import DiffusionLM, build_model
from .models.moe import ExpertStacker, checkpoint_shapes, stacked_experts
from .tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
# Set to 0 (or false/no/off) to skip the NaN/inf check of the weights when load_model is not told either way.
CHECK_WEIGHTS_ENV = "DIFFUSE_CHECK_WEIGHTS"
# Elements per slice of the exact non-finite count, so that its boolean temporary stays small.
_FINITE_CHUNK = 1 << 22

DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64,
}

# The LM head of each family; a checkpoint of a tied-embedding config may still hold it (it is ignored).
_HEAD_TENSOR = {"llada": "model.transformer.ff_out.weight", "dream": "lm_head.weight", "sdar": "lm_head.weight",
                "llada_moe": "lm_head.weight", "llada2": "lm_head.weight"}
# Buffers that older exports persisted and that the engine recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# End-of-turn token of each family's chat format, for configs that do not name it.
_EOT_TOKEN = {"llada": "<|eot_id|>", "dream": "<|im_end|>", "sdar": "<|im_end|>", "llada_moe": "<|role_end|>",
              "llada2": "<|role_end|>"}
# Mask token of each family whose config.json may omit ``mask_token_id`` (JetLM/SDAR-4B-Chat does; LLaDA-MoE's and
# LLaDA2's never name it).
_MASK_TOKEN = {"sdar": "<|MASK|>", "llada_moe": "<|mask|>", "llada2": "<|mask|>"}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, ``"float64"`` (also with
    a ``torch.`` prefix) or one of those torch dtypes."""
    if isinstance(value, torch.dtype):
        if value in DTYPE_ALIASES.values():
            return value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPE_ALIASES:
            return DTYPE_ALIASES[key]
    raise ValueError(f"dtype {value!r} is not supported; use one of {', '.join(DTYPE_ALIASES)} or the matching "
                     f"torch dtype.")


def read_json_file(file: Path) -> Any:
    """The parsed JSON of ``file``; errors name the file by its base name only."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{file.name} is not valid UTF-8 text, so it cannot hold JSON.") from None
    except OSError as exc:
        raise CheckpointError(f"Cannot read {file.name}: {exc.strerror or type(exc).__name__}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                              f"{exc.colno}).") from None
    except RecursionError:
        raise CheckpointError(f"{file.name} is not valid JSON (nested too deeply).") from None


def _read_config(folder: Path, tokenizer: Tokenizer | None = None) -> tuple[ModelConfig, dict]:
    """The config and the raw ``config.json`` dict. A family whose config.json never names its mask token
    (LLaDA-MoE, LLaDA2) is parsed with the tokenizer's ``<|mask|>`` id when the folder has one."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"Model folder {folder} has no {CONFIG_FILE}.")
    raw = read_json_file(file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{CONFIG_FILE} must hold a JSON object, not {type(raw).__name__}.")
    parsed = dict(raw)
    if tokenizer is not None and "mask_token_id" not in raw and config_moe.detect(raw) is not None:
        mask = tokenizer.token_to_id("<|mask|>")
        if mask is not None:
            parsed["mask_token_id"] = mask
    try:
        return ModelConfig.from_hf(parsed), raw
    except ValueError as exc:
        message = str(exc)  # config messages name config.json and the key; others get the file name in front
        raise CheckpointError(message if message.startswith(CONFIG_FILE) else f"{CONFIG_FILE}: {message}") from None


def check_weights_default() -> bool:
    """Whether :func:`load_model` checks weights for NaN/inf when not told: true unless the environment variable
    ``DIFFUSE_CHECK_WEIGHTS`` is ``0``, ``false``, ``no`` or ``off``."""
    value = os.environ.get(CHECK_WEIGHTS_ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(f"{CHECK_WEIGHTS_ENV}={value!r} is not understood; use 1 or 0.")


def _count_non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN/inf elements of a floating-point tensor, cheaply when there are none.

    A sum is finite only if every term is (NaN and inf propagate through addition), and it costs one pass
    without a temporary; only when it is not finite (a non-finite element, or an overflow of finite ones) are
    the elements counted exactly, in slices so that the boolean temporary stays small."""
    if torch.isfinite(tensor.sum()).item():
        return 0
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(part)).sum()) for part in flat.split(_FINITE_CHUNK))


def _weight_files(folder: Path) -> list[tuple[Path, list[str] | None]]:
    """The safetensors files to read, each with the tensor names the index assigns to it (None: all)."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [(single, None)]
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (it holds {', '.join(others[:3])}: only safetensors weights are supported)" if others else ""
        raise CheckpointError(f"Model folder {folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}.")
    index = read_json_file(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str)
                                                                     for v in weight_map.values()):
        raise CheckpointError(f"{INDEX_FILE} has no 'weight_map' object mapping tensor names to file names.")
    files: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        files.setdefault(file_name, []).append(name)
    out = []
    for file_name, names in files.items():
        shard = folder / file_name
        if Path(file_name).name != file_name or file_name in ("", ".", ".."):
            raise CheckpointError(f"{INDEX_FILE} names the shard {file_name!r}, which is not a file name inside the "
                                  f"model folder.")
        if not shard.is_file():
            raise CheckpointError(f"{INDEX_FILE} names the shard {file_name}, which does not exist in the model "
                                  f"folder.")
        out.append((shard, names))
    return out


def _skipped(name: str, ignored: set[str]) -> bool:
    return name in ignored or name.endswith(_IGNORED_SUFFIXES)


def _read_file(file: Path, names: list[str] | None, expected: dict[str, torch.Size], ignored: set[str],
               found: dict[str, str], check: bool, shard=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the expected tensors of one safetensors file, recording every name it holds in ``found``; with
    ``check``, a tensor holding NaN or inf raises. ``shard``: read only each tensor's slice that
    ``shard.slice_of(name)`` names (``(dim, lo, hi)``; None: the whole tensor)."""
    where = file.name
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{where} is not a readable safetensors file (corrupt header or truncated data): "
                              f"{_scrub(exc, file)}.") from None
    with handle:
        available = set(handle.keys())
        for name in names if names is not None else sorted(available):
            if name not in available:
                raise CheckpointError(f"{INDEX_FILE} assigns tensor {name!r} to {where}, which does not hold it.")
            if name in found:
                raise CheckpointError(f"Tensor {name!r} is stored twice, in {found[name]} and {where}.")
            found[name] = where
            if _skipped(name, ignored) or name not in expected:
                continue  # unexpected names are reported together once every file is read
            shape = torch.Size(handle.get_slice(name).get_shape())
            if shape != expected[name]:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(shape)} but the config implies "
                                      f"{tuple(expected[name])}.")
            try:
                tensor = _read_tensor(handle, name, shard)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{where}: tensor {name!r} cannot be read: {_scrub(exc, file)}.") from None
            if not tensor.is_floating_point():
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; weights must be floating "
                                      f"point.")
            if check and (bad := _count_non_finite(tensor)):
                raise CheckpointError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf).")
            yield name, tensor


def _read_tensor(handle, name: str, shard) -> torch.Tensor:
    """Tensor ``name``, or the ranges of one dim that ``shard.slice_of(name)`` names, read and concatenated."""
    cut = shard.slice_of(name) if shard is not None else None
    if cut is None:
        return handle.get_tensor(name)
    dim, *rest = cut  # (dim, lo, hi) or (dim, ((lo, hi), ...))
    part = handle.get_slice(name)
    pieces = [part[lo:hi] if dim == 0 else part[:, lo:hi] for lo, hi in ([rest] if len(rest) == 2 else rest[0])]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _scrub(exc: Exception, file: Path) -> str:
    """The text of a reader's exception with the file's full path cut down to its name."""
    return str(exc).replace(str(file), file.name).rstrip(".")


def _iter_tensors(files: list[tuple[Path, list[str] | None]], expected: dict[str, torch.Size],
                  ignored: set[str], check: bool = True, shard=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the checkpoint's tensors one at a time after checking names and shapes against ``expected`` (and,
    with ``check``, that every value is finite)."""
    found: dict[str, str] = {}
    for file, names in files:
        yield from _read_file(file, names, expected, ignored, found, check, shard)
    where = files[0][0].name if len(files) == 1 else INDEX_FILE
    unexpected = sorted(n for n in found if n not in expected and not _skipped(n, ignored))
    if unexpected:
        raise CheckpointError(f"The checkpoint ({where}) holds {len(unexpected)} tensor(s) that the config does not "
                              f"imply: {_names(unexpected)}.")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"The checkpoint ({where}) lacks {len(missing)} tensor(s) that the config requires: "
                              f"{_names(missing)}.")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _default_dtype(device: torch.device, config: ModelConfig, raw: dict) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls are slow on most CPUs
    try:
        return parse_dtype(raw.get("torch_dtype") or config.torch_dtype)
    except ValueError:
        return torch.bfloat16


# The trained tiny models shipped with the package (:mod:`diffuse_engine.quality.zoo`): one folder each.
ZOO_DIR = Path(__file__).resolve().parent / "quality" / "zoo"


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every shipped model."""
    return {p.name: p for p in sorted(ZOO_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_model_path(path: str | Path) -> Path:
    """The folder of ``path``: itself when it exists; otherwise the shipped model of that name, if there is one
    (see :mod:`diffuse_engine.quality.zoo`), or the Hub cache's snapshot of a Hugging Face Hub name ``ORG/NAME``
    or ``ORG/NAME@REVISION``, downloaded when online (see :mod:`diffuse_engine.hub` for the rule and the errors)."""
    folder = Path(path)
    if folder.exists() or not isinstance(path, str) or "\\" in path:
        return folder
    if "/" not in path:
        return shipped_models().get(path, folder)
    hub_name = parse_hub_name(path)
    return snapshot_folder(path, *hub_name) if hub_name else folder


def read_model_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a model folder (or shipped / Hub name), without its weights."""
    folder = resolve_model_path(path)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder {folder} does not exist or is not a directory.")
    return _read_config(folder)[0]


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               check_weights: bool | None = None, shard=None) -> tuple[DiffusionLM, ModelConfig, Tokenizer | None]:
    """Load the model folder ``path`` onto ``device``.

    Returns ``(model, config, tokenizer)``: the model in eval mode without gradients, its config (with
    ``eot_token_id`` taken from the tokenizer when ``config.json`` does not set it, and likewise SDAR's
    ``mask_token_id`` from ``<|MASK|>``), and the tokenizer, or None
    when the folder has no ``tokenizer.json`` (a weights-only folder is valid). ``dtype`` None means the
    config's ``torch_dtype`` on accelerators and float32 on the CPU. Weights are read one tensor at a time,
    cast to ``dtype`` and moved to ``device``; the model is first built on the meta device so that nothing is
    allocated twice. ``path`` may also be the name of a shipped model (see :mod:`diffuse_engine.quality.zoo`) or
    a Hugging Face Hub name (``ORG/NAME[@REVISION]``, see :func:`resolve_model_path`).

    ``check_weights``: refuse a checkpoint whose weights hold NaN or inf (a :class:`CheckpointError` naming the
    file and the tensor), also after a cast to float16 that overflows. Each tensor is checked once as it is
    read, which adds a few percent to the load time. None (the default) follows the environment variable
    ``DIFFUSE_CHECK_WEIGHTS``: the check runs unless it is ``0``; True or False decides regardless of it.

    ``shard``: one tensor-parallel rank's share (a :class:`diffuse_engine.distributed.ShardPlan`): only its slice
    of each split tensor is read from the files, and the model's parameters have the local shapes.
    """
    folder = resolve_model_path(path)
    if not folder.is_dir():
        names = ", ".join(shipped_models()) or "none"
        raise CheckpointError(f"Model folder {folder} does not exist or is not a directory (shipped models: "
                              f"{names}).")
    device = torch.device(device)
    target = parse_dtype(dtype) if dtype is not None else None
    check = check_weights_default() if check_weights is None else bool(check_weights)
    tokenizer = Tokenizer.from_dir(folder) if (folder / TOKENIZER_FILE).is_file() else None
    config, raw = _read_config(folder, tokenizer)
    target = target or _default_dtype(device, config, raw)
    files = _weight_files(folder)

    if config.eot_token_id is None and tokenizer is not None:
        eot = tokenizer.token_to_id(_EOT_TOKEN[config.arch])
        if eot is not None and eot < config.vocab_size:
            config = config.replace(eot_token_id=eot)
    if "mask_token_id" not in raw and config.arch in _MASK_TOKEN and tokenizer is not None:
        mask = tokenizer.token_to_id(_MASK_TOKEN[config.arch])
        if mask is not None and mask < config.vocab_size:
            config = config.replace(mask_token_id=mask)

    model = build_model(config, dtype=target, meta=True)
    expected = checkpoint_shapes(model)  # experts per expert, as published; stacked below
    if shard is not None:
        shard.resize_meta(model)
    ignored = {_HEAD_TENSOR[config.arch]} if config.tie_word_embeddings else set()
    stacker = ExpertStacker(stacked_experts(model))
    state = {}
    for name, tensor in _iter_tensors(files, expected, ignored, check, shard):
        source = tensor.dtype
        tensor = tensor.to(device=device, dtype=target)
        if check and target == torch.float16 and source != torch.float16 and (bad := _count_non_finite(tensor)):
            raise CheckpointError(f"Tensor {name!r} holds {bad} value(s) beyond the range of float16 (|x| > 65504); "
                                  f"load it with dtype='bfloat16' or 'float32'.")
        if name in stacker.by_name:
            if (done := stacker.add(name, tensor)) is not None:
                state[done[0]] = done[1]
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    del state
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"The checkpoint in {folder} left {_names(leftover)} uninitialised.")
    model.eval()
    model.requires_grad_(False)
    return model, config, tokenizer
