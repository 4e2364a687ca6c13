"""Packaging without building: setup.py installs every package of the source tree and MANIFEST.in puts every
file the build and the package read into the sdist (the install itself is checked by .ci/check_install.sh)."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_packages() -> tuple[list[str], dict[str, str]]:
    """setup.py's package list and package_dir, computed by setup.py itself (setup() is not called)."""
    code = ("import runpy, setuptools, json; setuptools.setup = lambda **kw: print(json.dumps("
            "[kw['packages'], kw.get('package_dir', {})])); runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"DIFFUSE_SKIP_CUDA_BUILD": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    packages, package_dir = json.loads(proc.stdout.strip().splitlines()[-1])
    return packages, package_dir


def test_setup_installs_every_package_folder():
    packages, package_dir = _setup_packages()
    expected = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffuse_engine").rglob("__init__.py")
                if "__pycache__" not in p.parts}
    missing = expected - set(packages)
    assert not missing, f"setup.py does not install {sorted(missing)}"
    # kernels/ is imported by the package as diffuse_engine.kernels (relative imports only), so it installs there.
    assert package_dir.get("diffuse_engine.kernels") == "kernels"
    assert "diffuse_engine.kernels" in packages
    sub = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kernels").rglob("__init__.py")} - {"kernels"}
    assert not sub, f"kernels/ has subpackages {sorted(sub)} that setup.py does not map"


def test_kernels_import_only_relatively():
    """An absolute ``import kernels`` would work from a checkout but not once installed."""
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] != "kernels", f"{path.name} imports {node.module} absolutely"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "kernels" for a in node.names), path.name


def _manifest_rules() -> list[tuple[str, str, list[str]]]:
    rules = []
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "include":
            rules += [("include", "", words[1:])]
        elif words[0] == "recursive-include":
            rules += [("include", words[1], words[2:])]
        elif words[0] in ("global-exclude", "exclude", "recursive-exclude", "prune"):
            rules += [("exclude", words[1] if words[0] == "recursive-exclude" else "", words[1:])]
    return rules


def _in_manifest(rel: str) -> bool:
    included = False
    for kind, folder, patterns in _manifest_rules():
        name = rel.rsplit("/", 1)[-1]
        if kind == "include" and folder and rel.startswith(folder.rstrip("/") + "/"):
            included |= any(fnmatch.fnmatch(name, p) for p in patterns)
        elif kind == "include" and not folder:
            included |= any(fnmatch.fnmatch(rel, p) for p in patterns)
        elif kind == "exclude" and any(fnmatch.fnmatch(name, p) for p in patterns):
            included = False
    return included


def _tracked(folder: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except OSError:
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()
    return [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file()
            and "__pycache__" not in p.parts and not p.name.endswith((".so", ".pyc"))]


def test_manifest_covers_sources_and_data():
    files = _tracked("csrc") + _tracked("kernels") + _tracked("diffuse_engine") + ["README.md", "setup.py",
                                                                                  "pyproject.toml"]
    missing = [f for f in files if not _in_manifest(f)]
    assert not missing, f"MANIFEST.in leaves out {missing}"


def test_package_data_covers_zoo_files():
    """Wheels carry package data from setup.py's package_data: every shipped model file must match it."""
    text = (ROOT / "setup.py").read_text()
    patterns = ast.literal_eval(re.search(r'"diffuse_engine\.quality\.zoo": (\[[^\]]*\])', text).group(1))
    zoo = ROOT / "diffuse_engine" / "quality" / "zoo"
    files = [p.relative_to(zoo).as_posix() for p in zoo.glob("*/*")
             if p.is_file() and "__pycache__" not in p.parts]  # bytecode of a local run is not shipped
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"setup.py's package_data leaves out zoo files {missing}"


def test_public_names_import_from_the_package():
    import diffuse_engine
    from diffuse_engine import AsyncEngine
    from diffuse_engine.entrypoints.async_engine import AsyncEngine as Defined

    assert AsyncEngine is Defined
    assert all(hasattr(diffuse_engine, name) for name in diffuse_engine.__all__)


def test_ci_runs_the_readme_test_command_and_the_install_check():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# README: test command") + 1]
    assert f"```bash\n{command}\n```" in readme, "the README's test command differs from .ci/run's"
    assert ".ci/check_install.sh" in ci
    assert (ROOT / ".ci" / "check_install.sh").stat().st_mode & 0o111


def test_package_data_covers_the_shipped_harness_tasks():
    """The lm-evaluation-harness tasks (YAML and their dataset builder) are package data of the integrations."""
    text = (ROOT / "setup.py").read_text()
    patterns = ast.literal_eval(re.search(r'"diffuse_engine\.integrations": (\[[^\]]*\])', text).group(1))
    folder = ROOT / "diffuse_engine" / "integrations"
    files = [p.relative_to(folder).as_posix() for p in (folder / "lm_eval_tasks").glob("*") if p.is_file()
             and p.suffix in (".yaml", ".py")]
    assert len(files) >= 4
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"setup.py's package_data leaves out {missing}"
