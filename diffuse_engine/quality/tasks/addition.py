"""Multi-digit addition with carries, in fixed width: ``"04821+00379="`` -> ``"005200"``.

Operands have 1 to 5 significant digits (each count equally likely) and are written zero-padded to 5 digits; the
answer is written zero-padded to 6. Fixed width puts every digit of both operands and of the answer at a fixed
position, so a small bidirectional model learns column addition with carries instead of spending its capacity
on aligning numbers of different lengths. The checker accepts the answer with or without leading zeros."""

from __future__ import annotations

import random
import re

from .base import Example, Task

_PROMPT = re.compile(r"^(\d{1,5})\+(\d{1,5})=$")
_ANSWER = re.compile(r"^\d{1,6}$")


class Addition(Task):
    name = "addition"
    description = "a+b with 1-5 significant digits per operand, zero-padded to 5; answer zero-padded to 6 digits"
    gen_length = 6
    block_length = 6
    max_digits = 5

    def sample(self, rng: random.Random) -> Example:
        a, b = (self._operand(rng) for _ in range(2))
        return Example(f"{a:05d}+{b:05d}=", f"{a + b:06d}")

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(1, self.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

    def check(self, prompt: str, output: str) -> bool:
        m = _PROMPT.match(prompt)
        if m is None:
            raise ValueError(f"not an addition prompt: {prompt!r}")
        out = output.strip()
        return _ANSWER.match(out) is not None and int(out) == int(m.group(1)) + int(m.group(2))
