"""Bad model folders, one broken thing at a time: every config key of the wrong type or range, NaN and inf
weights, corrupt or truncated safetensors, broken shard indexes, wrong, missing and extra tensors, for LLaDA,
Dream and SDAR. Each must raise CheckpointError naming the key, tensor or file at fault, and no absolute path;
a good folder must still load and generate the same tokens afterwards."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffuse_engine.checkpoint import FILE_MODE, write_random_checkpoint
from diffuse_engine.errors import CheckpointError
from diffuse_engine.loader import CHECK_WEIGHTS_ENV, load_model
from diffuse_engine.sampling_params import SamplingParams

FAMILIES = {"llada": "llada-tiny", "dream": "dream-tiny", "sdar": "sdar-tiny"}
LLADA_Q = "model.transformer.blocks.0.q_proj.weight"
DREAM_UP = "model.layers.0.mlp.up_proj.weight"
SDAR_K = "model.layers.1.self_attn.k_proj.weight"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One valid folder per family (and a sharded LLaDA one), written once and copied per case."""
    root = tmp_path_factory.mktemp("good")
    out = {family: write_random_checkpoint(root / family, preset, seed=0) for family, preset in FAMILIES.items()}
    out["llada-sharded"] = write_random_checkpoint(root / "sharded", "llada-tiny", seed=0, shard_size=60_000)
    return out


def _tokens(folder: Path) -> list[list[int]]:
    from diffuse_engine.entrypoints.llm import LLM

    llm = LLM(folder, device="cpu")
    params = SamplingParams(gen_length=16, block_length=8, steps=8)
    return [out.token_ids for out in llm.generate([[3, 4, 5], [9, 10]], params)]


_BEFORE: dict[str, list[list[int]]] = {}


def test_a_good_folder_generates_before_the_bad_loads(good: dict[str, Path]) -> None:
    _BEFORE["llada"] = _tokens(good["llada"])
    assert all(len(t) == 16 for t in _BEFORE["llada"])


# ------------------------------------------------------------------------------------------------ breakers
def edit_config(**changes: object) -> Callable[[Path], None]:
    """Set (or, with the value ``...``, delete) config.json keys."""
    def breaker(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is ...:
                data.pop(key, None)
            else:
                data[key] = value
        (folder / "config.json").write_text(json.dumps(data))
    return breaker


def config_text(key: str, literal: str) -> Callable[[Path], None]:
    """Set a config.json key to a literal JSON text (``1e400``, ``NaN``) that json.dumps would not write."""
    def breaker(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        data[key] = "@@"
        (folder / "config.json").write_text(json.dumps(data).replace('"@@"', literal))
    return breaker


def write_file(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None], file: str = WEIGHTS) -> Callable[[Path], None]:
    def breaker(folder: Path) -> None:
        tensors = load_file(str(folder / file))
        edit(tensors)
        save_file(tensors, str(folder / file))
    return breaker


def poke(name: str, value: float, dtype: torch.dtype | None = None) -> Callable[[Path], None]:
    """Set three elements of one tensor to ``value`` (stored in ``dtype`` when given)."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[name].clone() if dtype is None else tensors[name].to(dtype)
        t.view(-1)[[0, 7, 11]] = value
        tensors[name] = t
    return edit_tensors(edit)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def raw_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def breaker(folder: Path) -> None:
        file = folder / WEIGHTS
        file.write_bytes(edit(file.read_bytes()))
    return breaker


def ff_in_data(name: str) -> Callable[[bytes], bytes]:
    """Overwrite one tensor's data with 0xFF bytes, as random bytes would: 0xFFFFFFFF is a NaN in fp32 (and
    0xFFFF in bf16/fp16), so the case is deterministic. Random bytes that happen to decode to finite values
    cannot be told from weights; only their NaN/inf part is detectable."""
    def edit(data: bytes) -> bytes:
        header, body = _split(data)
        start, end = header[name]["data_offsets"]
        n = len(data) - len(body)
        return data[:n + start] + b"\xff" * (end - start) + data[n + end:]
    return edit


def offsets_past_end(data: bytes) -> bytes:
    header, body = _split(data)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    return _join(header, body)


def garbage_header(data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    return data[:8] + bytes(range(256)) * (n // 256) + b"\x00" * (n % 256) + data[8 + n:]


def edit_index(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def breaker(folder: Path) -> None:
        index = json.loads((folder / INDEX).read_text())
        out = edit(index)
        (folder / INDEX).write_text(json.dumps(index if out is None else out))
    return breaker


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*-of-*.safetensors"))[0]


def unlink_second_shard(folder: Path) -> None:
    sorted(folder.glob("model-*-of-*.safetensors"))[1].unlink()


def drop_from_first_shard(folder: Path) -> None:
    shard = _first_shard(folder)
    tensors = load_file(str(shard))
    tensors.pop("model.transformer.wte.weight")
    save_file(tensors, str(shard))


# ------------------------------------------------------------------------------------------------- cases
# id: (family folder, breaker, regex the message must match: the key, tensor or file at fault)
CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # LLaDA config.json: types
    "llada n_layers string": ("llada", edit_config(n_layers="four"),
                              r"^config\.json: n_layers must be a positive integer, got 'four'\.$"),
    "llada n_layers bool": ("llada", edit_config(n_layers=True), r"^config\.json: n_layers .* got True"),
    "llada n_layers fraction": ("llada", edit_config(n_layers=2.5), r"n_layers must be a positive integer, got 2\.5"),
    "llada mask id string": ("llada", edit_config(mask_token_id="261"),
                             r"mask_token_id must be a non-negative integer, got '261'"),
    "llada weight_tying string": ("llada", edit_config(weight_tying="false"), r"weight_tying must be true or false"),
    "llada torch_dtype number": ("llada", edit_config(torch_dtype=32), r"torch_dtype must be a string"),
    # LLaDA config.json: ranges
    "llada n_layers zero": ("llada", edit_config(n_layers=0), r"n_layers must be a positive integer, got 0"),
    "llada d_model negative": ("llada", edit_config(d_model=-64), r"d_model must be a positive integer, got -64"),
    "llada rope_theta 1e400": ("llada", config_text("rope_theta", "1e400"),
                               r"rope_theta must be a finite positive number, got inf"),
    "llada rope_theta zero": ("llada", edit_config(rope_theta=0), r"rope_theta must be a finite positive number"),
    "llada rms_norm_eps negative": ("llada", edit_config(rms_norm_eps=-1e-5), r"rms_norm_eps must be a finite posi"),
    "llada rms_norm_eps NaN": ("llada", config_text("rms_norm_eps", "NaN"), r"rms_norm_eps must be .* got nan"),
    "llada heads do not divide d_model": ("llada", edit_config(n_heads=5, n_kv_heads=5),
                                          r"d_model \(64\) must be divisible by n_heads \(5\)"),
    "llada kv heads do not divide heads": ("llada", edit_config(n_kv_heads=3),
                                           r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
    "llada mask id = vocab": ("llada", edit_config(mask_token_id=320),
                              r"mask_token_id \(320\) is not a token id below embedding_size \(320\)"),
    "llada vocab below mask id": ("llada", edit_config(embedding_size=200, vocab_size=200),
                                 r"mask_token_id \(261\) is not a token id below embedding_size \(200\)"),
    "llada eos id negative": ("llada", edit_config(eos_token_id=-1), r"eos_token_id must be a non-negative integer"),
    "llada missing n_heads": ("llada", edit_config(n_heads=...), r"config\.json lacks the required key 'n_heads'"),
    "llada null d_model": ("llada", edit_config(d_model=None), r"lacks the required key 'd_model'"),
    # config.json as a file
    "config not JSON": ("llada", write_file("config.json", '{"d_model": 64,'), r"^config\.json is not valid JSON"),
    "config a list": ("llada", write_file("config.json", "[1, 2]"), r"^config\.json must hold a JSON object"),
    "config not UTF-8": ("llada", lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"),
                         r"^config\.json is not valid UTF-8"),
    # Dream config.json
    "dream layers string": ("dream", edit_config(num_hidden_layers="four"),
                            r"num_hidden_layers must be a positive integer, got 'four'"),
    "dream kv heads do not divide heads": ("dream", edit_config(num_key_value_heads=3),
                                           r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
    "dream missing mask id": ("dream", edit_config(mask_token_id=...), r"lacks the required key 'mask_token_id'"),
    "dream hidden_size zero": ("dream", edit_config(hidden_size=0), r"hidden_size must be a positive integer"),
    "dream tie flag an int": ("dream", edit_config(tie_word_embeddings=1), r"tie_word_embeddings must be true or fa"),
    "dream rope_theta infinity": ("dream", config_text("rope_theta", "Infinity"), r"rope_theta must be a finite"),
    # SDAR config.json
    "sdar odd head_dim": ("sdar", edit_config(head_dim=31), r"head_dim \(31\) must be even"),
    "sdar block_size zero": ("sdar", edit_config(block_size=0), r"block_size must be a positive integer, got 0"),
    "sdar missing head_dim": ("sdar", edit_config(head_dim=...), r"lacks the required key 'head_dim'"),
    "sdar rope_theta string": ("sdar", edit_config(rope_theta="1e6"), r"rope_theta must be a finite positive num"),
    "sdar heads bool": ("sdar", edit_config(num_attention_heads=True),
                        r"num_attention_heads must be a positive integer, got True"),
    "sdar pad id = vocab": ("sdar", edit_config(pad_token_id=320), r"pad_token_id \(320\) is not a token id below"),
    # weights: values
    "llada NaN weight": ("llada", poke(LLADA_Q, float("nan")),
                         rf"^model\.safetensors: tensor '{LLADA_Q}' holds 3 non-finite value\(s\) \(NaN or inf\)"),
    "dream inf weight": ("dream", poke(DREAM_UP, float("inf")), rf"^model\.safetensors: tensor '{DREAM_UP}' holds 3"),
    "sdar -inf bf16 weight": ("sdar", poke(SDAR_K, float("-inf"), torch.bfloat16),
                              rf"^model\.safetensors: tensor '{SDAR_K}' holds 3 non-finite"),
    "llada 0xFF bytes in data": ("llada", raw_bytes(ff_in_data(LLADA_Q)),
                                 rf"tensor '{LLADA_Q}' holds 4096 non-finite"),
    "dream integer tensor": ("dream", poke(DREAM_UP, 1, torch.int32), rf"tensor '{DREAM_UP}' has dtype torch\.int32"),
    # weights: the file
    "truncated file": ("llada", raw_bytes(lambda b: b[:-1000]), r"^model\.safetensors is not a readable safetensors"),
    "header length past the end": ("llada", raw_bytes(lambda b: struct.pack("<Q", 2 ** 40) + b[8:]),
                                   r"^model\.safetensors is not a readable safetensors"),
    "garbage header": ("dream", raw_bytes(garbage_header), r"^model\.safetensors is not a readable safetensors"),
    "offsets past the end": ("sdar", raw_bytes(offsets_past_end), r"^model\.safetensors is not a readable"),
    "empty file": ("sdar", raw_bytes(lambda b: b""), r"^model\.safetensors is not a readable safetensors"),
    # weights: names and shapes
    "wrong shape": ("sdar", edit_tensors(lambda t: t.update({SDAR_K: torch.zeros(32, 64)})),
                    rf"^model\.safetensors: tensor '{SDAR_K}' has shape \(32, 64\) but the config implies \(64, 64\)"),
    "missing tensor": ("dream", edit_tensors(lambda t: t.pop(DREAM_UP)),
                       rf"lacks 1 tensor\(s\) that the config requires: {DREAM_UP}"),
    "unexpected tensor": ("llada", edit_tensors(lambda t: t.update({"model.transformer.blocks.9.x": torch.zeros(2)})),
                          r"holds 1 tensor\(s\) that the config does not imply: model\.transformer\.blocks\.9\.x"),
    # shards and the index
    "missing shard": ("llada-sharded", unlink_second_shard,
                      rf"^{INDEX} names the shard model-00002-of-\d{{5}}\.safetensors, which does not exist"),
    "index not JSON": ("llada-sharded", write_file(INDEX, '{"weight_map": '), rf"^{INDEX} is not valid JSON"),
    "index without weight_map": ("llada-sharded", edit_index(lambda i: i.pop("weight_map")),
                                 rf"^{INDEX} has no 'weight_map' object"),
    "index weight_map a list": ("llada-sharded", edit_index(lambda i: {"weight_map": list(i["weight_map"])}),
                                rf"^{INDEX} has no 'weight_map' object"),
    "index shard outside the folder": ("llada-sharded",
                                       edit_index(lambda i: i["weight_map"].update({LLADA_Q: "../model.safetensors"})),
                                       rf"^{INDEX} names the shard '\.\./model\.safetensors', which is not a file"),
    "index names a tensor the shard lacks": ("llada-sharded", drop_from_first_shard,
                                             rf"{INDEX} assigns tensor 'model\.transformer\.wte\.weight' to "
                                             rf"model-00001-of-\d{{5}}\.safetensors, which does not hold it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_folder_raises_a_named_checkpoint_error(tmp_path: Path, good: dict[str, Path], case: str) -> None:
    family, breaker, words = CASES[case]
    folder = shutil.copytree(good[family], tmp_path / "m")
    breaker(folder)
    with pytest.raises(CheckpointError, match=words) as info:
        load_model(folder)
    assert isinstance(info.value, ValueError)
    assert str(tmp_path) not in str(info.value), "messages name files by their name inside the folder"


def test_integral_floats_are_accepted(tmp_path: Path, good: dict[str, Path]) -> None:
    folder = shutil.copytree(good["llada"], tmp_path / "m")
    edit_config(n_layers=2.0, max_sequence_length=512.0, rope_theta=500000)(folder)
    _, config, _ = load_model(folder)
    assert config.num_layers == 2 and isinstance(config.num_layers, int) and config.rope_theta == 500000.0


# ---------------------------------------------------------------------------------- turning the check off
def test_the_weight_check_can_be_turned_off(tmp_path: Path, good: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shutil.copytree(good["llada"], tmp_path / "m")
    poke(LLADA_Q, float("nan"))(folder)
    model, _, _ = load_model(folder, check_weights=False)
    assert model.state_dict()[LLADA_Q].isnan().sum() == 3
    monkeypatch.setenv(CHECK_WEIGHTS_ENV, "0")
    load_model(folder)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(folder, check_weights=True)  # the keyword wins over the environment
    monkeypatch.setenv(CHECK_WEIGHTS_ENV, "1")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(folder)
    monkeypatch.setenv(CHECK_WEIGHTS_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{CHECK_WEIGHTS_ENV}='maybe' is not understood"):
        load_model(folder)


def test_a_cast_to_float16_that_overflows_is_refused(tmp_path: Path, good: dict[str, Path]) -> None:
    folder = shutil.copytree(good["dream"], tmp_path / "m")
    poke(DREAM_UP, 1e6)(folder)  # finite in the fp32 file, inf in float16
    assert load_model(folder, dtype="bfloat16")[0].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match=rf"'{DREAM_UP}' holds 3 value\(s\) beyond the range of float16"):
        load_model(folder, dtype="float16")


# ---------------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("shard_size", [None, 60_000])
def test_written_files_are_world_readable_whatever_the_umask(tmp_path: Path, shard_size: int | None) -> None:
    old = os.umask(0o077)
    try:
        folder = write_random_checkpoint(tmp_path / "m", "sdar-tiny", shard_size=shard_size)
    finally:
        os.umask(old)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert len(files) == (4 if shard_size is None else 4 + len(list(folder.glob("model-*-of-*.safetensors"))))
    assert shard_size is None or len(files) > 6
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(FILE_MODE) for p in files}


# --------------------------------------------------------------------------------------- nothing left broken
def test_a_good_folder_still_generates_the_same_tokens(good: dict[str, Path]) -> None:
    """Runs last (pytest keeps file order): after every bad load above, the good folder still loads and generates
    the tokens it generated before them."""
    before = _BEFORE.setdefault("llada", _tokens(good["llada"]))
    assert _tokens(good["llada"]) == before
