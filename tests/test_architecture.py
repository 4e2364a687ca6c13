"""The package's shape: the import graph of ``diffuse_engine`` (read with ``ast``: module-level, function-level and
``TYPE_CHECKING`` imports, relative ones resolved) has no cycle and never imports upwards through :data:`LAYERS`;
no module exceeds :data:`MAX_MODULE_LINES` lines and no function :data:`MAX_FUNCTION_LINES`."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "diffuse_engine"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 80

# Lowest first. A module belongs to the entry with the longest matching prefix (``diffuse_engine`` itself names only
# the package's ``__init__`` and ``__main__``). A module may import its own layer and the ones below, never above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "version", "progress", "contract", "commit_batch", "layout", "config_io", "config_moe",
                    "config", "presets"]),
    ("native", ["native", "_C", "kernels"]),
    ("ops", ["ops"]),
    ("models", ["models"]),
    ("checkpoints", ["tokenizer", "hub", "loader", "checkpoint"]),
    ("policies", ["policies", "sampling_params"]),  # SamplingParams checks names against the policy registries
    ("engine", ["engine"]),
    ("distributed", ["distributed"]),  # tensor parallelism: ranks, sharded loading, the model's collectives
    ("api", ["entrypoints.llm", "entrypoints.async_engine"]),
    ("quality", ["quality"]),
    ("bench", ["bench"]),  # benchmark suites and profiling: any layer of the product below the command line
    ("integrations", ["integrations"]),  # other tools' plug-ins (the lm-evaluation-harness model)
    ("entrypoints", ["entrypoints", "", "__main__"]),
]

# Imports that break the rules, each with why (none today; an entry the code no longer has is reported).
KNOWN_VIOLATIONS: set[tuple[str, str]] = {
}

# Compiled code (the native module) and the kernels (Triton / torch twins) are not held to the size limits.
SIZE_EXEMPT = ("diffuse_engine.kernels", "diffuse_engine._C")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``); ``kernels/`` is installed as ``diffuse_engine.kernels``."""
    found: dict[str, tuple[Path, bool]] = {}
    for folder, prefix in ((ROOT / PACKAGE, [PACKAGE]), (ROOT / "kernels", [PACKAGE, "kernels"])):
        for path in sorted(folder.rglob("*.py")):
            parts = prefix + list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    if any((ROOT / PACKAGE).glob("_C*")) or (ROOT / "csrc").is_dir():
        found[f"{PACKAGE}._C"] = (ROOT / "csrc", False)  # the native extension: imports nothing of the package
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module that importing ``name`` runs: itself, or the closest enclosing module that exists."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every module of the package that ``module`` imports, wherever the import statement stands."""
    path, is_package = MODULES[module]
    if path.suffix != ".py":
        return set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from x import y``: y is a submodule, or a name defined in x
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                     for alias in node.names]
        else:
            continue
        found |= {t for n in names if n.split(".")[0] == PACKAGE and (t := _target(n)) and t != module}
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t in _imports(m) if (m, t) not in KNOWN_VIOLATIONS} for m in MODULES}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            full = f"{PACKAGE}.{prefix}" if prefix else PACKAGE
            matches = module == full or (prefix not in ("", "__main__") and module.startswith(full + "."))
            if matches and len(full) > best_len:
                best, best_len = index, len(full)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}"
    return best


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in import order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
                    for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_known_violations_still_exist():
    """An entry of KNOWN_VIOLATIONS that the code no longer has is only reported (drop it from the set)."""
    stale = sorted(f"{m} -> {t}" for m, t in KNOWN_VIOLATIONS if m not in MODULES or t not in _imports(m))
    if stale:
        warnings.warn("KNOWN_VIOLATIONS holds imports the code no longer has: " + ", ".join(stale), stacklevel=1)


def _sized(module: str) -> bool:
    return not module.startswith(SIZE_EXEMPT) and MODULES[module][0].suffix == ".py"


def test_no_module_is_too_long():
    long = sorted(f"{MODULES[m][0].relative_to(ROOT)}: {n} lines" for m in MODULES if _sized(m)
                  and (n := len(MODULES[m][0].read_text().splitlines())) > MAX_MODULE_LINES)
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_is_too_long():
    long = []
    for module in filter(_sized, MODULES):
        path = MODULES[module][0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(sorted(long))


def test_the_checks_see_the_package():
    """The graph is read from the files: a module that imports nothing of the package is rare, an empty graph
    would mean the parsing found nothing."""
    graph = _graph()
    assert len(MODULES) > 50 and sum(map(len, graph.values())) > 100
    assert "diffuse_engine.ops.backend" in graph["diffuse_engine.ops.commit"]
    assert "diffuse_engine.commit_batch" in graph["diffuse_engine.kernels.commit"]  # kernels/ resolves too
