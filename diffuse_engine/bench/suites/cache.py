"""The cache suite: tokens/s of {no cache, prefix, dual} x {fixed steps, threshold} against the reference loop on the
same machine in one run, with the tokens' agreement with the reference and, for a task model, the accuracy; and,
for fixed schedules, each cache's measured speedup over no cache against its FLOP ratio (``pct_of_ideal``).

The reference loop is LLaDA's published ``generate()`` (the checkout's tests/oracles.py, :mod:`..reference`; outside
a checkout its row is skipped and ``speedup`` / ``agreement`` stay empty). Workloads are
``model:gen_length:block_length`` (model: a preset, random weights, or a shipped model). ``diffuse-engine bench
cache``: ``--quick`` runs ``llada-tiny:32:16,addition:12:6``; ``--preset`` / ``--model`` NAME runs
``NAME:<--gen-lengths>:<--block-length>`` at batch ``--batches``. Rows go to ``<out>/cache.csv``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ...entrypoints.llm import LLM
from ...models import build_model
from ...presets import PRESETS, from_name
from ...progress import progress
from ...quality.tasks import get_task
from ...sampling_params import SamplingParams
from .. import reference
from ..common import append_csv, stamp, sync
from .options import DTYPES, given, resolve_device, resolve_dtype

SETTINGS = [  # (name, SamplingParams fields)
    ("none/fixed", {}),
    ("prefix/fixed", {"cache": "prefix"}),
    ("dual/fixed", {"cache": "dual"}),
    ("none/threshold", {"policy": "threshold"}),
    ("prefix/threshold", {"policy": "threshold", "cache": "prefix"}),
    ("dual/threshold", {"policy": "threshold", "cache": "dual"}),
]
COLUMNS = ["workload", "setting", "batch", "nfe", "tokens_per_forward", "seconds", "tokens_per_s", "speedup",
           "agreement", "accuracy", "reference_accuracy", "flop_ideal", "pct_of_ideal"]
DEFAULT_WORKLOADS = "llada-small:256:32,addition:256:32,addition:6:6"
QUICK_WORKLOADS = "llada-tiny:32:16,addition:12:6"
KEYS = {"cache.csv": (("workload", "setting", "batch"), "seconds")}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The cache benchmark's options from ``diffuse-engine bench`` flags."""
    device = resolve_device(args.device)
    quick = bool(args.quick)
    name = getattr(args, "model", None) or args.preset
    workloads = QUICK_WORKLOADS if quick else DEFAULT_WORKLOADS
    if name:
        if name in PRESETS:
            gen, block = (32, 16) if quick else (256, 32)
        else:
            gen = block = get_task(name).gen_length  # a shipped task model: its own canvas
        gen = given(args, "gen_lengths", [gen])[0]
        workloads = f"{name}:{gen}:{given(args, 'block_length', min(block, gen))}"
    return argparse.Namespace(
        workloads=workloads, batch=given(args, "batches", [2])[0], task_batch=4 if quick else 32,
        prompt_len=given(args, "prompt_len", 8 if quick else 32), threshold=0.9, device=str(device),
        dtype=resolve_dtype(args.dtype, device), init="on-device" if device.type == "cuda" else "cpu", quick=quick,
        progress=args.progress)


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """``diffuse-engine bench cache``: rows appended to ``out/cache.csv``."""
    rows = measure_all(settings(args))
    append_csv(out / "cache.csv", rows, union=True)
    return rows


def _workload(spec: str, opts: argparse.Namespace):
    try:
        name, gen, block = spec.split(":")
        gen, block = int(gen), int(block)
    except ValueError:
        raise ValueError(f"a workload is model:gen_length:block_length; got {spec!r}.") from None
    task = None
    if name in PRESETS:
        model = build_model(from_name(name).config, device=opts.device, dtype=DTYPES[opts.dtype])
        model = model.init_random_(0, on_device=opts.init == "on-device").eval()
        llm = LLM.from_model(model)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 256, (opts.batch, opts.prompt_len), generator=g).tolist()
    else:
        llm = LLM(name, device=opts.device, dtype=opts.dtype)
        task = get_task(name)
        prompts = [llm.tokenizer.encode(ex.prompt) for ex in task.test_set(opts.task_batch)]
        if len({len(p) for p in prompts}) != 1:
            raise ValueError(f"the reference loop needs equal-length prompts; {name}'s test prompts differ.")
    return llm, task, prompts, gen, block


def schedule_flops(cost_model, cache: str, batch: int, prompt_len: int, gen: int, block: int, shift: int) -> float:
    """FLOPs of a whole fixed one-token-per-step generation with ``cache`` (the engine's cost model counts each
    step: matmuls, attention over the context read, the LM head over the block's masked rows). Per block: the
    first step recomputes everything (a cache refresh); then ``none`` recomputes the whole sequence, ``prefix`` from
    the block on (reading the prefix), ``dual`` the block (reading the rest)."""
    total, length = 0.0, prompt_len + gen
    for start in range(prompt_len, prompt_len + gen, block):
        for j in range(block):
            rows = block - j
            if j == 0 or cache == "none":
                item = (length, 0, rows)
            elif cache == "prefix":
                item = (length - start + shift, start - shift, rows)
            else:
                item = (block + shift, length - block - shift, rows)
            total += cost_model.predict([item] * batch).flops
    return total


def _accuracy(llm: LLM, task, prompts: list[list[int]], canvases: list[list[int]]) -> float | None:
    if task is None or canvases is None:
        return None
    cfg = llm.model.config
    stops = {cfg.eos_token_id, cfg.eot_token_id}
    ok = 0
    for p, c in zip(prompts, canvases, strict=True):
        cut = next((i for i, t in enumerate(c) if t in stops), len(c))
        ok += task.check(llm.tokenizer.decode(p), llm.tokenizer.decode(c[:cut]))
    return ok / len(prompts)


def _reference(llm: LLM, prompts: list[list[int]], gen: int, block: int, device) -> tuple[list | None, float | None]:
    """The reference loop's tokens and seconds, or (None, None) outside a checkout."""
    if reference.oracle() is None:
        return None, None
    x = torch.tensor(prompts, device=device)
    sync(device)
    t0 = time.perf_counter()
    ref = reference.llada_generate(llm.model, x, steps=gen, gen_length=gen, block_length=block,
                                   mask_id=llm.model.config.mask_token_id)[:, x.shape[1]:].tolist()
    sync(device)
    return ref, time.perf_counter() - t0


def measure_all(opts: argparse.Namespace) -> list[dict]:
    """Every setting of every workload of ``opts`` (the script's flags, or :func:`settings`)."""
    if reference.oracle() is None:
        print(f"# {reference.unavailable_reason()}", flush=True)
    rows = []
    base = stamp(opts.device)
    specs = opts.workloads.split(",")
    for spec in progress(specs, total=len(specs), desc="cache", show=getattr(opts, "progress", None)):
        rows += _measure_workload(opts, spec, base)
    return rows


def _measure_workload(opts: argparse.Namespace, spec: str, base: dict) -> list[dict]:
    llm, task, prompts, gen, block = _workload(spec, opts)
    cfg = llm.model.config
    ref, ref_s = _reference(llm, prompts, gen, block, opts.device)
    tokens = gen * len(prompts)
    ref_acc = _accuracy(llm, task, prompts, ref)
    rows = []
    if ref is not None:
        rows.append({**base, "workload": spec, "setting": "reference loop", "batch": len(prompts), "nfe": gen,
                     "tokens_per_forward": 1.0, "seconds": round(ref_s, 3), "tokens_per_s": round(tokens / ref_s, 1),
                     "speedup": 1.0, "agreement": 1.0, "accuracy": ref_acc, "reference_accuracy": ref_acc,
                     "flop_ideal": None, "pct_of_ideal": None})
    shift = 1 if cfg.shifted_logits else 0
    flops = {c: schedule_flops(llm.engine.cost_model, c, len(prompts), len(prompts[0]), gen, block, shift)
             for c in ("none", "prefix", "dual")}
    none_s = None
    for name, fields in SETTINGS:
        params = SamplingParams(gen_length=gen, block_length=block, steps=gen, seed=0,
                                threshold=opts.threshold, **fields)
        sync(opts.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(opts.device)
        secs = time.perf_counter() - t0
        canv = [o.token_ids for o in outs]
        agree = None if ref is None else sum(
            a == b for c, r in zip(canv, ref, strict=True) for a, b in zip(c, r, strict=True)) / tokens
        nfe = sum(o.nfe for o in outs) / len(outs)
        # The cache's measured speedup over no cache against its FLOP ratio (fixed schedules only: a threshold
        # run's steps depend on the model).
        ideal = pct = None
        if name == "none/fixed":
            none_s = secs
        elif name.endswith("/fixed") and none_s is not None:
            ideal = flops["none"] / flops[fields["cache"]]
            pct = round(100 * (none_s / secs) / ideal, 1)
            ideal = round(ideal, 2)
        rows.append({**base, "workload": spec, "setting": name, "batch": len(prompts), "nfe": round(nfe, 2),
                     "tokens_per_forward": round(gen / nfe, 2), "seconds": round(secs, 3),
                     "tokens_per_s": round(tokens / secs, 1),
                     "speedup": None if ref_s is None else round(ref_s / secs, 2),
                     "agreement": None if agree is None else round(agree, 4),
                     "accuracy": _accuracy(llm, task, prompts, canv), "reference_accuracy": ref_acc,
                     "flop_ideal": ideal, "pct_of_ideal": pct})
        print(f"{spec:<20} {name:<18} NFE {nfe:7.2f}  {tokens / secs:9.1f} tok/s"
              + ("" if ref is None else f"  x{ref_s / secs:6.2f}  agreement {agree:.3f}"), flush=True)
    return rows
