"""``diffuse-engine bench SUITE --compare OLD``: each row of the new run's CSVs matched with the row of the same CSV
in a previous run's folder that has the same identifying columns, and the ratio new / old of the row's time.

A suite names its CSVs' identifying columns and time column (``KEYS = {"engine.csv": ((...), "step_ms")}``); a CSV
it does not describe (another suite's, e.g. the kernels' in the GPU suite's folder) is matched on its text columns
(every value not a number) other than the stamp, with the first of :data:`TIME_COLUMNS` it has. When a key occurs
several times in a file (runs appended into one folder), the last row counts."""

from __future__ import annotations

import csv
from pathlib import Path

STAMP_COLUMNS = ("date", "commit", "device", "torch", "triton", "diffuse_engine", "command")
TIME_COLUMNS = ("ms", "step_ms", "measured_ms", "seconds", "wall_s", "p50_s", "time_ms")


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts of strings."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def infer_keys(rows: list[dict]) -> tuple[tuple[str, ...], str | None]:
    """(identifying columns, time column) of rows of a CSV no suite describes."""
    columns = list(rows[0]) if rows else []
    time_column = next((c for c in TIME_COLUMNS if c in columns), None)
    keys = tuple(c for c in columns if c not in STAMP_COLUMNS and c != time_column
                 and not any(_number(r.get(c) or "") for r in rows))
    return keys, time_column


def _latest(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict]:
    return {tuple(r.get(k, "") for k in keys): r for r in rows}


def compare_file(new: Path, old: Path, keys: tuple[str, ...] | None = None,
                 time_column: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows (the key's columns, old and new time, ratio) for the keys in both files, and a line per key found in
    only one of them."""
    new_rows, old_rows = read_rows(new), read_rows(old)
    if keys is None or time_column is None:
        keys, time_column = infer_keys(new_rows)
    if time_column is None:
        return [], [f"{new.name}: no time column to compare ({', '.join(TIME_COLUMNS)})"]
    a, b = _latest(new_rows, keys), _latest(old_rows, keys)
    # a row is named by the key columns whose values differ between rows (all of them when there is one row)
    varying = [i for i, _ in enumerate(keys) if len({key[i] for key in (*a, *b)}) > 1] or list(range(len(keys)))
    matched, only = [], []
    for key, row in a.items():
        name = ", ".join(f"{keys[i]}={key[i]}" for i in varying if key[i] != "")
        if key not in b:
            only.append(f"{new.name}: only in the new run: {name}")
            continue
        t_new, t_old = row.get(time_column), b[key].get(time_column)
        ratio = float(t_new) / float(t_old) if _number(t_new) and _number(t_old) and float(t_old) else None
        matched.append({"file": new.name, "row": name, "time": time_column, "old": t_old, "new": t_new,
                        "new/old": ratio})
    only += [f"{new.name}: only in the old run: " + ", ".join(f"{keys[i]}={key[i]}" for i in varying if key[i] != "")
             for key in b if key not in a]
    return matched, only


def compare_folders(new: Path, old: Path, described: dict[str, tuple[tuple[str, ...], str]],
                    names: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """:func:`compare_file` for every CSV of ``names`` (default: every CSV in ``new``) that ``old`` also has; a
    ValueError when none matches."""
    if not old.is_dir():
        raise ValueError(f"--compare {old}: no such folder.")
    names = names if names is not None else sorted(p.name for p in new.glob("*.csv"))
    common = [n for n in names if (new / n).is_file() and (old / n).is_file()]
    if not common:
        raise ValueError(f"--compare {old}: it holds none of this run's CSV files ({', '.join(names) or 'none'}).")
    matched, only = [], []
    for name in common:
        keys, time_column = described.get(name, (None, None))
        m, o = compare_file(new / name, old / name, keys, time_column)
        matched += m
        only += o
    return matched, only
