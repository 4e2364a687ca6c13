"""Hugging Face Hub names for model folders: ``ORG/NAME`` or ``ORG/NAME@REVISION`` resolves to a snapshot folder of
the local Hub cache, downloading (when online) only the files the loader reads.

The rule (:func:`parse_hub_name`): a string is tried on the Hub only when no file or folder of that path exists,
it has exactly one ``/`` (before an optional ``@REVISION``), does not start with ``.``, ``/`` or ``~``, holds no
``\\``, both parts are repo-id words (letters, digits, ``-``, ``_``, ``.``), and its first part is not an existing
local folder (so ``models/llada-tiny`` with a ``models/`` folder but no ``llada-tiny`` in it stays a missing
local folder). ``HF_HUB_OFFLINE=1`` reads the cache only. The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``,
else ``~/.cache/huggingface/hub``, read when a name is resolved. ``huggingface_hub`` is optional (``pip install
'diffuse-engine[hub]'``) and imported only here, only when a Hub name is resolved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

# What the loader, the tokenizer and the generation defaults read; not .bin / .pt / .gguf duplicates of the weights.
HUB_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "special_tokens_map.json",
             "generation_defaults.json")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = ("1", "ON", "YES", "TRUE")
# Snapshot folders resolved online in this process, so that a name given twice asks the Hub once.
_resolved: dict[tuple[str, str | None, str], Path] = {}


def parse_hub_name(name: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` is to be looked up on the Hub by the rule above, else None."""
    if not isinstance(name, str) or name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists():
        return None
    repo_id, at, revision = name.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_WORD.fullmatch(p) for p in parts) or Path(parts[0]).is_dir():
        return None
    if at and (not revision or any(c.isspace() for c in revision)):
        return None
    return repo_id, revision or None


def hub_cache_dir() -> Path:
    """The Hub cache folder that the environment names now (huggingface_hub reads it once, at its import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids downloads, read now; unset, whatever
    ``huggingface_hub.constants.HF_HUB_OFFLINE`` says."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_version() -> tuple[int, ...] | None:
    try:
        import huggingface_hub
    except ImportError:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", huggingface_hub.__version__)[:2])


def _cli() -> str:
    """The download command line tool of the installed huggingface_hub: ``hf`` since 0.34, else huggingface-cli."""
    version = _hub_version()
    return "huggingface-cli" if version is not None and version < (0, 34) else "hf"


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The command that puts ``repo_id`` into the Hub cache."""
    cmd = f"{_cli()} download {repo_id}" + (f" --revision {revision}" if revision else "")
    return cmd if _hub_version() is not None else f"pip install 'diffuse-engine[hub]' && {cmd}"


def _failure(exc: Exception, revision: str | None, cache: Path, offline: bool) -> str:
    """What went wrong, from the names of the exception's classes (they vary across huggingface_hub versions)."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    login = "hf auth login" if _cli() == "hf" else "huggingface-cli login"
    if "IncompleteSnapshotError" in kinds:
        return f"is only partly in the Hub cache {cache}"
    if offline or "LocalEntryNotFoundError" in kinds:
        return f"is not in the Hub cache {cache} ({'HF_HUB_OFFLINE is set' if offline else 'the Hub is unreachable'})"
    if "GatedRepoError" in kinds:
        why = f"is gated (accept its terms on huggingface.co, then log in with `{login}` or set HF_TOKEN)"
    elif "RevisionNotFoundError" in kinds:
        why = f"has no revision {revision!r}"
    elif "RepositoryNotFoundError" in kinds:
        why = f"was not found on the Hub (a private one needs `{login}` or HF_TOKEN)"
    elif "HFValidationError" in kinds:
        why = "is not a valid repo id"
    else:
        why = f"could not be fetched ({type(exc).__name__})"
    return f"{why} and is not in the Hub cache {cache}"


def snapshot_folder(name: str, repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: main) in the Hub cache, downloaded first when
    online (only :data:`HUB_FILES`); a :class:`CheckpointError` with one sentence (the repo id, the cache folder
    and the download command) when neither the Hub nor the cache has it. ``name`` is what the user wrote."""
    cache, offline = hub_cache_dir(), hub_offline()
    key = (repo_id, revision, str(cache))
    if not offline and key in _resolved:
        return _resolved[key]
    head = f"{name} is not a local folder, and as a Hugging Face Hub model it"
    tail = f"download it with `{download_command(repo_id, revision)}` or pass a model folder."
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{head} needs huggingface_hub, which is not installed: {tail}") from None
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                                        allow_patterns=list(HUB_FILES), local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - network, auth and cache errors all become one sentence
        raise CheckpointError(f"{head} {_failure(exc, revision, cache, offline)}: {tail}") from None
    if not offline:
        _resolved[key] = folder
    return folder
