"""Build script for diffuse-engine.

The Python package always installs. The native module ``diffuse_engine._C`` (CUDA kernels and their C++
CPU twins from ``csrc/``, bound with pybind11, no torch headers) is built only when ``nvcc`` is found and
``DIFFUSE_SKIP_CUDA_BUILD`` is not ``1``. Environment flags:

- ``DIFFUSE_SKIP_CUDA_BUILD=1``: never build the native module.
- ``DIFFUSE_FORCE_CUDA_BUILD=1``: fail the install if the native module cannot be built.
- ``DIFFUSE_CUDA_ARCHS``: semicolon-separated ``compute_XX,sm_XX`` pairs (default ``compute_90a,sm_90a``).
- ``CUDA_HOME``: toolkit location when ``nvcc`` is not on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def read_version() -> str:
    text = (ROOT / "diffuse_engine" / "version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def find_cuda_home(nvcc: str) -> Path:
    """The toolkit root (holding include/cuda_runtime.h and the static runtime). ``nvcc`` may be a wrapper script
    outside the toolkit (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), so its own location is
    only one candidate; nvcc's dry run names the real one (TOP=...)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        candidates += [m.strip() for m in re.findall(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if cand and (Path(cand) / "include" / "cuda_runtime.h").exists():
            return Path(cand).resolve()
    raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc} (include/cuda_runtime.h); set CUDA_HOME")


def want_native() -> tuple[bool, str]:
    if os.environ.get("DIFFUSE_SKIP_CUDA_BUILD", "0") == "1":
        return False, "DIFFUSE_SKIP_CUDA_BUILD=1"
    if not any(CSRC.glob("*.cu")):
        return False, "csrc/ holds no CUDA sources"
    if find_nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, ""


class NvccBuildExt(build_ext):
    """Compiles ``.cu`` files with nvcc into objects, then links them with the C++ sources."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except Exception as exc:  # noqa: BLE001 - the build is optional unless forced
            if os.environ.get("DIFFUSE_FORCE_CUDA_BUILD", "0") == "1":
                raise
            print(f"diffuse-engine: native module not built ({exc}); the pure Python package is installed.",
                  file=sys.stderr)

    def _build(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        cuda_home = find_cuda_home(nvcc)
        archs = os.environ.get("DIFFUSE_CUDA_ARCHS", "compute_90a,sm_90a").split(";")
        obj_dir = Path(self.build_temp) / "cuda_objs"
        obj_dir.mkdir(parents=True, exist_ok=True)
        # Keep the full source list on the extension: build_extension may run more than once per install.
        all_sources = getattr(ext, "_all_sources", None) or list(ext.sources)
        ext._all_sources = all_sources
        cu_sources = [s for s in all_sources if s.endswith(".cu")]
        ext.sources = [s for s in all_sources if not s.endswith(".cu")]
        objects = []
        for src in cu_sources:
            obj = obj_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", "-lineinfo", f"-I{CSRC}"]
            for pair in archs:
                compute, sm = pair.split(",")
                cmd += ["-gencode", f"arch={compute},code={sm}"]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = objects
        # The .cu files and headers are not in ext.sources: list them so a change to them relinks the module.
        ext.depends = sorted(set(list(ext.depends) + cu_sources + [str(p) for p in CSRC.glob("*.cuh")]
                                 + [str(p) for p in CSRC.glob("*.h")]))
        print(f"diffuse-engine: CUDA objects compiled for {', '.join(archs)} with {nvcc} (toolkit {cuda_home}).")
        ext.library_dirs = [str(cuda_home / "lib64"), str(cuda_home / "lib64" / "stubs")]
        # Static CUDA runtime: the module imports on machines without CUDA libraries (and without a GPU).
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
        ext.include_dirs = list(ext.include_dirs) + [str(cuda_home / "include")]
        super().build_extension(ext)


# Every package under diffuse_engine/, plus the top-level kernels/ folder installed as diffuse_engine.kernels
# (its modules import the package's own modules relatively). MANIFEST.in lists the same data for the sdist.
PACKAGES = sorted(find_packages(include=["diffuse_engine", "diffuse_engine.*"]) + ["diffuse_engine.kernels"])
PACKAGE_DATA = {
    "diffuse_engine": ["py.typed", "*.json", "*.jinja"],
    "diffuse_engine.quality.zoo": ["*/*.json", "*/*.jinja", "*/*.safetensors", "*/*.md", "*/*.csv"],
    "diffuse_engine.integrations": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"],
}


def native_extensions() -> list[Extension]:
    ok, why = want_native()
    if not ok:
        print(f"diffuse-engine: skipping the native module: {why}.", file=sys.stderr)
        return []
    import pybind11

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    return [Extension(
        "diffuse_engine._C",
        sources=sources,
        include_dirs=[pybind11.get_include(), str(CSRC)],
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        language="c++",
    )]


setup(
    name="diffuse-engine",
    version=read_version(),
    description="Custom-kernel inference engine for diffusion language models (LLaDA, Dream, block diffusion).",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"diffuse_engine.kernels": "kernels"},
    package_data=PACKAGE_DATA,
    include_package_data=True,
    install_requires=[
        "torch>=2.5,<2.15",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "jinja2>=3.0",
        "numpy",
        "tqdm>=4.60",
        "pybind11>=2.12",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "scipy", "matplotlib", "fastapi", "uvicorn", "openai", "httpx",
                 "lm-eval>=0.4.13,<0.5", "huggingface_hub>=0.34"],
        "eval": ["matplotlib", "lm-eval>=0.4.13,<0.5"],
        "plots": ["matplotlib"],
        "flash": ["flash-attn"],
        "serve": ["fastapi", "uvicorn"],
        "hub": ["huggingface_hub>=0.34"],  # ORG/NAME model names: download from / read the Hugging Face Hub cache
    },
    entry_points={"console_scripts": ["diffuse-engine=diffuse_engine.entrypoints.cli:main"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": NvccBuildExt},
    zip_safe=False,
)
