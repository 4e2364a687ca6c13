"""Live terminal view of one request's canvas while it is denoised (``diffuse-engine generate`` on a TTY).

Each engine step redraws the frame in place (cursor-up ``ESC [ n F`` then erase-below ``ESC [ J``): a header
line with the step, block, NFE, decoded-token count and elapsed time, then the canvas. Committed tokens are
drawn as their decoded text (``tokenizer.decode([id], skip_special_tokens=False)``, newlines as ``⏎``; the
ids themselves for a folder without a tokenizer), still-masked positions as ``░`` (current block) or ``·``
(later blocks), and the tokens committed in this step highlighted. Runs of one special token (the EOS padding
after an answer) are shown once with a count.
"""

from __future__ import annotations

import os
import shutil
import time
import unicodedata
from collections.abc import Collection, Sequence
from typing import Any, TextIO

from ..engine import RequestOutput, StepOutput

ESC = "\x1b["
RESET = ESC + "0m"
HIDE_CURSOR, SHOW_CURSOR = ESC + "?25l", ESC + "?25h"
STYLES = {
    "text": "", "new": ESC + "30;102m", "special": ESC + "2;36m", "mask": ESC + "33m", "later": ESC + "2m",
    "header": ESC + "1m", "dim": ESC + "2m",
}
UNICODE_GLYPHS = {"mask": "░", "later": "·", "newline": "⏎", "times": "×", "sep": " · "}
ASCII_GLYPHS = {"mask": "#", "later": ".", "newline": "|", "times": "x", "sep": " | "}


def glyphs_for(stream: TextIO) -> dict[str, str]:
    """The placeholder glyphs the stream's encoding can write (ASCII stand-ins otherwise)."""
    try:
        "".join(UNICODE_GLYPHS.values()).encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return ASCII_GLYPHS
    return UNICODE_GLYPHS


def char_width(ch: str) -> int:
    """Terminal cells taken by ``ch``: 0 for combining marks, 2 for wide East Asian characters, else 1."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def printable(text: str, newline: str) -> str:
    """``text`` safe to draw: newlines as ``newline``, tabs as a space, other control characters as ``�``."""
    out = []
    for c in text:
        if c == "\n":
            out.append(newline)
        elif c == "\t":
            out.append(" ")
        elif unicodedata.category(c)[0] == "C":
            out.append("\ufffd")
        else:
            out.append(c)
    return "".join(out)


def summary_line(out: RequestOutput, seconds: float, glyphs: dict[str, str] = UNICODE_GLYPHS) -> str:
    """``NFE · tokens per forward · seconds · tokens/s · finish reason · seed`` (tokens: the whole canvas)."""
    rate = len(out.token_ids) / seconds if seconds > 0 else 0.0
    parts = [f"NFE {out.nfe}", f"{out.tokens_per_forward:.2f} tokens/forward", f"{seconds:.2f} s",
             f"{rate:.1f} tokens/s", f"finish {out.finish_reason}", f"seed {out.seed}"]
    return glyphs["sep"].join(parts)


def answer_text(out: RequestOutput, stop_ids: Collection[int]) -> str:
    """The decoded answer; for a folder without a tokenizer, the answer's ids up to the first stop token."""
    if out.text is not None:
        return out.text
    cut = next((i for i, t in enumerate(out.token_ids) if t in stop_ids), len(out.token_ids))
    return " ".join(map(str, out.token_ids[:cut]))


def print_result(out: RequestOutput, seconds: float, stop_ids: Collection[int], view: LiveView | None,
                 stdout: TextIO, stderr: TextIO) -> None:
    """The answer on ``stdout`` (exactly, or with control characters replaced under a live view); the summary
    line after it, dimmed, under a live view, else on ``stderr``."""
    answer = answer_text(out, stop_ids)
    if view is None:
        print(answer, file=stdout, flush=True)
        print(summary_line(out, seconds, glyphs_for(stderr)), file=stderr)
        return
    # On a terminal, control characters of the answer (a stray ESC) must not drive the terminal.
    print(printable(answer, "\n"), file=stdout)
    summary = summary_line(out, seconds, view.glyphs)
    print(STYLES["dim"] + summary + RESET if view.color else summary, file=stdout, flush=True)


class LiveView:
    """Draws a request's canvas on ``stream`` after every step; pass :meth:`update` as ``on_step``.

    ``special_ids`` are drawn dimmed (and collapsed when repeated). ``width``/``height`` default to the terminal
    size; frames taller than the terminal show the window that holds the block being decoded. ``max_fps``
    limits redraws (the last step is always drawn); ``color=False`` drops the colours but keeps the redraw.
    """

    def __init__(self, stream: TextIO, tokenizer: Any, *, steps: int, steps_per_block: int, num_blocks: int,
                 block_length: int, mask_id: int, special_ids: Collection[int] = (), width: int | None = None,
                 height: int | None = None, max_fps: float = 30.0, color: bool | None = None) -> None:
        self.stream, self.tokenizer = stream, tokenizer
        self.steps, self.steps_per_block, self.num_blocks = steps, steps_per_block, num_blocks
        self.block_length, self.mask_id = block_length, mask_id
        self.special_ids = set(special_ids) | set(getattr(tokenizer, "special_ids", ()) or ())
        size = shutil.get_terminal_size((100, 30))
        self.width = max(20, (width or size.columns) - 1)
        self.height = max(4, height or size.lines)
        self.min_interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self.color = (os.environ.get("NO_COLOR") is None) if color is None else color
        self.glyphs = glyphs_for(stream)
        self.frames = 0
        self._lines_drawn = 0
        self._last_draw = float("-inf")
        self._t0 = time.perf_counter()
        self._pieces: dict[int, str] = {}

    # ------------------------------------------------------------------ drawing
    def update(self, outputs: Sequence[StepOutput]) -> None:
        """The ``on_step`` callback: redraw with the first request's step (throttled to ``max_fps``)."""
        if not outputs:
            return
        out, now = outputs[0], time.perf_counter()
        if not out.finished and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self.draw(self.render(out, now - self._t0))

    def draw(self, lines: list[str]) -> None:
        """Replace the previous frame by ``lines``."""
        parts = [HIDE_CURSOR] if self.frames == 0 else []
        if self._lines_drawn:
            parts.append(f"{ESC}{self._lines_drawn}F")
        parts.append(ESC + "J")
        parts.extend(line + "\n" for line in lines)
        self.stream.write("".join(parts))
        self.stream.flush()
        self._lines_drawn = len(lines)
        self.frames += 1

    def close(self, clear: bool = True) -> None:
        """Erase the last frame (unless ``clear`` is False) and show the cursor again."""
        if self.frames:
            erase = f"{ESC}{self._lines_drawn}F{ESC}J" if clear and self._lines_drawn else ""
            self.stream.write(erase + SHOW_CURSOR)
            self.stream.flush()
            self._lines_drawn = 0

    def _style(self, name: str) -> str:
        return STYLES[name] if self.color else ""

    def piece(self, token: int) -> str:
        """Printable text of one token (cached)."""
        text = self._pieces.get(token)
        if text is None:
            if self.tokenizer is None:
                text = f"{token} "
            else:
                raw = self.tokenizer.decode([token], skip_special_tokens=False)
                text = printable(raw, self.glyphs["newline"]) or f"<{token}>"
                if self.glyphs is ASCII_GLYPHS:
                    text = text.encode("ascii", "replace").decode("ascii")
            self._pieces[token] = text
        return text

    def render(self, out: StepOutput, elapsed: float) -> list[str]:
        """The frame of one step: a header line and the wrapped canvas."""
        canvas, new = out.canvas, {pos for pos, _ in out.committed}
        masked = [i for i, t in enumerate(canvas) if t == self.mask_id]
        current = masked[0] // self.block_length if masked else None
        cells: list[tuple[str, str]] = []
        starts: dict[int, int] = {}
        i = 0
        while i < len(canvas):
            tok = canvas[i]
            starts[i] = len(cells)
            if tok == self.mask_id:
                kind = "mask" if i // self.block_length == current else "later"
                cells.append((self.glyphs[kind], kind))
                i += 1
                continue
            j = i + 1
            if tok in self.special_ids:
                while j < len(canvas) and canvas[j] == tok and (j in new) == (i in new):
                    j += 1
            text = self.piece(tok) + (f"{self.glyphs['times']}{j - i}" if j - i > 1 else "")
            kind = "new" if i in new else ("special" if tok in self.special_ids else "text")
            cells.extend((c, kind) for c in text)
            i = j
        lines, line_of_cell = self._wrap(cells)
        block_step = out.step % self.steps_per_block + 1
        sep = self.glyphs["sep"]
        header = sep.join([f"step {block_step}/{self.steps_per_block}",
                           f"block {min(out.block + 1, self.num_blocks)}/{self.num_blocks}",
                           f"NFE {out.step + 1}/{self.steps}", f"{len(canvas) - len(masked)}/{len(canvas)} tokens",
                           f"{elapsed:.2f} s"] + (["done"] if out.finished else []))
        room = self.height - 2
        if len(lines) > room:
            anchor = current * self.block_length if current is not None else len(canvas) - 1
            focus = line_of_cell[starts.get(anchor, 0)] if line_of_cell else 0
            first = max(0, min(focus, len(lines) - room))
            header += f"{sep}lines {first + 1}-{first + room} of {len(lines)}"
            lines = lines[first:first + room]
        return [self._style("header") + header[: self.width] + (RESET if self.color else "")] + lines

    def _wrap(self, cells: list[tuple[str, str]]) -> tuple[list[str], list[int]]:
        """Wrap styled characters at the view width; returns the rendered lines and each cell's line index."""
        rows: list[list[tuple[str, str]]] = [[]]
        line_of_cell, col = [], 0
        for ch, kind in cells:
            w = char_width(ch)
            if col + w > self.width and rows[-1]:
                rows.append([])
                col = 0
            rows[-1].append((ch, kind))
            line_of_cell.append(len(rows) - 1)
            col += w
        lines = []
        for row in rows:
            parts, style = [], None
            for ch, kind in row:
                if kind != style:
                    if self.color:
                        parts.append(RESET + STYLES[kind])
                    style = kind
                parts.append(ch)
            lines.append("".join(parts) + (RESET if self.color and row else ""))
        return lines, line_of_cell
