"""Hugging Face Hub names (``ORG/NAME[@REVISION]``) wherever a model folder is accepted, without any network: a fake
Hub cache (``models--org--tiny/refs/main`` + ``snapshots/<commit>/``) read with ``HF_HUB_OFFLINE=1``, and the
online path with ``huggingface_hub.snapshot_download`` replaced by a recorder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffuse_engine import LLM, SamplingParams, hub, loader
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.entrypoints.cli import main
from diffuse_engine.errors import CheckpointError
from diffuse_engine.loader import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PARAMS = SamplingParams(gen_length=8, block_length=8, steps=4, temperature=0.0)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub cache holding ``org/tiny`` (a random llada-tiny folder) at :data:`COMMIT`, which ``main`` points to."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    write_random_checkpoint(repo / "snapshots" / COMMIT, "llada-tiny")
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub, "_resolved", {})
    return hub_cache


@pytest.fixture
def online(hub_cache, monkeypatch) -> list[dict]:
    """The arguments of every ``snapshot_download`` call; each returns the fake snapshot."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls: list[dict] = []

    def fake(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(hub_cache / "models--org--tiny" / "snapshots" / COMMIT)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub, "_resolved", {})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.mark.parametrize("name, parsed", [
    ("org/tiny", ("org/tiny", None)),
    ("GSAI-ML/LLaDA-8B-Instruct", ("GSAI-ML/LLaDA-8B-Instruct", None)),
    (f"org/tiny@{COMMIT}", ("org/tiny", COMMIT)),
    ("org/tiny@v1.0", ("org/tiny", "v1.0")),
    ("addition", None), ("./org/tiny", None), ("/org/tiny", None), ("~/tiny", None), ("org/tiny/x", None),
    ("org/", None), ("org\\tiny", None), ("org/ti ny", None), ("org/tiny@", None), ("org/tiny@a b", None),
])
def test_which_names_are_hub_names(name, parsed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_name(name) == parsed


def test_a_missing_folder_under_an_existing_one_stays_a_local_path(tmp_path, monkeypatch):
    """``models/llada-tiny`` with a ``models/`` folder is a missing local folder: today's error, no Hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(loader, "snapshot_folder", lambda *a: pytest.fail("the Hub was asked"))
    assert hub.parse_hub_name("models/llada-tiny") is None
    with pytest.raises(CheckpointError, match=r"models/llada-tiny does not exist"):
        LLM("models/llada-tiny", device="cpu")


def test_llm_loads_a_cached_hub_name_offline(offline):
    snapshot = offline / "models--org--tiny" / "snapshots" / COMMIT
    assert resolve_model_path("org/tiny") == snapshot
    assert resolve_model_path(f"org/tiny@{COMMIT}") == snapshot
    out = LLM("org/tiny", device="cpu").generate([[1, 2, 3]], PARAMS)[0]
    assert len(out.token_ids) == 8 and out.nfe == 4
    again = LLM(f"org/tiny@{COMMIT}", device="cpu").generate([[1, 2, 3]], PARAMS)[0]
    assert again.token_ids == out.token_ids


def test_cli_generate_takes_a_hub_name(offline, capsys):
    args = ["generate", "--model", "org/tiny", "--prompt-ids", "1,2,3", "--json", "--gen-length", "8", "--steps", "4"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 8 and record["model"]["path"].endswith(COMMIT)
    assert main([*args[:2], f"org/tiny@{COMMIT}", *args[3:]]) == 0


def test_a_missing_repo_names_the_cache_and_the_download_command(offline, capsys):
    with pytest.raises(CheckpointError) as info:
        LLM("org/missing", device="cpu")
    message = str(info.value)
    assert "org/missing" in message and str(offline) in message and "HF_HUB_OFFLINE" in message
    assert "download org/missing`" in message
    assert main(["generate", "--model", "org/missing@v2", "--prompt-ids", "1,2,3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffuse-engine: error: org/missing@v2 is not a local folder")
    assert str(offline) in err and "download org/missing --revision v2`" in err and "Traceback" not in err


def test_online_downloads_only_what_the_loader_reads(online, hub_cache):
    out = LLM("org/tiny@v1", device="cpu").generate([[1, 2, 3]], PARAMS)[0]
    assert len(out.token_ids) == 8
    assert len(online) == 1  # LLM resolves the name once
    call = online[0]
    assert call["repo_id"] == "org/tiny" and call["revision"] == "v1" and call["local_files_only"] is False
    assert Path(call["cache_dir"]) == hub_cache
    patterns = call["allow_patterns"]
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= set(patterns)
    assert not any(p.endswith((".bin", ".pt", ".pth", ".gguf", "*")) for p in patterns)
    resolve_model_path("org/tiny@v1")
    assert len(online) == 1  # asked once per process
    resolve_model_path("org/tiny")
    assert online[-1]["revision"] is None


def _error(class_name: str) -> Exception:
    """An instance of huggingface_hub's exception ``class_name`` without its version-specific constructor."""
    from huggingface_hub import errors

    cls = getattr(errors, class_name)
    exc = cls.__new__(cls)
    Exception.__init__(exc, class_name)
    return exc


@pytest.mark.parametrize("class_name, reason", [
    ("RepositoryNotFoundError", "was not found on the Hub"),
    ("GatedRepoError", "is gated"),
    ("RevisionNotFoundError", "has no revision 'v1'"),
    ("LocalEntryNotFoundError", "the Hub is unreachable"),
])
def test_online_failures_are_one_sentence(class_name, reason, online, hub_cache, monkeypatch):
    import huggingface_hub

    def fail(repo_id, **kwargs):
        raise _error(class_name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError) as info:
        resolve_model_path("org/gone@v1")
    message = str(info.value)
    assert reason in message and str(hub_cache) in message and "download org/gone --revision v1`" in message
    assert "\n" not in message


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_resolved", {})
    with pytest.raises(CheckpointError, match=r"huggingface_hub, which is not installed: download it with `pip "
                                              r"install 'diffuse-engine\[hub\]' && hf download org/tiny`"):
        resolve_model_path("org/tiny")


def test_shipped_names_and_local_folders_never_ask_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "snapshot_folder", lambda *a: pytest.fail("the Hub was asked"))
    assert resolve_model_path("addition").name == "addition"
    folder = write_random_checkpoint(tmp_path / "org" / "tiny", "llada-tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/tiny") == Path("org/tiny") and folder.is_dir()
