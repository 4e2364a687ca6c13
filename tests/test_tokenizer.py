"""Tokenizer wrapper, byte-level tokenizer and chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffuse_engine import presets
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.errors import CheckpointError
from diffuse_engine.tokenizer import Tokenizer, build_byte_tokenizer, bytes_to_unicode

TEXTS = [
    "Hello, world! 123",
    "  leading and trailing spaces  \n\ttabs\r\nand CRLF",
    "héllo wörld — naïve café ½ ∑ 日本語のテキスト 한국어 العربية 🙂👍🏽 e\u0301",
    "\x00\x01\x7f control bytes and <|reserved_300|> and <|not_special|>",
    "",
]


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer(build_byte_tokenizer(320, presets.from_name("llada-tiny").special_tokens))


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "\u0120"


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(tiny_tok: Tokenizer, text: str) -> None:
    ids = tiny_tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # no merges: one id per UTF-8 byte, byte b is id b
    assert tiny_tok.decode(ids) == text


def test_special_tokens_in_text_map_to_their_ids(tiny_tok: Tokenizer) -> None:
    ids = tiny_tok.encode("a<|mdm_mask|>b<|eot_id|>")
    assert ids == [97, 261, 98, 260]
    assert tiny_tok.decode(ids) == "ab"
    assert tiny_tok.decode(ids, skip_special_tokens=False) == "a<|mdm_mask|>b<|eot_id|>"


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny", "llada-8b", "dream-7b"])
def test_special_ids_are_exact_and_the_id_space_is_dense(name: str) -> None:
    preset = presets.from_name(name)
    vocab = preset.config.vocab_size
    tok = Tokenizer(build_byte_tokenizer(vocab, preset.special_tokens))
    assert tok.vocab_size == vocab
    assert sorted(tok.backend.get_vocab(with_added_tokens=True).values()) == list(range(vocab))
    for content, token_id in preset.special_tokens.items():
        assert tok.token_to_id(content) == token_id
        assert tok.encode(f"x{content}") == [ord("x"), token_id]
    assert tok.special_ids == frozenset(preset.special_tokens.values())
    free = next(i for i in range(256, vocab) if i not in preset.special_tokens.values())
    assert tok.id_to_token(free) == f"<|reserved_{free}|>"
    assert tok.token_to_id(f"<|reserved_{free}|>") == free
    assert tok.id_to_token(vocab) is None


def test_llada_8b_ids_match_the_published_tokenizer() -> None:
    tok = Tokenizer(build_byte_tokenizer(126464, presets.from_name("llada-8b").special_tokens))
    assert [tok.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>")] == [
        126080, 126081, 126336, 126348]
    assert tok.encode("hi<|mdm_mask|>") == [104, 105, 126336]


def test_decode_skips_ids_beyond_the_vocabulary(tiny_tok: Tokenizer) -> None:
    assert tiny_tok.decode([104, 320, 105, 10**6, -1, 2**40]) == "hi"
    assert tiny_tok.decode([]) == ""


@pytest.mark.parametrize("specials, words", [
    ({"<|a|>": 10}, "ids 0-255 are the bytes"),
    ({"<|a|>": 320}, "[256, 320)"),
    ({"<|a|>": 300, "<|b|>": 300}, "share the id 300"),
    ({"<|reserved_300|>": 301}, "collides"),
])
def test_build_byte_tokenizer_rejects_bad_special_ids(specials: dict[str, int], words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(")", r"\)")):
        build_byte_tokenizer(320, specials)


# ---------------------------------------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: write_random_checkpoint(root / name, name) for name in ("llada-tiny", "dream-tiny")}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_llada_chat_template(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(folders["llada-tiny"])
    assert tok.has_chat_template and tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.apply_chat_template(CONVERSATION) == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert ids[:2] == [256, 258] and ids.count(260) == 1  # bos, start_header; one eot


def test_dream_chat_template(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(folders["dream-tiny"])
    assert tok.bos_token is None and tok.eos_token == "<|endoftext|>"
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  What is 2+2?\n<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n")


def _edit_config(folder: Path, **changes: object) -> None:
    file = folder / "tokenizer_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_template_sources_and_token_forms(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "llada-tiny")
    _edit_config(folder, bos_token={"content": "<|startoftext|>", "special": True},
                 chat_template=[{"name": "tool_use", "template": "TOOLS"},
                                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}])
    tok = Tokenizer.from_dir(folder)
    assert tok.bos_token == "<|startoftext|>"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|startoftext|>x"
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}"
                                                "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    tok = Tokenizer.from_dir(folder)  # the .jinja file takes precedence
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]<|endoftext|>"
    (folder / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_unsafe_attribute_access(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "dream-tiny")
    _edit_config(folder, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="failed to render: access to attribute '__class__'.*unsafe"):
        Tokenizer.from_dir(folder).apply_chat_template([])


def test_missing_template(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "dream-tiny")
    _edit_config(folder, chat_template=None)
    tok = Tokenizer.from_dir(folder)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match=r"has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    (folder / "tokenizer_config.json").unlink()  # tokenizer.json alone is a valid tokenizer
    tok = Tokenizer.from_dir(folder)
    assert tok.bos_token is None and not tok.has_chat_template and tok.encode("<|mask|>") == [259]


def test_missing_and_corrupt_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    folder = write_random_checkpoint(tmp_path / "m", "llada-tiny")
    good = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=f"{folder} has no tokenizer.json"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer.json").write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not valid JSON"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer.json").write_text('{"model": 5}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid tokenizer file"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer.json").write_text(good)
    (folder / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": 7}')
    with pytest.raises(CheckpointError, match="'eos_token' that is neither"):
        Tokenizer.from_dir(folder)
