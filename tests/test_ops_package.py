"""The ops package: its public surface, imports without a circle, backend settings read once from the environment,
the shared tensor-contract checker and the commit batch's validation."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffuse_engine import layout, native, ops
from diffuse_engine.commit_batch import CommitBatch
from diffuse_engine.contract import FLOATING, INTEGER, Contract, same_dtype
from diffuse_engine.errors import BackendUnavailableError
from diffuse_engine.ops import backend

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = (ops.BACKEND_ENV, ops.ATTENTION_ENV, backend.INTERPRET_ENV)


def test_public_surface():
    names = ["linear", "attention", "attention_backend", "attention_report", "backend_report",
             "block_attention_cached", "sample_and_score", "row_stats", "lm_head_stats", "commit", "counter_uniform",
             "counter_gumbel", "native_status", "requested_backend", "reload", "BACKENDS", "BACKEND_ENV",
             "INVARIANT_ROWS", "ATTENTION_BACKENDS", "ATTENTION_ENV", "BackendUnavailableError", "CommitBatch"]
    assert [n for n in names if not hasattr(ops, n)] == []
    assert ops.BackendUnavailableError is BackendUnavailableError
    from diffuse_engine.models import TokenLayout as from_models
    from diffuse_engine.models.layers import TokenLayout as from_layers

    assert from_models is from_layers is layout.TokenLayout
    assert ops.native_status is native.native_status


@pytest.mark.parametrize("module", ["diffuse_engine.ops", "diffuse_engine.native", "diffuse_engine.models.layers",
                                    "diffuse_engine.layout"])
def test_each_module_imports_first(module):
    """A fresh interpreter that imports the module before anything else of the package succeeds."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr


def _module_files() -> dict[str, Path]:
    """The ops package, native, the leaf modules, models.layers and the kernels, by module name."""
    files = {"diffuse_engine.ops": ROOT / "diffuse_engine" / "ops" / "__init__.py",
             "diffuse_engine.kernels": ROOT / "kernels" / "__init__.py",
             "diffuse_engine.models.layers": ROOT / "diffuse_engine" / "models" / "layers.py"}
    files |= {f"diffuse_engine.ops.{p.stem}": p for p in (ROOT / "diffuse_engine" / "ops").glob("*.py")}
    files |= {f"diffuse_engine.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")}
    files |= {f"diffuse_engine.{n}": ROOT / "diffuse_engine" / f"{n}.py"
              for n in ("native", "layout", "errors", "contract", "commit_batch")}
    return {n: p for n, p in files.items() if not n.endswith(".__init__")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``name`` imports anywhere (module level, in functions, under TYPE_CHECKING),
    with the packages that importing a submodule from outside them imports first."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    for mod in list(found):
        parts = mod.split(".")
        found |= {".".join(parts[:i]) for i in range(2, len(parts)) if not name.startswith(".".join(parts[:i]))}
    return {m for m in found if m in known and m != name}


def test_no_import_circle_among_ops_native_layers_and_kernels():
    files = _module_files()
    graph = {n: _imports(n, p, set(files)) for n, p in files.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert "diffuse_engine.ops.backend" in graph["diffuse_engine.ops"]  # the walk sees the imports


# -------------------------------------------------------------------------------------------- backend settings
def _call_every_op() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 16, generator=gen) for _ in range(3))
    ops.attention(q, k, v, layout.TokenLayout.packed([2, 4]))
    ops.attention(q, k, v, layout.TokenLayout.packed([6]), backend="reference")
    ops.attention_backend(q, layout.TokenLayout.padded(1, 6))
    rows = torch.arange(3)
    keys = (torch.ones(3), torch.arange(3), torch.zeros(3, dtype=torch.long), torch.arange(3))
    ops.sample_and_score(torch.randn(3, 11, generator=gen), *keys)
    ops.row_stats(torch.randn(3, 11, generator=gen), rows, *keys)
    ops.lm_head_stats(torch.randn(4, 16, generator=gen), torch.randn(11, 16, generator=gen), rows, *keys)
    ops.counter_uniform(*keys[1:], 2)
    ops.counter_gumbel(*keys[1:], 1, 5)
    batch = CommitBatch(torch.full((3,), 9), torch.tensor([0, 3]), torch.arange(3), torch.arange(3), torch.rand(3),
                        torch.zeros(3), torch.tensor([0], dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
                        torch.zeros(1), torch.zeros(1), torch.zeros(1), 9)
    ops.commit(batch, max_rows=3)
    ops.requested_backend()


def test_backend_choice_does_not_read_the_environment_per_call(monkeypatch):
    """After the first calls, no op reads DIFFUSE_BACKEND, DIFFUSE_ATTENTION_BACKEND or TRITON_INTERPRET again:
    the settings and each (op, device) choice are cached; ``reload`` reads them again."""
    reads = []

    class WatchedEnviron(dict):
        def __getitem__(self, key):
            if key in ENV_NAMES:
                reads.append(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            if key in ENV_NAMES:
                reads.append(key)
            return super().get(key, default)

        def __contains__(self, key):
            if key in ENV_NAMES:
                reads.append(key)
            return super().__contains__(key)

    ops.reload()
    _call_every_op()  # resolves and caches every choice
    monkeypatch.setattr(os, "environ", WatchedEnviron(os.environ))
    for _ in range(2):
        _call_every_op()
    assert reads == []
    ops.reload()
    assert set(reads) == set(ENV_NAMES)


def test_reload_applies_a_changed_environment(backend_env):
    backend_env(ops.BACKEND_ENV, "torch")
    assert ops.requested_backend() == "torch"
    assert backend.kernel_backend("commit", "cpu") == "torch"
    backend_env(ops.BACKEND_ENV, "triton", reload=False)
    backend_env(backend.INTERPRET_ENV, "1", reload=False)
    assert ops.requested_backend() == "torch" and backend.kernel_backend("commit", "cpu") == "torch"  # as read
    assert ops.reload() == backend.Settings(backend="triton", attention="", triton_interpret=True)
    assert ops.requested_backend() == "triton" and backend.kernel_backend("commit", "cpu") == "triton"
    backend_env(ops.BACKEND_ENV, "tpu")
    for _ in range(2):  # a refusal is not cached: it raises every time
        with pytest.raises(ValueError, match="DIFFUSE_BACKEND='tpu' is not a backend"):
            backend.kernel_backend("commit", "cpu")


def test_explicit_choices_that_cannot_run_raise(backend_env):
    backend_env(ops.BACKEND_ENV, "cuda")
    with pytest.raises(BackendUnavailableError, match="op 'lm_head_stats' has no cuda implementation"):
        backend.kernel_backend("lm_head_stats", "cpu")
    backend_env(ops.BACKEND_ENV, "triton")
    backend_env(backend.INTERPRET_ENV, None)
    with pytest.raises(BackendUnavailableError, match="DIFFUSE_BACKEND=triton was requested for row_stats, but"):
        backend.kernel_backend("row_stats", "cpu")
    with pytest.raises(BackendUnavailableError, match="op 'counter_uniform' has no triton implementation"):
        backend.kernel_backend("counter_uniform", "cpu")
    with pytest.raises(BackendUnavailableError, match="top-k / top-p filters or fp64 logits"):
        backend.sampling_backend("cpu", torch.float64, False)


def test_automatic_choice_remembers_a_failure(monkeypatch):
    monkeypatch.setattr(backend, "_FAILURES", {})
    assert backend.failure("sample_and_score") is None
    backend.record_failure("sample_and_score", "RuntimeError: no kernel image")
    assert backend.failure("sample_and_score") == "RuntimeError: no kernel image"
    assert backend.sampling_backend("cuda", torch.float32, False) == "torch"


# ----------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("args,kwargs,message", [
    (([1, 2], None), {}, "x must be a torch.Tensor, got list."),
    ((torch.zeros(3, dtype=torch.int32), torch.int64), {}, "x must be int64, got int32."),
    ((torch.zeros(3), (torch.int64, torch.int32)), {}, "x must be int64 or int32, got float32."),
    ((torch.zeros(3), INTEGER), {}, "x must be integer, got float32."),
    ((torch.zeros(3, dtype=torch.long), FLOATING), {}, "x must be floating-point, got int64."),
    ((torch.zeros(3, 1), None), {"ndim": 1, "dims": "[M]"}, "x must be 1-D [M], got shape (3, 1)."),
    ((torch.zeros(2), None), {"length": (3, "M, as rows")}, "x must have 3 entries (M, as rows), got 2."),
    ((torch.zeros(2, 4), None), {"shape": (2, 5), "dims": "[B, V]"}, "x must have shape (2, 5) [B, V], got (2, 4)."),
    ((torch.zeros(2, device="meta"), None), {}, "x is on meta but ref is on cpu; all tensors must be on one device."),
    ((torch.zeros(6)[::2], None), {"contiguous": True}, "x must be contiguous."),
    ((torch.zeros(4, 3).t(), None), {"last_dim_contiguous": True},
     "x must have a contiguous last dimension (stride 1), got strides (1, 3)."),
])
def test_contract_sentences(args, kwargs, message):
    check = Contract("ref", torch.zeros(1))
    with pytest.raises(ValueError) as err:
        check("x", *args, **kwargs)
    assert str(err.value) == message


def test_contract_accepts_and_returns_a_good_tensor():
    t = torch.zeros(4, 3)[:, :2]
    check = Contract("ref", torch.zeros(1))
    assert check("x", t, torch.float32, ndim=2, length=(4, ""), shape=(4, 2), last_dim_contiguous=True) is t
    assert same_dtype({"q": t, "k": t}, (torch.float16, torch.float32)) == torch.float32
    with pytest.raises(ValueError, match=r"^q, k and v must share one dtype of float16 or float32; got float32, "
                                         r"float32, float64\.$"):
        same_dtype({"q": t, "k": t, "v": t.double()}, (torch.float16, torch.float32))


# ------------------------------------------------------------------------------------------------- commit batch
def _batch(**changes) -> CommitBatch:
    fields = dict(canvas=torch.zeros(6, dtype=torch.long), row_offsets=torch.tensor([0, 2, 3]),
                  row_index=torch.arange(3), token=torch.arange(3), score=torch.rand(3), entropy=torch.zeros(3),
                  mode=torch.zeros(2, dtype=torch.int32), count=torch.ones(2, dtype=torch.int32),
                  threshold=torch.zeros(2), factor=torch.zeros(2), eb_gamma=torch.zeros(2), mask_id=5,
                  revise_offsets=torch.tensor([0, 1, 2]), revise_index=torch.tensor([4, 5]),
                  revise_score=torch.rand(2), remask_bound=torch.zeros(2))
    return CommitBatch(**(fields | changes))


def test_commit_batch_validation():
    batch = _batch()
    assert batch.validate() is batch and (batch.num_requests, batch.num_rows, batch.has_revision) == (2, 3, True)
    loose = _batch(mode=torch.zeros(2, dtype=torch.long), score=torch.rand(6)[::2])
    loose.validate(strict=False)  # the torch path converts dtypes and takes any strides
    with pytest.raises(ValueError, match="score must be contiguous"):
        loose.validate()
    with pytest.raises(ValueError, match="mode must be int32, got int64"):
        _batch(mode=torch.zeros(2, dtype=torch.long)).validate()
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"count must have 2 entries \(B, one per request\), got 3"):
            _batch(count=torch.ones(3, dtype=torch.int32)).validate(strict=strict)
        with pytest.raises(ValueError, match="come all together or not at all"):
            _batch(revise_score=None).validate(strict=strict)
        with pytest.raises(ValueError, match="mask_id must be an int64 value, got True"):
            _batch(mask_id=True).validate(strict=strict)
        with pytest.raises(ValueError, match="row_offsets must be"):
            _batch(row_offsets=torch.zeros(0, dtype=torch.long)).validate(strict=strict)
