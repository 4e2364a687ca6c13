"""4x4 sudoku with a unique solution: ``"1..4.3...2..4..1="`` (16 cells row by row, ``.`` blank) -> the 16
digits of the solution. Rows, columns and the four 2x2 boxes each hold 1-4 once."""

from __future__ import annotations

import functools
import itertools
import random
import re

from .base import Example, Task

_PROMPT = re.compile(r"^[1-4.]{16}=$")
_UNITS: tuple[tuple[int, ...], ...] = (
    *(tuple(4 * r + c for c in range(4)) for r in range(4)),
    *(tuple(4 * r + c for r in range(4)) for c in range(4)),
    *(tuple(4 * (br + r) + bc + c for r in range(2) for c in range(2)) for br in (0, 2) for bc in (0, 2)),
)


def is_valid_grid(cells: tuple[int, ...] | list[int]) -> bool:
    """Whether 16 digits form a solved 4x4 sudoku."""
    return len(cells) == 16 and all(sorted(cells[i] for i in unit) == [1, 2, 3, 4] for unit in _UNITS)


@functools.cache
def all_grids() -> tuple[tuple[int, ...], ...]:
    """Every solved 4x4 sudoku (there are 288), in lexicographic order."""
    rows = list(itertools.permutations((1, 2, 3, 4)))
    grids = [g for g in (sum(p, ()) for p in itertools.product(rows, repeat=4)) if is_valid_grid(g)]
    return tuple(grids)


def solutions(clues: str, limit: int | None = None) -> list[tuple[int, ...]]:
    """The solved grids that agree with ``clues`` (16 characters, ``.`` blank), at most ``limit`` of them."""
    fixed = [(i, int(ch)) for i, ch in enumerate(clues) if ch != "."]
    out = []
    for grid in all_grids():
        if all(grid[i] == v for i, v in fixed):
            out.append(grid)
            if limit is not None and len(out) >= limit:
                break
    return out


@functools.cache
def _rival_masks(grid: tuple[int, ...]) -> tuple[int, ...]:
    """For every other solved grid, the bitmask of cells where it agrees with ``grid``, keeping only masks not
    contained in another: a clue set S (bitmask) has ``grid`` as its unique solution iff S is contained in
    none of them."""
    masks = {sum(1 << i for i in range(16) if other[i] == grid[i]) for other in all_grids() if other != grid}
    return tuple(m for m in masks if not any(m != o and m & o == m for o in masks))


class Sudoku4x4(Task):
    name = "sudoku4x4"
    description = "4x4 sudoku, 4-10 clues, unique solution; answer = the 16 digits row by row"
    gen_length = 16
    block_length = 16
    min_clues, max_clues = 4, 10

    def sample(self, rng: random.Random) -> Example:
        grid = rng.choice(all_grids())
        target = rng.randint(self.min_clues, self.max_clues)
        rivals = _rival_masks(grid)
        order = list(range(16))
        rng.shuffle(order)
        kept, clues = (1 << 16) - 1, 16
        for i in order:  # remove cells while the solution stays unique, down to the target count
            if clues == target:
                break
            trial = kept & ~(1 << i)
            if all(trial & ~m for m in rivals):  # no other grid agrees with every remaining clue
                kept, clues = trial, clues - 1
        cells = "".join(str(v) if kept >> i & 1 else "." for i, v in enumerate(grid))
        return Example(cells + "=", "".join(map(str, grid)))

    def check(self, prompt: str, output: str) -> bool:
        if _PROMPT.match(prompt) is None:
            raise ValueError(f"not a 4x4 sudoku prompt: {prompt!r}")
        out = output.strip()
        if len(out) != 16 or any(ch not in "1234" for ch in out):
            return False
        cells = [int(ch) for ch in out]
        return is_valid_grid(cells) and all(ch == "." or int(ch) == v for ch, v in zip(prompt[:16], cells, strict=True))
