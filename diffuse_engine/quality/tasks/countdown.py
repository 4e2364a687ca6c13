"""Countdown with three numbers: ``"3,7,12>45:"`` -> an expression that uses each number exactly once with
``+ - * /`` and parentheses and equals the target, e.g. ``"(12-7)*3"``... any valid expression is accepted.

Targets are built from a random expression over the numbers (exact arithmetic; every intermediate value a
positive integer), so a solution always exists."""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from .base import Example, Task

_PROMPT = re.compile(r"^(\d{1,2}),(\d{1,2}),(\d{1,2})>(\d{1,4}):$")
_EXPR_CHARS = re.compile(r"^[0-9+\-*/() ]+$")
_OPS = "+-*/"


def _apply(op: str, a: int, b: int) -> int | None:
    """a op b when the result is a positive integer, else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def evaluate(expr: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, the integer literals used) of an arithmetic expression, or None if it is not one
    (only non-negative integer literals, + - * / and parentheses; division by zero -> None)."""
    if not expr or len(expr) > 64 or _EXPR_CHARS.match(expr) is None:
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise ValueError("unsupported syntax")

    try:
        return walk(tree), literals
    except (ZeroDivisionError, ValueError, RecursionError):
        return None


class Countdown3(Task):
    name = "countdown3"
    description = "reach the target with 3 numbers in 1..20 and + - * / (each number once); any valid expression"
    gen_length = 12  # e.g. "(20-13)*19" is 10 characters, then EOS
    block_length = 12

    def sample(self, rng: random.Random) -> Example:
        while True:
            nums = [rng.randint(1, 20) for _ in range(3)]
            a, b, c = rng.sample(nums, 3)
            op1, op2 = rng.choice(_OPS), rng.choice(_OPS)
            inner = _apply(op1, a, b)
            if inner is None:
                continue
            if rng.random() < 0.5:
                target, expr = _apply(op2, inner, c), f"({a}{op1}{b}){op2}{c}"
            else:
                target, expr = _apply(op2, c, inner), f"{c}{op2}({a}{op1}{b})"
            if target is not None and target < 10_000 and len(expr) <= self.gen_length - 1:
                return Example(f"{nums[0]},{nums[1]},{nums[2]}>{target}:", expr)

    def check(self, prompt: str, output: str) -> bool:
        m = _PROMPT.match(prompt)
        if m is None:
            raise ValueError(f"not a countdown prompt: {prompt!r}")
        result = evaluate(output.strip())
        if result is None:
            return False
        value, used = result
        nums = [int(m.group(i)) for i in (1, 2, 3)]
        return value == int(m.group(4)) and Counter(used) == Counter(nums)
