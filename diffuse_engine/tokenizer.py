"""Tokenizers of model folders (``tokenizer.json`` + ``tokenizer_config.json``), chat-template rendering, and a
byte-level tokenizer with a dense id space for the random checkpoints of tests and benchmarks."""

from __future__ import annotations

import json
import re
import threading
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; a file that cannot be read or parsed raises :class:`CheckpointError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not valid UTF-8 text, so it cannot hold JSON.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
                              ) from None


def _token_string(value: Any, field: str, path: Path) -> str | None:
    """A special-token entry of tokenizer_config.json: a plain string, ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{path} has a {field!r} that is neither a string nor an object with a 'content' string.")


def _select_template(value: Any, path: Path) -> str | None:
    """The ``chat_template`` field: a string, or a list of ``{name, template}`` where ``default`` wins."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "template" in t for t in value):
        named = {t.get("name"): t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise CheckpointError(f"{path} lists chat templates {sorted(map(str, named))} but none is named 'default'.")
    raise CheckpointError(f"{path} has a 'chat_template' that is neither a string nor a list of "
                          f"{{'name', 'template'}} objects.")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its model folder.

    ``encode`` adds no special tokens (no BOS): the chat template or the caller decides; special-token strings
    written in the text (``<|eot_id|>``) still map to their ids unless ``special=False``. :meth:`encode_chat`
    renders a conversation and tokenizes it so that only the template's own markers become special ids: a
    marker written inside a message's content stays text.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, source: str = "<memory>") -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.source = source
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(backend.get_added_tokens_decoder())
        self._plain: tokenizers.Tokenizer | None = None  # a copy that reads special-token strings as text
        self._plain_lock = threading.Lock()
        specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)  # longest first: the leftmost match is the longest one
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` of folder ``path``, with ``tokenizer_config.json`` (bos/eos token strings,
        chat template) and ``chat_template.jinja`` (which takes precedence over the config's template) when
        present."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"Tokenizer folder {folder} does not exist or is not a directory.")
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise CheckpointError(f"{folder} has no {TOKENIZER_FILE}, so no tokenizer can be loaded from it.")
        read_json(file)  # a clear error for broken JSON before the Rust parser's terse one
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for bad content
            raise CheckpointError(f"{file} is not a valid tokenizer file: {exc}.") from None
        settings: dict[str, Any] = {}
        config_file = folder / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            settings = read_json(config_file)
            if not isinstance(settings, dict):
                raise CheckpointError(f"{config_file} must hold a JSON object.")
        template = _select_template(settings.get("chat_template"), config_file)
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"Cannot read {template_file}: {exc}.") from None
        return cls(backend, chat_template=template,
                   bos_token=_token_string(settings.get("bos_token"), "bos_token", config_file),
                   eos_token=_token_string(settings.get("eos_token"), "eos_token", config_file),
                   source=str(folder))

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids of the tokenizer, added tokens included (a model's embedding may have more rows)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special / added tokens."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (a vocabulary entry or added token), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id``, or None when out of range."""
        return self.backend.id_to_token(token_id) if 0 <= token_id < self._vocab_size else None

    # ------------------------------------------------------------------ text
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``, without any special token added. ``special=False``: special-token strings in
        the text (``<|eot_id|>``) are encoded as the ordinary text they spell, not as their ids."""
        return (self.backend if special else self._plain_backend()).encode(text, add_special_tokens=False).ids

    def _plain_backend(self) -> tokenizers.Tokenizer:
        if self._plain is None:
            with self._plain_lock:
                if self._plain is None:  # a copy: the flag is a property of the whole backend object
                    plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
                    plain.encode_special_tokens = True
                    self._plain = plain
        return self._plain

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the tokenizer's vocabulary (padding rows of a larger embedding) are
        skipped."""
        valid = [int(i) for i in ids if 0 <= int(i) < self._vocab_size]
        return self.backend.decode(valid, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (``{"role", "content"}`` dicts) with the folder's Jinja chat template in a
        sandbox. The template sees ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``
        (empty strings when the folder defines none) and may call ``raise_exception(message)``."""
        if self.chat_template is None:
            raise ValueError(f"This tokenizer has no chat template (neither {CHAT_TEMPLATE_FILE} nor a "
                             f"'chat_template' field in {TOKENIZER_CONFIG_FILE}).")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts.")
        try:  # the messages say no folder path: callers show them to clients (``source`` holds the folder)
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise ValueError(f"The chat template failed to render: {str(exc).rstrip('.')}.") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by :meth:`apply_chat_template`, where only the template's own
        text may hold special tokens: a special-token string inside a message's ``content`` (a user writing
        ``<|eot_id|>``) is encoded as ordinary text. A conversation whose contents hold no such string gets
        exactly ``encode(apply_chat_template(messages))``.

        The template is rendered twice: with the real contents and with a unique placeholder for each string
        content. The placeholders locate every content in the real rendering (also when the template trims it);
        special tokens are then split out of the template's text only, and the text between them is encoded
        with special-token strings read as text."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        if self._special_re is None:
            return self.encode(text)
        spans = self._content_spans(messages, add_generation_prompt, text)
        ids: list[int] = []
        start = 0  # the start of the text not yet encoded
        for lo, hi in [(0, spans[0][0] if spans else len(text)), *(
                (a[1], b[0]) for a, b in zip(spans, [*spans[1:], (len(text), len(text))], strict=False))]:
            for match in self._special_re.finditer(text, lo, hi):  # the template's own markers
                if match.start() > start:
                    ids += self.encode(text[start:match.start()], special=False)
                ids.append(self.backend.token_to_id(match.group()))
                start = match.end()
        if start < len(text):
            ids += self.encode(text[start:], special=False)
        return ids

    def _content_spans(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                       text: str) -> list[tuple[int, int]]:
        """Where each message's content lies in ``text`` (the real rendering), in order, as (start, end)."""
        nonce = uuid.uuid4().hex
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} if isinstance(m.get("content"), str) else m
                  for i, m in enumerate(messages)]
        skeleton = self.apply_chat_template(marked, add_generation_prompt)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", skeleton)  # text, index, text, index, ..., text
        spans, pos = [], 0
        for k in range(0, len(parts) - 1, 2):
            literal, content, after = parts[k], messages[int(parts[k + 1])]["content"], parts[k + 2]
            if not text.startswith(literal, pos):
                raise ValueError(_UNSPLITTABLE)
            pos += len(literal)
            # The template may trim a content: take the form after which the template's text goes on.
            last = k + 3 >= len(parts)
            for form in (content, content.strip(), content.lstrip(), content.rstrip()):
                end = pos + len(form)
                if text.startswith(form, pos) and (text.endswith(after) and end == len(text) - len(after)
                                                   if last else text.startswith(after, end)):
                    break
            else:
                raise ValueError(_UNSPLITTABLE)
            spans.append((pos, end))
            pos = end
        if not text.startswith(parts[-1], pos) or pos + len(parts[-1]) != len(text):
            raise ValueError(_UNSPLITTABLE)
        return spans


_UNSPLITTABLE = ("The chat template changes message contents in a way that keeps them from being told apart "
                 "from the template's own text, so the conversation cannot be tokenized safely.")


# ---------------------------------------------------------------------- byte-level tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters: printable Latin-1
    bytes map to themselves, the others to code points from 256 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer(vocab_size: int, special_tokens: dict[str, int]) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer without merges: byte ``b`` is id ``b``, each special token sits at exactly
    its given id, and every other id in ``[256, vocab_size)`` holds a placeholder ``<|reserved_{id}|>`` so
    the id space is dense. Any unicode text round-trips through encode and decode.

    The placeholders are ordinary vocabulary entries, not added tokens: registering ~10^5 added tokens for
    the published vocabularies would make ``tokenizer.json`` tens of megabytes. Decoding a placeholder id
    therefore yields its placeholder text.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size must be an integer >= 256 for a byte-level tokenizer, got {vocab_size!r}.")
    by_id: dict[int, str] = {}
    for content, token_id in special_tokens.items():
        if not isinstance(token_id, int) or not 256 <= token_id < vocab_size:
            raise ValueError(f"Special token {content!r} has id {token_id!r}; byte-level tokenizers need special "
                             f"ids in [256, {vocab_size}) because ids 0-255 are the bytes.")
        if token_id in by_id:
            raise ValueError(f"Special tokens {by_id[token_id]!r} and {content!r} share the id {token_id}.")
        by_id[token_id] = content
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for token_id in range(256, vocab_size):
        content = by_id.get(token_id, f"<|reserved_{token_id}|>")
        if content in vocab:
            raise ValueError(f"Special token {content!r} collides with another vocabulary entry.")
        vocab[content] = token_id
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Contents already in the model vocabulary keep their ids when registered as added tokens.
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in special_tokens])
    for content, token_id in special_tokens.items():
        if tok.token_to_id(content) != token_id:  # guards against a change of behaviour in `tokenizers`
            raise RuntimeError(f"tokenizers placed special token {content!r} at id {tok.token_to_id(content)} "
                               f"instead of {token_id}.")
    return tok
