#!/usr/bin/env bash
# The one-command GPU suite (shared/GPU.md): install without downloads, build csrc/ for sm_90a, measure the
# card's ceilings, run every GPU test, run the kernel and end-to-end benchmarks, profile an engine step, print the
# short table.
# Usage: benchmarks/gpu/run.sh [OUT_DIR]   (default: $OUT, else benchmarks/results/gpu-<date>)
# Writes at most 8 files into OUT_DIR: suite.log ceilings.json gpu-tests.xml kernels.csv profile.csv engine.csv
# cache.csv summary.md (kernels.csv holds the attention, sampling and LM-head rows, the union of their columns;
# the noise benchmark's table goes to suite.log only: it was measured on both cards)
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
#   => ~6 min in all (~360 s), under the 7 minutes. Each sub-step has a time limit (run_for) so that one that hangs
#   costs at most that; a failing or timed-out sub-step is logged and the suite goes on.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
run_for() { local limit=$1; shift; echo "+ $*"; timeout -k 10 "$limit" "$@" || { echo "FAILED ($?): $*"; status=1; }; }
run() { run_for 600 "$@"; }
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
echo "# suite start $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
start=$SECONDS
DIFFUSE_FORCE_CUDA_BUILD=1 run $PY -m pip install --no-deps --no-build-isolation -q -e .
run $PY -c "import diffuse_engine._C as C; print('native module:', C.__file__, 'devices:', C.cuda_device_count())"
echo "# install+build: $((SECONDS - start)) s"
run_for 60 $PY benchmarks/gpu/ceilings.py --out "$OUT_DIR/ceilings.json"
run_for 240 $PY -m pytest -m gpu -q -p no:cacheprovider tests --junitxml "$OUT_DIR/gpu-tests.xml"
echo "# tests done: $((SECONDS - start)) s"
run_for 90 $PY benchmarks/bench_noise.py --no-csv
run_for 150 $PY benchmarks/bench_attention.py --csv "$OUT_DIR/kernels.csv"
run_for 120 $PY benchmarks/bench_sample.py --csv "$OUT_DIR/kernels.csv"
run_for 120 $PY benchmarks/bench_lm_head.py --csv "$OUT_DIR/kernels.csv"
echo "# kernel benchmarks done: $((SECONDS - start)) s"
run_for 120 $PY benchmarks/gpu/profile_step.py --preset llada-8b --device cuda --dtype bfloat16 --batches 1,32 \
    --prompt-len 64 --gen-length 256 --block-length 32 --cache dual --policy threshold --threshold 0.9 \
    --out "$OUT_DIR/profile.csv"
echo "# profile done: $((SECONDS - start)) s"
run_for 120 $PY benchmarks/bench_engine.py --preset llada-8b --device cuda --dtype bfloat16 --init on-device \
    --prompt-len 64 --gen-lengths 256 --block-length 32 --batches 1 --tokens-per-step 1,2,4,8 \
    --ceilings --reference on --out "$OUT_DIR/engine.csv"
run_for 240 $PY benchmarks/bench_engine.py --preset llada-8b --device cuda --dtype bfloat16 --init on-device \
    --prompt-len 64 --gen-lengths 256 --block-length 32 --batches 1,8,32,64 --tokens-per-step 1 \
    --timing steady --warmup-steps 3 --timed-steps 6 --caches none,prefix,dual --graphs on,off \
    --ceilings --reference off --out "$OUT_DIR/engine.csv"
echo "# engine benchmarks done: $((SECONDS - start)) s"
run_for 150 $PY benchmarks/bench_cache.py --workloads llada-8b:256:32 --batch 1 --prompt-len 64 --device cuda \
    --init on-device --out "$OUT_DIR/cache.csv"
echo "# benchmarks done: $((SECONDS - start)) s"
run_for 60 $PY benchmarks/gpu/summary.py "$OUT_DIR"
echo "# suite end after $((SECONDS - start)) s, status $status"
exit $status
