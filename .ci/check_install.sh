#!/usr/bin/env bash
# Install check: builds an sdist, builds a wheel from that sdist (so the sdist is complete: the native module builds
# from its own files), installs the wheel (non-editable) into a fresh venv holding only torch==2.13.0 (the CPU
# build) first, and then, from a folder outside the checkout: imports every
# module of the installed package, checks that the native module diffuse_engine._C was built (when
# DIFFUSE_REQUIRE_NATIVE=1, as in CI; nvcc must be present) and runs the README's first generate command.
# Usage: .ci/check_install.sh   (PYTHON=python3.X to choose the interpreter)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/diffuse-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ "${DIFFUSE_REQUIRE_NATIVE:-0}" = 1 ]; then export DIFFUSE_FORCE_CUDA_BUILD=1; fi
start=$SECONDS
step() { echo "check_install [$((SECONDS - start)) s]: $*"; }
# pip without byte-compiling (torch's and triton's .pyc cost more CPU than the install) and without the notices
# about index locations of this machine's pip configuration.
pip_q() {
    local venv=$1 cmd=$2; shift 2
    if [ "$cmd" = install ]; then set -- --no-compile "$@"; fi
    "$venv/bin/pip" "$cmd" -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

step "sdist"
"$PY" -m venv "$WORK/build"
pip_q "$WORK/build" install setuptools wheel pybind11
# setup.py's egg-info goes to $WORK, so the checkout stays as it is; its output shows only when it fails.
(cd "$ROOT" && DIFFUSE_SKIP_CUDA_BUILD=1 "$WORK/build/bin/python" setup.py -q egg_info --egg-base "$WORK" \
    sdist -d "$WORK/dist" >"$WORK/sdist.log" 2>&1) || { cat "$WORK/sdist.log" >&2; exit 1; }
sdist=$(ls "$WORK"/dist/*.tar.gz)
step "wheel from $(basename "$sdist") (the native module builds from the sdist's own files)"
pip_q "$WORK/build" wheel --no-deps -w "$WORK/dist" "$sdist"
wheel=$(ls "$WORK"/dist/*.whl)

mkdir -p "$WORK/outside"
for artifact in "$wheel"; do  # installing the sdist would build this same wheel a second time
    name=$(basename "$artifact")
    venv="$WORK/venv-${name##*.}"
    step "install $name into a fresh venv"
    "$PY" -m venv "$venv"
    pip_q "$venv" install torch==2.13.0
    pip_q "$venv" install "$artifact"
    step "import every module, native module, generate ($name)"
    (cd "$WORK/outside" && "$venv/bin/python" - "$ROOT" <<'PY'
import importlib
import os
import pkgutil
import sys

import diffuse_engine

root = os.path.realpath(sys.argv[1])
location = os.path.realpath(diffuse_engine.__file__)
assert not location.startswith(root + os.sep), f"diffuse_engine imported from the checkout: {location}"
failed, optional = [], []
# Modules of an optional extra import only with it (installed here without extras): their one allowed failure is
# the missing dependency itself.
EXTRAS = {"diffuse_engine.integrations.lm_eval": "lm_eval"}
names = ["diffuse_engine"]
for mod in pkgutil.walk_packages(diffuse_engine.__path__, "diffuse_engine.", onerror=names.append):
    names.append(mod.name)
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if EXTRAS.get(name) and (exc.name or "").split(".")[0] == EXTRAS[name]:
            optional.append(name)
        else:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - every failure is listed
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
assert not failed, "modules that do not import:\n  " + "\n  ".join(failed)
print(f"imported {len(names) - len(optional)} modules from {os.path.dirname(location)}"
      + (f" ({', '.join(optional)}: its extra is not installed)" if optional else ""))
if os.environ.get("DIFFUSE_REQUIRE_NATIVE") == "1":
    from diffuse_engine import _C

    print(f"native module: {_C.__file__}")
PY
    )
    out=$(cd "$WORK/outside" && "$venv/bin/diffuse-engine" generate --model addition --prompt "04821+00379=")
    echo "$out"
    grep -q "05200" <<<"$out" || { echo "check_install: expected 05200 in the answer of $name" >&2; exit 1; }
    if [ -n "$(cd "$WORK/outside" && ls -A)" ]; then
        echo "check_install: generate wrote files into the working folder" >&2; exit 1
    fi
done
step "ok"
