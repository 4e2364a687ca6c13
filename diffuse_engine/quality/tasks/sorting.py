"""Sorting: ``"31,5,77,2="`` -> ``"2,5,31,77"`` (2 to 6 numbers in 0..99, ascending, repeats allowed)."""

from __future__ import annotations

import random
import re

from .base import Example, Task

_PROMPT = re.compile(r"^(\d{1,2}(?:,\d{1,2})+)=$")


class Sorting(Task):
    name = "sorting"
    description = "sort 2-6 integers in 0..99 ascending, comma-separated"
    gen_length = 20  # at most 6 * 2 digits + 5 commas = 17, then EOS
    block_length = 20

    def sample(self, rng: random.Random) -> Example:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
        return Example(",".join(map(str, nums)) + "=", ",".join(map(str, sorted(nums))))

    def check(self, prompt: str, output: str) -> bool:
        m = _PROMPT.match(prompt)
        if m is None:
            raise ValueError(f"not a sorting prompt: {prompt!r}")
        nums = sorted(int(x) for x in m.group(1).split(","))
        return output.strip() == ",".join(map(str, nums))
