"""The denoising engine: ``add_request / step / abort / has_unfinished``.

Each :meth:`Engine.step` runs one denoising step for every running request in a single forward: requests of
different lengths and settings batch together. A request's tokens do not depend on its batch: it keeps its own
positions, its randomness is keyed by (seed, step, position), and CPU matmuls are batch-invariant
(``ops.INVARIANT_ROWS``).

The step lives on the device. Running requests keep their tokens in slots of a persistent batch
(:class:`~.canvas.CanvasStore`); a step is planned on the host from host values only (:mod:`.plan`, reused while
no request changes phase), runs forward, head, decisions and commit on the device (:mod:`.step`, or a CUDA graph of
it: :mod:`.graphs`) and ends in one asynchronous device-to-host copy into pinned memory of what the host needs:
per-request counters (block progress, end-of-text, failures) and the window's tokens, from which the host keeps its
mirror of every canvas. All host decisions (block ends, stop strings, finishing) read that copy, and no other
device value is ever read.
"""

from __future__ import annotations

import itertools
import secrets
import time
import warnings
from collections import OrderedDict, deque

import numpy as np
import torch

from ..errors import BackendUnavailableError
from ..models import DiffusionLM
from ..policies import decoding_policy
from ..sampling_params import SamplingParams
from .canvas import CanvasStore, upload
from .config import EngineConfig
from .cost_model import CPU, H100, CostModel, DeviceCeilings, StepEstimate, ceilings_for
from .kv_cache import PagedKVCache
from .plan import COUNTERS, StepPlan, build_plan, phase
from .request import Request, RequestOutput, RequestStatus, StepOutput, _StepView
from .runner import ModelRunner
from .scheduler import Scheduler

_BLOCK_MASKED, _FIRST_MASKED, _EOS, _INVALID, _REVISED = range(len(COUNTERS))

__all__ = ["Engine", "EngineConfig"]


class Engine:
    """Runs requests on ``model``. ``tokenizer`` (optional) decodes each finished answer into ``text``."""

    def __init__(self, model: DiffusionLM, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        device, dtype = self.model.device, self.model.dtype
        if self.config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}. Use None "
                             f"(graphs on CUDA only) or False.")
        self.runner = ModelRunner(model, fused_head=self.config.fused_head, cuda_graphs=self.config.cuda_graphs)
        self.kv_cache: PagedKVCache | None = None
        cfg = self.model_config
        # A block-diffusion request's sequence runs to the end of its last model block: past the model's length by
        # less than a block.
        longest = cfg.max_position_embeddings + (getattr(cfg, "block_size", None) or 0)
        self.store = CanvasStore(self.config.max_num_seqs, longest, device, cfg.mask_token_id)
        self._plan: StepPlan | None = None
        self._host: torch.Tensor | None = None  # pinned buffer of the step's copy (CUDA)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        calibrate = self.config.calibrate if self.config.calibrate is not None else device.type == "cuda"
        fused = self.config.fused_head if self.config.fused_head is not None else device.type == "cuda"
        self.cost_model = CostModel(self.model_config, self._ceilings(device, dtype, calibrate),
                                    torch.empty((), dtype=dtype).element_size(), fused_head=bool(fused))
        self.scheduler = Scheduler(self.cost_model, scheduling=self.config.scheduling,
                                   max_step_seconds=self.config.max_step_seconds)
        self.last_estimate: StepEstimate | None = None  # the cost model's view of the last step
        self.retained: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # id -> (tokens, pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._known: set[str] = set()
        self.num_steps = 0
        self.step_seconds = 0.0
        self.num_failed_steps = 0  # batched steps that raised (their failures were pinned to requests)
        self.last_step_error: str | None = None  # why the last step raised; None when it ran

    def _ceilings(self, device: torch.device, dtype: torch.dtype, calibrate: bool) -> DeviceCeilings:
        """The device's ceilings for the cost model. An automatic calibration that fails (or a GPU without a
        preset) falls back, with a warning, to the closest preset; an explicit ``calibrate=True`` raises."""
        try:
            return ceilings_for(device, dtype, calibrate=calibrate)
        except Exception as exc:  # noqa: BLE001 - scheduling must not stop the engine from running
            if self.config.calibrate:
                raise
            fallback = CPU if device.type == "cpu" else H100
            warnings.warn(f"no ceilings for {device} ({type(exc).__name__}: {exc}); the scheduler uses the "
                          f"{fallback.name} preset.", RuntimeWarning, stacklevel=3)
            return fallback

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, snapshots: bool = False, retain: bool = False,
                    continue_from: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError (with the reason) for a request that cannot run.
        ``snapshots``: its step outputs carry each position's commit confidence (canvas snapshots).
        ``retain``: when it finishes, keep its KV-cache pages (needs a cache) so that a continuation of the
        conversation reuses them. ``continue_from``: the id of such a finished request: the K/V of the longest
        common prefix of its sequence and this prompt are reused, not recomputed (the earlier turns)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}.")
        params.validate()  # frozen, but a value forced in with object.__setattr__ must not reach a step
        cfg = self.model_config
        prompt = self._check_prompt(prompt)
        total = len(prompt) + params.gen_length
        if total > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt)} tokens) + gen_length ({params.gen_length}) = {total} exceeds the "
                             f"model's maximum length of {cfg.max_position_embeddings} tokens.")
        tokens = total * (2 if params.cfg_scale > 0 else 1)
        if tokens > self.config.max_num_batched_tokens:
            raise ValueError(f"the request needs {tokens} tokens per forward, more than max_num_batched_tokens "
                             f"({self.config.max_num_batched_tokens}).")
        if params.confidence_eos_eot_inf and cfg.eot_token_id is None:
            raise ValueError("confidence_eos_eot_inf needs the model's end-of-turn token id, which neither its "
                             "config nor its tokenizer defines.")
        block_size = getattr(cfg, "block_size", None)
        if block_size is not None and params.block_length != block_size:
            raise ValueError(f"this block-diffusion model decodes blocks of its trained size {block_size}; set "
                             f"block_length={block_size} (got {params.block_length}).")
        if block_size is not None or params.cache != "none":
            length = -(-total // block_size) * block_size if block_size else total
            pages = -(-length // self.config.page_size) * (2 if params.cfg_scale > 0 else 1)
            capacity = self.config.kv_cache_tokens // self.config.page_size
            if pages > capacity:
                raise ValueError(f"the request needs {pages} KV-cache pages of {self.config.page_size} tokens, more "
                                 f"than the whole cache holds ({capacity}); raise EngineConfig.kv_cache_tokens.")
        if (retain or continue_from is not None) and params.cache == "none" and block_size is None:
            raise ValueError("retain / continue_from reuse the KV cache: set SamplingParams.cache to 'prefix' or "
                             "'dual'.")
        if continue_from is not None and continue_from not in self.retained:
            raise ValueError(f"continue_from {continue_from!r} is not a finished request with retained pages (it "
                             f"was never retained, was already continued, or was evicted).")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer, and this engine has none.")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string; got {request_id!r}.")
        if request_id in self._known:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request.")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Request(request_id, prompt, params, params.resolved_remasking(cfg.arch), seed, cfg.mask_token_id,
                      cfg.arch, block_size)
        req.snapshots = snapshots
        req.retain, req.continue_from = retain, continue_from
        self._known.add(request_id)
        self.waiting.append(req)
        return request_id

    def _check_prompt(self, prompt: list[int]) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            raise ValueError("Engine.add_request takes token ids; encode text with the tokenizer (LLM.generate does).")
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
            raise ValueError("prompt must be a list of integer token ids.")
        if not prompt:
            raise ValueError("prompt is empty: a request needs at least one prompt token.")
        vocab, mask = self.model_config.vocab_size, self.model_config.mask_token_id
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
        if mask in prompt:
            raise ValueError(f"prompt contains the mask token id {mask}; prompts must be fully observed.")
        return list(prompt)

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running); returns whether it was known. Its slot is free at once."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._release(req)
                    req.status = RequestStatus.ABORTED
                    self._known.discard(request_id)
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------------------------------------- step
    def _admit(self) -> None:
        budget = self.config.max_num_batched_tokens - sum(self._tokens(r) for r in self.running)
        slots = self.config.max_num_seqs - len(self.running)

        def fits(req: Request) -> bool:
            nonlocal budget, slots
            if slots < 1 or self._tokens(req) > budget or not self._allocate(req):
                return False
            budget -= self._tokens(req)
            slots -= 1
            return True

        candidates = list(itertools.islice(self.waiting, max(0, slots)))
        decision = self.scheduler.admit(candidates, self.running, fits)
        now = time.perf_counter()
        for req in decision.admitted:
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.metrics.first_scheduled_time = now
            self.store.admit(req)
            self.running.append(req)
        self.last_estimate = decision.estimate

    def _allocate(self, req: Request) -> bool:
        """Give ``req`` its KV-cache pages (for its whole sequence); False when too few are free now."""
        if req.cache_mode == "none":
            return True
        if self.kv_cache is None:
            cfg, c = self.model_config, self.config
            self.kv_cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                         c.kv_cache_tokens // c.page_size, c.page_size, self.model.dtype,
                                         self.model.device)
            self.runner.cache = self.kv_cache
        cache = self.kv_cache
        reuse, reused = self._reusable(req)
        streams = 2 if req.params.cfg_scale > 0 else 1
        need = cache.pages_for(req.seq_len) * streams - reuse.numel()
        while need > cache.num_free_pages and self.retained:
            cache.free(self.retained.popitem(last=False)[1][1])  # evict the least recently retained
        if need > cache.num_free_pages:
            if reuse.numel():  # keep the conversation's pages for the next try
                self.retained[req.continue_from] = (req.seq[:reused].clone(), reuse)
            return False
        if req.continue_from is not None:
            self.retained.pop(req.continue_from, None)
        req.pages = torch.cat((reuse, cache.allocate(req.seq_len - reuse.numel() * cache.page_size)))
        if streams == 2:
            req.uncond_pages = cache.allocate(req.seq_len)
        req.reused = reused
        req.cached_upto = reused if req.cache_mode == "block" else 0
        return True

    def _reusable(self, req: Request) -> tuple[torch.Tensor, int]:
        """Pages (whole, leading) of ``req.continue_from`` that ``req`` can take over, and how many leading
        positions of them hold K/V it shares (the common prefix with its prompt, block-aligned for a
        block-diffusion model; for shifted-logit models the last prompt token is always recomputed)."""
        empty = torch.zeros(0, dtype=torch.int64)
        entry = self.retained.get(req.continue_from) if req.continue_from is not None else None
        if entry is None:
            return empty, 0
        tokens, pages = entry
        limit = min(tokens.numel(), req.prompt_len - (1 if self.model_config.shifted_logits else 0))
        differ = np.flatnonzero(tokens.numpy()[:max(limit, 0)] != req.seq.numpy()[:max(limit, 0)])
        n = int(differ[0]) if differ.size else max(limit, 0)
        if req.block_size is not None:
            n -= n % req.block_size
        keep = -(-n // self.kv_cache.page_size)
        del self.retained[req.continue_from]
        self.kv_cache.free(pages[keep:])
        return pages[:keep], n

    def _release(self, req: Request, finished: bool = False) -> None:
        """Free everything ``req`` holds on the engine (its slot and KV-cache pages), or retain its pages for a
        continuation (``retain=True``, finished): the K/V valid for the final tokens are those before its last
        block."""
        if self.kv_cache is not None:
            if req.retain and finished and req.pages is not None:
                valid = req.cached_upto if req.cache_mode == "block" else req.spans[-1][0]
                self.retained[req.request_id] = (req.seq[:valid].clone(), req.pages)
                self.retained.move_to_end(req.request_id)
                while len(self.retained) > self.config.max_retained:
                    self.kv_cache.free(self.retained.popitem(last=False)[1][1])
            else:
                self.kv_cache.free(req.pages)
            self.kv_cache.free(req.uncond_pages)
        req.pages = req.uncond_pages = None
        self.store.release(req)

    def release_retained(self, request_id: str) -> bool:
        """Free the pages retained for ``request_id``; returns whether there were any."""
        entry = self.retained.pop(request_id, None)
        if entry is not None:
            self.kv_cache.free(entry[1])
        return entry is not None

    @staticmethod
    def _tokens(req: Request) -> int:
        return req.seq_len * (2 if req.params.cfg_scale > 0 else 1)

    def step(self) -> list[StepOutput]:
        """One denoising step (one forward) for every running request; returns what changed.

        A failure is pinned to the request that caused it: non-finite logits are detected per request on the
        device; an exception from the batched step reruns the step for each request alone, and only a request
        whose own step fails finishes (``finish_reason="error"``, with the reason in ``RequestOutput.error``).
        The others' tokens equal running alone (the batch does not change them). An explicitly requested setting
        that cannot run (:class:`~diffuse_engine.errors.BackendUnavailableError`) is no request's fault: it is
        raised, and the step can be retried."""
        self._admit()
        if not self.running:
            return []
        t0 = time.perf_counter()
        try:
            plan, result = self._run_step()
        except BackendUnavailableError:  # an explicit engine setting that cannot run: no request's fault
            self._recover(self.running)
            raise
        except Exception as exc:  # noqa: BLE001 - pinned to its request(s) below; the engine stays usable
            self.last_step_error = f"{type(exc).__name__}: {exc}"
            self.num_failed_steps += 1
            outputs = self._isolate(exc)
        except BaseException:  # interrupted: the device canvas may be ahead of the mirror; resume from the mirror
            self._recover(self.running)
            raise
        else:
            self.last_step_error = None
            outputs = self._apply(plan, result)
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - t0
        return outputs

    def _run_step(self) -> tuple[StepPlan, np.ndarray]:
        plan = self._current_plan()
        return plan, self._fetch(self.runner.run(plan, self.store, lambda: self._candidate_rows(plan)))

    def _recover(self, requests: list[Request]) -> None:
        """Forget the plan and put the requests' host mirror back on the device (their last completed step)."""
        self._plan = None
        for req in requests:
            self.store.restore(req)

    def _isolate(self, exc: Exception) -> list[StepOutput]:
        """After the batched step raised: run the step for each running request alone; a request whose own step
        raises again finishes with an error, the others advance by this step as if they had run alone. A failure
        of every request alone (e.g. the device itself) fails them all, and the engine remains usable."""
        batch = list(self.running)
        self._recover(batch)
        if len(batch) == 1:
            failed, outputs = [(batch[0], exc)], []
        else:
            failed, outputs = [], []
            for req in batch:
                self.running = [req]
                self._plan = None
                try:
                    plan, result = self._run_step()
                except Exception as solo:  # noqa: BLE001 - this request's own step fails
                    self._recover([req])
                    failed.append((req, solo))
                    continue
                outputs.extend(self._apply(plan, result))
            self._plan = None
            self.running = [r for r in batch if r.status == RequestStatus.RUNNING]
        for req, error in failed:
            outputs.append(self._fail(req, f"the step of request {req.request_id!r} failed at step {req.nfe} "
                                           f"({type(error).__name__}: {error}); the request stopped there."))
        return outputs

    def _fail(self, req: Request, message: str) -> StepOutput:
        """Finish ``req`` with ``finish_reason="error"`` without a step of its own (its canvas as of its last
        completed step)."""
        lo = req.window_lo
        w = max(req.block_span[1] - lo, 0)
        window = req.host[lo:lo + w].copy()
        view = _StepView(None, lo - req.prompt_len, window, window, np.zeros(w, dtype=np.int64), None)
        return self._finish(req, req.nfe, req.block, view, error=message)

    def _current_plan(self) -> StepPlan:
        """The plan of this step: the last one while no running request changed phase, else a new one."""
        key = (tuple(phase(r) for r in self.running), self.store.generation, id(self.kv_cache))
        if self._plan is None or self._plan.key != key:
            cfg = self.model_config
            self._plan = None  # drop the old plan's device tensors before building the next
            self._plan = build_plan(self.running, key, self.store, self.kv_cache, mask_id=cfg.mask_token_id,
                                    shifted=cfg.shifted_logits, block_size=getattr(cfg, "block_size", None),
                                    eot_id=cfg.eot_token_id, eos_id=cfg.eos_token_id, fused=self.runner.fuse(),
                                    score_dtype=torch.float64 if self.model.dtype == torch.float64 else torch.float32)
        return self._plan

    def _candidate_rows(self, plan: StepPlan) -> torch.Tensor | None:
        """The window rows that are candidates this step (still masked in the host mirror, which is exact between
        steps), as indices into the plan's rows, for the head to compute only those; None: every row (all are
        candidates, or guidance needs the plan's row order)."""
        if plan.any_cfg:
            return None
        masked = self.store.host_tokens[plan.host_slot, plan.host_pos] == self.model_config.mask_token_id
        if masked.all():
            return None
        return upload(np.flatnonzero(masked), self.store.device)

    def _fetch(self, result: torch.Tensor) -> np.ndarray:
        """The step's one device-to-host copy: asynchronous into pinned memory, then the wait for it."""
        if result.device.type != "cuda":
            return result.numpy()
        n = result.numel()
        if self._host is None or self._host.numel() < n:
            self._host = torch.empty(max(n, 1024), dtype=torch.int32, pin_memory=True)
        self._host[:n].copy_(result, non_blocking=True)
        self._copied.record()
        mode = torch.cuda.get_sync_debug_mode()  # the planned wait: exempt from sync-debug checks
        torch.cuda.set_sync_debug_mode(0)
        try:
            self._copied.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        return self._host[:n].numpy()

    def _apply(self, plan: StepPlan, result: np.ndarray) -> list[StepOutput]:
        """Bring the host mirror and every request's host state up to date from the step's copy."""
        nb, width, k = plan.batch, plan.width, len(COUNTERS)
        counters = result[:nb * k].reshape(nb, k)
        cells = nb * width
        after = np.full((nb, width), self.model_config.mask_token_id, dtype=np.int64)
        after[plan.host_valid] = result[nb * k:nb * k + cells].reshape(nb, width)[plan.host_valid]
        code = result[nb * k + cells:nb * k + 2 * cells].reshape(nb, width).copy()
        store = self.store
        before = np.full_like(after, self.model_config.mask_token_id)
        before[plan.host_valid] = store.host_tokens[plan.host_slot, plan.host_pos]
        store.host_tokens[plan.host_slot, plan.host_pos] = after[plan.host_valid]
        conf = None
        if plan.any_snapshot:
            conf = result[nb * k + 2 * cells:nb * k + 3 * cells].view(np.float32).reshape(nb, width)
            store.host_conf[plan.host_slot, plan.host_pos] = conf[plan.host_valid]
        outputs = []
        for i, req in enumerate(plan.requests):
            c = counters[i]
            lo = req.window_lo
            w = req.block_span[1] - lo
            step, block = req.nfe, req.block
            req.nfe += 1
            req.block_step += 1
            req.block_masked_count = int(c[_BLOCK_MASKED])
            req.num_revised += int(c[_REVISED])
            if req.cache_mode == "block":  # the step stored every finished block before the current one
                start = req.block_span[0]
                req.cached_upto = start - start % req.block_size
            p = req.prompt_len
            view = _StepView(None, lo - p, before[i, :w], after[i, :w], code[i, :w], None)
            if c[_INVALID]:
                outputs.append(self._finish(req, step, block, view, error=(
                    f"the model's logits for request {req.request_id!r} were not finite (NaN or +inf) at step {step}; "
                    f"the request stopped there.")))
                continue
            try:
                outputs.append(self._advance(req, step, block, view, bool(c[_EOS]), int(c[_FIRST_MASKED])))
            except Exception as exc:  # noqa: BLE001 - host-side handling of one request (stop strings, text)
                if req in self.running:
                    outputs.append(self._finish(req, step, block, view, error=(
                        f"request {req.request_id!r} failed after step {step} ({type(exc).__name__}: {exc}).")))
        return outputs

    def _advance(self, req: Request, step: int, block: int, view: _StepView, eos_in_block: bool,
                 first_masked: int) -> StepOutput:
        p, cfg = req.params, self.model_config
        advanced = False
        if decoding_policy(req).block_done(req):
            end = req.block_span[1]
            req.block += 1
            if p.early_stop and eos_in_block and req.block < req.num_blocks:
                self.store.fill(req, end, req.seq_len, cfg.eos_token_id)
                req.block = req.num_blocks
            if req.block == req.num_blocks:
                return self._finish(req, step, block, view)
            req.start_block()
            advanced = True
        stop = self._update_stable(req, 0 if advanced else first_masked)
        if stop is not None:
            return self._finish(req, step, block, view, stop=stop)
        return self._output(req, step, block, view, False, None)

    def _output(self, req: Request, step: int, block: int, view: _StepView, finished: bool,
                out: RequestOutput | None) -> StepOutput:
        """The step's output for ``req``: its lists are built from ``view`` only if a consumer reads them."""
        p = req.prompt_len
        view.canvas = req.host[p:p + req.params.gen_length].copy()
        if req.snapshots:
            view.confidences = req.commit_conf.numpy()[p:p + req.params.gen_length].copy()
        return StepOutput(req.request_id, step, block, None, None, finished, out, None, req.stable, None, view=view)

    def _update_stable(self, req: Request, first_masked: int) -> tuple[str, int] | None:
        """Advance ``req.stable`` (canvas tokens that no later step can change: finished blocks, and the
        committed start of the current block unless a revision policy may still change it; ``first_masked``: the
        current block's first masked position, from its start); returns (text, character cut) when a stop string
        appears in that final text."""
        start, end = req.block_span
        n = start - req.prompt_len
        if req.params.revision is None:
            n += min(first_masked, end - start)
        n = max(0, min(n, req.params.gen_length))
        if n <= req.stable:
            return None
        req.stable = n
        if not req.params.stop or self.tokenizer is None:
            return None
        p = req.prompt_len
        text = self._text(req.host[p:p + n].tolist())[0]
        hits = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        return (text, min(hits)) if hits else None

    def _text(self, tokens: list[int]) -> tuple[str | None, int | None]:
        """The answer text of canvas ``tokens`` (cut at the first EOS / end-of-turn) and the cut position."""
        cfg = self.model_config
        stops = {cfg.eos_token_id} | ({cfg.eot_token_id} if cfg.eot_token_id is not None else set())
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        if self.tokenizer is None:
            return None, cut
        return self.tokenizer.decode(tokens[:cut] if cut is not None else tokens), cut

    def _finish(self, req: Request, step: int, block: int, view: _StepView, stop: tuple[str, int] | None = None,
                error: str | None = None) -> StepOutput:
        p = req.prompt_len
        tokens = req.host[p:p + req.params.gen_length].tolist()
        self._release(req, finished=error is None)
        req.status = RequestStatus.FINISHED
        req.metrics.finished_time = time.perf_counter()
        self.running.remove(req)
        self._known.discard(req.request_id)
        if error is not None:
            text, reason = self._text(tokens)[0], "error"
        else:
            if stop is None and req.params.stop and self.tokenizer is not None:  # a stop string final only now
                full = self._text(tokens)[0]
                hits = [i for i in (full.find(x) for x in req.params.stop) if i >= 0]
                stop = (full, min(hits)) if hits else None
            if stop is not None:
                text, reason = stop[0][:stop[1]], "stop"
            else:
                text, cut = self._text(tokens)
                reason = "eos" if cut is not None else "length"
            req.stable = len(tokens)
        req.finish_reason, req.error = reason, error
        out = RequestOutput(req.request_id, req.prompt_ids, tokens, text, req.nfe, reason, req.seed, req.metrics,
                            req.num_revised, error)
        step_out = self._output(req, step, block, view, True, out)
        step_out._canvas = tokens
        return step_out
