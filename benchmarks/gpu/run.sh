#!/usr/bin/env bash
# The one-command GPU suite (shared/GPU.md): install without downloads, build csrc/ for sm_90a, measure the
# card's ceilings, run every GPU test, run the kernel and end-to-end benchmarks, print the short table.
# Usage: benchmarks/gpu/run.sh [OUT_DIR]   (default: $OUT, else benchmarks/results/gpu-<date>)
# Writes at most 8 files into OUT_DIR: suite.log ceilings.json gpu-tests.xml attention.csv sampling.csv engine.csv
# cache.csv summary.md (the noise benchmark's table goes to suite.log only: it was measured on both cards)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
run() { echo "+ $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
echo "# suite start $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
start=$SECONDS
DIFFUSE_FORCE_CUDA_BUILD=1 run $PY -m pip install --no-deps --no-build-isolation -q -e .
run $PY -c "import diffuse_engine._C as C; print('native module:', C.__file__, 'devices:', C.cuda_device_count())"
echo "# install+build: $((SECONDS - start)) s"
run $PY benchmarks/gpu/ceilings.py --out "$OUT_DIR/ceilings.json"
run $PY -m pytest -m gpu -q -p no:cacheprovider tests --junitxml "$OUT_DIR/gpu-tests.xml"
echo "# tests done: $((SECONDS - start)) s"
run $PY benchmarks/bench_noise.py --no-csv
run $PY benchmarks/bench_attention.py --csv "$OUT_DIR/attention.csv"
run $PY benchmarks/bench_sample.py --csv "$OUT_DIR/sampling.csv"
run $PY benchmarks/bench_lm_head.py --csv "$OUT_DIR/sampling.csv"
run $PY benchmarks/bench_engine.py --preset llada-8b --device cuda --dtype bfloat16 --init on-device \
    --prompt-len 64 --gen-lengths 256 --block-length 32 --batches 1,8 --tokens-per-step 1,2,4,8 \
    --ceilings --reference on --out "$OUT_DIR/engine.csv"
run $PY benchmarks/bench_engine.py --preset llada-8b --device cuda --dtype bfloat16 --init on-device \
    --prompt-len 64 --gen-lengths 256 --block-length 32 --batches 32 --tokens-per-step 8 \
    --ceilings --reference off --out "$OUT_DIR/engine.csv"
run $PY benchmarks/bench_cache.py --workloads llada-8b:256:32 --batch 1 --prompt-len 64 --device cuda \
    --init on-device --out "$OUT_DIR/cache.csv"
echo "# benchmarks done: $((SECONDS - start)) s"
run $PY benchmarks/gpu/summary.py "$OUT_DIR"
echo "# suite end, status $status"
exit $status
