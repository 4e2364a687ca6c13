#!/usr/bin/env bash
# The one-command GPU suite (shared/GPU.md): install without downloads, build csrc/ for sm_90a, then
# `diffuse-engine bench gpu` (diffuse_engine/bench/suites/gpu.py): measure the card's ceilings, run every GPU test,
# run the kernel and end-to-end benchmarks, profile an engine step, print the short table.
# Usage: benchmarks/gpu/run.sh [OUT_DIR]   (default: $OUT, else benchmarks/results/gpu-<date>)
# Writes at most 8 files into OUT_DIR: suite.log ceilings.json gpu-tests.xml kernels.csv profile.csv engine.csv
# cache.csv summary.md (kernels.csv holds the attention, sampling and LM-head rows, the union of their columns;
# the noise benchmark's table goes to suite.log only: it was measured on both cards)
# (the list is diffuse_engine.bench.suites.gpu.FILES)
#
# Wall time on an H200, estimated from the first run (gpu-2026-11-26-h200: 137 s in all; install+build 17 s,
# 43 GPU tests 21 s; a LLaDA-8B-shape step without cache 18.8 ms at batch 1, ~85 ms at 8, ~325 ms at 32) and the
# steps' counts (the kernel benchmarks, the cache benchmark and the profile have not run on a GPU yet):
#   install + build ~25 s, ceilings ~5 s, GPU tests (now ~140) ~75 s, noise ~15 s
#   kernels.csv: attention 28 timings ~35 s, sampling 18 ~25 s, LM head 21 ~25 s (do_bench ~0.7 s each, compiles)
#   profile.csv: model ~8 s; batch 1 and 32: warm-up, 3 timed and 4-8 profiled steps, traces ~15 s  => ~25 s
#   engine.csv, generations at batch 1, tokens/step 1,2,4,8, with the reference loop (18 s before) => ~30 s
#   engine.csv, steady steps, 3 warm-up + 6 timed each (the first a full step, the rest cached):
#     none, batch 1/8/32/64 (64: ~0.65 s a step, twice batch 32): 9 x 1.08 s                    ~ 10 s
#     prefix (first block: 256 of 320 tokens recomputed), graphs off and on: 2 x (1.08 + 8 x 0.87 s) ~ 16 s
#     dual (32 tokens recomputed per sequence, ~0.01-0.08 s a step), graphs off and on            ~  4 s
#     start, model, ceilings, 20 engines, 8 graph captures, Triton compiles                      ~ 40 s  => ~70 s
#   cache.csv (batch 1: reference loop + 6 settings of ~256 steps) ~35 s; summary ~1 s
#   => ~6 min in all (~360 s), under the 7 minutes. Each sub-step of `bench gpu` has a time limit so that one that
#   hangs costs at most that; a failing or timed-out sub-step is logged and the suite goes on (exit status 1).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
run_for() { local limit=$1; shift; echo "+ $*"; timeout -k 10 "$limit" "$@" || { echo "FAILED ($?): $*"; status=1; }; }
echo "# install start $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)" \
    | tee -a "$OUT_DIR/suite.log"
start=$SECONDS
{
    DIFFUSE_FORCE_CUDA_BUILD=1 run_for 600 $PY -m pip install --no-deps --no-build-isolation -q -e .
    run_for 600 $PY -c "import diffuse_engine._C as C; print('native module:', C.__file__, 'devices:', C.cuda_device_count())"
    echo "# install+build: $((SECONDS - start)) s"
    exit $status
} 2>&1 | tee -a "$OUT_DIR/suite.log"
status=${PIPESTATUS[0]}
# the suite appends to $OUT_DIR/suite.log itself
$PY -m diffuse_engine bench gpu --device cuda --out "$OUT_DIR" || status=$?  # 1: a sub-step failed
echo "# run.sh end after $((SECONDS - start)) s, status $status" | tee -a "$OUT_DIR/suite.log"
exit $status
