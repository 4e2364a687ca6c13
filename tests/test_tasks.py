"""Task generators and checkers: determinism, validity, sudoku uniqueness, checkers that reject wrong answers,
and held-out data that training never sees."""

from __future__ import annotations

import random

import pytest

from diffuse_engine.quality.tasks import (
    CORPORA,
    TASKS,
    TEST_SEED,
    VALIDATION_SEED,
    Addition,
    Countdown3,
    Sorting,
    Sudoku4x4,
    TextCorpus,
    get_task,
)
from diffuse_engine.quality.tasks.countdown import evaluate
from diffuse_engine.quality.tasks.sudoku import all_grids, is_valid_grid, solutions

TASK_NAMES = list(TASKS)


def _count_solutions(clues: str, limit: int = 2) -> int:
    """Solutions of a 4x4 puzzle by plain backtracking over the blanks (independent of all_grids)."""
    cells = [0 if ch == "." else int(ch) for ch in clues]

    def ok(i: int, v: int) -> bool:
        r, c = divmod(i, 4)
        br, bc = r - r % 2, c - c % 2
        peers = {4 * r + k for k in range(4)} | {4 * k + c for k in range(4)}
        peers |= {4 * (br + a) + bc + b for a in range(2) for b in range(2)}
        return all(cells[j] != v for j in peers if j != i)

    def search(i: int) -> int:
        if i == 16:
            return 1
        if cells[i]:
            return search(i + 1) if ok(i, cells[i]) else 0
        found = 0
        for v in (1, 2, 3, 4):
            if ok(i, v):
                cells[i] = v
                found += search(i + 1)
                cells[i] = 0
                if found >= limit:
                    break
        return found

    return search(0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generators_are_deterministic(name):
    a = [get_task(name).sample(random.Random(7)) for _ in range(1)]
    rng1, rng2 = random.Random(11), random.Random(11)
    t = get_task(name)
    assert [t.sample(rng1) for _ in range(50)] == [t.sample(rng2) for _ in range(50)]
    assert a == [get_task(name).sample(random.Random(7))]
    assert get_task(name).test_set(20) == get_task(name).test_set(20)
    stream1, stream2 = get_task(name).train_stream(3), get_task(name).train_stream(3)
    assert [next(stream1) for _ in range(30)] == [next(stream2) for _ in range(30)]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_reference_answers_pass_and_fit_the_canvas(name):
    task = get_task(name)
    for ex in task.test_set(300):
        assert task.check(ex.prompt, ex.answer), ex
        assert len(ex.answer.encode()) <= task.gen_length
        assert task.gen_length % task.block_length == 0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_checkers_reject_wrong_answers(name):
    task = get_task(name)
    rng = random.Random(5)
    for ex in task.test_set(100):
        assert not task.check(ex.prompt, "")
        assert not task.check(ex.prompt, ex.answer + "1")
        # change one character of the reference to a different digit
        idx = [i for i, ch in enumerate(ex.answer) if ch.isdigit()]
        i = rng.choice(idx)
        alt = rng.choice([d for d in "0123456789" if d != ex.answer[i]])
        wrong = ex.answer[:i] + alt + ex.answer[i + 1:]
        if name == "countdown3":
            continue  # a changed number can still be a valid solution only by accident; covered below
        assert not task.check(ex.prompt, wrong), (ex, wrong)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_checkers_refuse_prompts_of_another_task(name):
    with pytest.raises(ValueError, match="not a"):
        get_task(name).check("hello", "1")


def test_addition_examples_cover_every_digit_count_and_carries():
    task = Addition()
    data = task.test_set()
    assert all(len(ex.prompt) == 12 and len(ex.answer) == 6 for ex in data)  # fixed width
    lengths = {len(str(int(op))) for ex in data for op in ex.prompt[:-1].split("+")}
    assert lengths == {1, 2, 3, 4, 5}
    carries = sum(int(a[-1]) + int(b[-1]) >= 10 for a, b in (ex.prompt[:-1].split("+") for ex in data))
    assert carries > 0.2 * len(data)
    assert task.check("99999+99999=", "199998") and task.check("00000+00000=", "000000")
    assert task.check("00001+00001=", "2") and task.check("1+1=", "000002")  # leading zeros are optional
    assert not task.check("00001+00001=", "0000002") and not task.check("00001+00001=", "2 2")


def test_sudoku_grids_and_uniqueness():
    grids = all_grids()
    assert len(grids) == 288 and len(set(grids)) == 288 and all(is_valid_grid(g) for g in grids)
    task = Sudoku4x4()
    for ex in task.test_set(150):
        clues = ex.prompt[:16]
        assert _count_solutions(clues) == 1, ex
        assert task.min_clues <= 16 - clues.count(".") <= task.max_clues
        assert all(c == "." or c == a for c, a in zip(clues, ex.answer, strict=True))
    # a puzzle with two solutions: the checker accepts either (it checks the rules and the clues)
    two = "12..34..21..43.."
    sols = solutions(two)
    assert len(sols) == _count_solutions(two, limit=100) == 4
    for sol in sols:
        assert task.check(two + "=", "".join(map(str, sol)))
    assert not task.check(two + "=", "1234341221434312")  # breaks the last row's columns


def test_sudoku_checker_rejects_grids_that_ignore_the_clues():
    task = Sudoku4x4()
    ex = task.test_set(1)[0]
    other = next("".join(map(str, g)) for g in all_grids() if "".join(map(str, g)) != ex.answer)
    assert is_valid_grid([int(c) for c in other])
    assert task.check(ex.prompt, ex.answer) and not task.check(ex.prompt, other)


def test_countdown_accepts_any_valid_expression():
    task = Countdown3()
    assert task.check("3,7,12>45:", "(12-7)*3+30-30") is False  # extra numbers
    assert task.check("3,7,12>45:", "(12-7)*3") is False  # = 15
    assert task.check("3,7,12>15:", "(12-7)*3")
    assert task.check("3,7,12>15:", "3*(12-7)")
    assert task.check("3,7,12>15:", " 3 * ( 12 - 7 ) ")
    assert task.check("2,3,4>6:", "(2*3)*4/4") is False  # 4 used twice
    assert task.check("2,4,8>1:", "(8/4)/2")
    assert task.check("2,4,8>1:", "8/(4*2)")
    assert task.check("6,4,3>8:", "6/3*4") and task.check("6,4,3>8:", "4*6/3")
    assert not task.check("6,4,3>8:", "6/(3-3)*4")
    for bad in ("", "3+", "(3+7", "__import__('os')", "3**7-12", "3//7+12", "3,7,12", "1e3+7+12", "3 7 12"):
        assert task.check("3,7,12>22:", bad) is False, bad
    assert evaluate("1/0") is None and evaluate("2-5")[0] == -3


def test_countdown_targets_are_reachable():
    task = Countdown3()
    for ex in task.test_set(300):
        nums = [int(x) for x in ex.prompt.split(">")[0].split(",")]
        assert all(1 <= n <= 20 for n in nums) and len(ex.answer) < task.gen_length
        assert task.check(ex.prompt, ex.answer)


def test_sorting_examples():
    task = Sorting()
    assert task.check("31,5,77,2=", "2,5,31,77") and not task.check("31,5,77,2=", "2,5,77,31")
    assert task.check("5,5=", "5,5") and not task.check("5,5=", "5")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_held_out_sets_are_disjoint_from_training(name):
    task = get_task(name)
    test = {e.prompt for e in task.test_set()}
    val = {e.prompt for e in task.validation_set()}
    assert len(test) == task.test_size and len(val) == task.validation_size and not test & val
    # a stream seeded like the held-out sets would reproduce them if it did not filter them out
    for seed in (0, TEST_SEED, VALIDATION_SEED):
        stream = task.train_stream(seed)
        drawn = {next(stream).prompt for _ in range(3000)}
        assert not drawn & (test | val), seed


def test_text_corpus_split_by_topic():
    corpus = TextCorpus()
    held, train = set(corpus.held_out_topics()), set(corpus.train_topics())
    assert held and train and not held & train and held | train == set(corpus.topics)
    train_text = corpus.train_text()
    n_held = len(corpus.held_out_text())
    assert 0.05 < n_held / (n_held + len(train_text)) < 0.2
    for name in held:
        body = corpus.topics[name]
        for start in range(0, len(body) - 100, 50):
            snippet = body[start:start + 100]
            assert snippet not in train_text, (name, snippet)


def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'; available: addition"):
        get_task("nope")
    assert set(CORPORA) == {"text-char"}
