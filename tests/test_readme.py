"""The README's Python blocks run as written: in order, in one namespace (as a reader pastes them into one
session), in a fresh folder where the README's preceding file-writing commands (``diffuse-engine init-random``)
have run first."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import shlex
from pathlib import Path

import pytest
import torch

from diffuse_engine.entrypoints.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Commands of the README's bash blocks that write files a later Python block reads.
WRITING_COMMANDS = ("init-random",)


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block, in order."""
    blocks, heading = [], ""
    for m in re.finditer(r"^(#{1,6} [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
        else:
            blocks.append((heading, m.group(2), m.group(3)))
    return blocks


def writing_commands(code: str) -> list[list[str]]:
    """The ``diffuse-engine`` commands of a bash block that write files (arguments after the program name)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;", line.split("#", 1)[0]):
            if not part.strip().startswith("diffuse-engine "):
                continue
            words = shlex.split(part)
            if len(words) > 1 and words[0] == "diffuse-engine" and words[1] in WRITING_COMMANDS:
                commands.append(words[1:])
    return commands


def run_python(code: str, namespace: dict) -> None:
    """Execute ``code`` in ``namespace``; a block with top-level ``async for`` / ``await`` runs in an event loop."""
    compiled = compile(code, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)  # noqa: S307 - the README's own code
    if inspect.iscoroutine(result):
        asyncio.run(result)


BLOCKS = readme_blocks((ROOT / "README.md").read_text())
PYTHON = [i for i, (_, lang, _) in enumerate(BLOCKS) if lang == "python"]
# The Serving section is being revised elsewhere: its snippet does not yet import what it uses.
PENDING_SECTIONS: set[str] = set()


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 2


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The namespace of one reader's session and the folder it runs in, with the blocks run so far."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"namespace": {"__name__": "__readme__"}, "cwd": tmp_path_factory.mktemp("readme"), "ran": -1}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("index", PYTHON, ids=[f"block{i}-{BLOCKS[i][0].replace(' ', '_')}" for i in PYTHON])
def test_python_block_runs_as_written(index, session, monkeypatch, capsys, request):
    heading = BLOCKS[index][0]
    if heading in PENDING_SECTIONS:
        request.applymarker(pytest.mark.xfail(reason=f"README section {heading!r} is being revised", strict=False))
    monkeypatch.chdir(session["cwd"])
    for i in range(session["ran"] + 1, index + 1):  # the commands and blocks before this one, once each
        heading_i, lang, code = BLOCKS[i]
        if lang == "bash":
            for args in writing_commands(code):
                assert main(args) == 0, f"README command failed: diffuse-engine {shlex.join(args)}"
        elif lang == "python" and i < index:
            run_python(code, session["namespace"])
    session["ran"] = index
    run_python(BLOCKS[index][2], session["namespace"])
    capsys.readouterr()


def test_writing_commands_are_found():
    bash = "\n".join(code for _, lang, code in BLOCKS if lang == "bash")
    assert ["init-random", "--preset", "llada-tiny", "--out", "models/llada-tiny", "--overwrite"] in \
        writing_commands(bash)
