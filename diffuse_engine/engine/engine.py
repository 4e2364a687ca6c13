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

The engine is schedule → run → postprocess: the :class:`~.scheduler.Scheduler` owns the queues, slots and KV-cache
pages (:mod:`.pages`), :mod:`.plan` and the :class:`~.runner.ModelRunner` run the step, and :mod:`.output` turns its
copy into outputs. A failure of the batched step is pinned to its request by rerunning the step request by request.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict, deque

import numpy as np
import torch

from ..errors import BackendUnavailableError, TensorParallelError
from ..models import DiffusionLM
from ..sampling_params import SamplingParams
from .calibration import engine_ceilings
from .canvas import CanvasStore
from .checks import check_continuation, check_fits, check_params, check_prompt, check_suffix
from .config import EngineConfig
from .cost_model import CostModel, StepEstimate
from .kv_cache import PagedKVCache
from .output import OutputProcessor
from .pages import PageManager
from .plan import StepPlan, build_plan, phase
from .request import Request, RequestStatus, StepOutput
from .runner import ModelRunner
from .scheduler import Scheduler

__all__ = ["Engine", "EngineConfig"]


class Engine:
    """Runs requests on ``model``. ``tokenizer`` (optional) decodes each finished answer into ``text``."""

    def __init__(self, model: DiffusionLM, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.model_config = model.config
        self.config = config or EngineConfig()
        device, dtype = self.model.device, self.model.dtype
        if self.config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}. Use None "
                             f"(graphs on CUDA only) or False.")
        tp = _check_tensor_parallel(model, self.config)
        graphs = False if tp > 1 else self.config.cuda_graphs
        self.runner = ModelRunner(model, fused_head=self.config.fused_head, cuda_graphs=graphs)
        cfg = self.model_config
        # A block-diffusion request's sequence runs to the end of its last model block: past the model's length by
        # less than a block.
        longest = cfg.max_position_embeddings + (getattr(cfg, "block_size", None) or 0)
        self.store = CanvasStore(self.config.max_num_seqs, longest, device, cfg.mask_token_id)
        self._plan: StepPlan | None = None
        fused = self.config.fused_head if self.config.fused_head is not None else device.type == "cuda"
        ceilings = engine_ceilings(device, dtype, self.config.calibrate, self.model_config)
        self.cost_model = CostModel(self.model_config, ceilings, torch.empty((), dtype=dtype).element_size(),
                                    fused_head=bool(fused), tensor_parallel=tp, link=getattr(model.tp, "link", None))
        pages = PageManager(cfg, self.config, dtype, device, kv_heads=model.kv_heads())
        self.scheduler = Scheduler(self.config, self.cost_model, pages, self.store)
        self.output = OutputProcessor(cfg, tokenizer, self.scheduler)
        self.last_estimate: StepEstimate | None = None  # the cost model's view of the last step
        self._ids = itertools.count()
        self.num_steps = 0
        self.step_seconds = 0.0
        self.num_failed_steps = 0  # batched steps that raised (their failures were pinned to requests)
        self.last_step_error: str | None = None  # why the last step raised; None when it ran
        self.broken: str | None = None  # why the engine can run no more steps (a tensor-parallel rank failed)

    # ------------------------------------------------------------------------- state kept by the scheduler
    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def kv_cache(self) -> PagedKVCache | None:
        return self.scheduler.pages.cache

    @property
    def retained(self) -> OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.scheduler.pages.retained

    @property
    def _known(self) -> set[str]:
        return self.scheduler.known

    @property
    def tokenizer(self):
        return self.output.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self.output.tokenizer = tokenizer

    def release_retained(self, request_id: str) -> bool:
        """Free the pages retained for ``request_id``; returns whether there were any."""  # see .pages
        return self.scheduler.pages.release_retained(request_id)

    def _text(self, tokens: list[int]) -> tuple[str | None, int | None]:
        return self.output.text(tokens)  # (read by AsyncEngine)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, snapshots: bool = False, retain: bool = False,
                    continue_from: str | None = None, suffix: list[int] | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError (with the reason) for a request that cannot run.
        ``snapshots``: its step outputs carry each position's commit confidence (canvas snapshots).
        ``retain``: when it finishes, keep its KV-cache pages (needs a cache) so that a continuation of the
        conversation reuses them. ``continue_from``: the id of such a finished request: the K/V of the longest
        common prefix of its sequence and this prompt are reused, not recomputed (the earlier turns).
        ``suffix``: token ids that follow the canvas (infilling: the canvas is written between ``prompt`` and them;
        full-attention models only)."""
        if self.broken is not None:
            raise TensorParallelError(self.broken)
        params = check_params(params)
        cfg = self.model_config
        prompt = check_prompt(prompt, cfg)
        suffix = check_suffix(suffix, cfg, retain, continue_from)
        check_fits(len(prompt), params, cfg, self.config, len(suffix))
        check_continuation(params, cfg, retain, continue_from, self.retained, self.tokenizer is not None)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string; got {request_id!r}.")
        if request_id in self.scheduler.known:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request.")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Request(request_id, prompt, params, params.resolved_remasking(cfg.arch), seed, cfg.mask_token_id,
                      cfg.arch, getattr(cfg, "block_size", None), suffix_ids=suffix)
        req.snapshots = snapshots
        req.retain, req.continue_from = retain, continue_from
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running); returns whether it was known. Its slot is free at once."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return not self.scheduler.is_finished()

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------------------------------------- step
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
        except TensorParallelError as exc:  # the ranks are out of step: nothing more can run
            self.broken = self.last_step_error = str(exc)
            self.num_failed_steps += 1
            outputs = self._fail_all(str(exc))
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
            outputs = self.output.apply(plan, result)
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - t0
        return outputs

    def _admit(self) -> None:
        self.last_estimate = self.scheduler.schedule()
        self.runner.cache = self.kv_cache

    def _run_step(self) -> tuple[StepPlan, np.ndarray]:
        plan = self._current_plan()
        rows = lambda: self.runner.candidate_rows(plan, self.store)  # noqa: E731 - only an eager step calls it
        return plan, self._fetch(self.runner.run(plan, self.store, rows))

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
                self.scheduler.running = [req]
                self._plan = None
                try:
                    plan, result = self._run_step()
                except Exception as solo:  # noqa: BLE001 - this request's own step fails
                    self._recover([req])
                    failed.append((req, solo))
                    continue
                outputs.extend(self.output.apply(plan, result))
            self._plan = None
            self.scheduler.running = [r for r in batch if r.status == RequestStatus.RUNNING]
        for req, error in failed:
            outputs.append(self.output.fail(req, f"the step of request {req.request_id!r} failed at step {req.nfe} "
                                                 f"({type(error).__name__}: {error}); the request stopped there."))
        return outputs

    def _fail_all(self, message: str) -> list[StepOutput]:
        """Finish every running and waiting request with ``message`` (the engine is broken)."""
        self._recover(self.running)
        outputs = []
        while True:
            outputs.extend(self.output.fail(req, message) for req in list(self.running))
            if not self.waiting:
                return outputs
            self.scheduler.schedule()
            if not self.running:  # nothing more can be admitted: drop the rest
                for req in list(self.waiting):
                    self.scheduler.abort(req.request_id)
                return outputs

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

    def _fetch(self, result: torch.Tensor) -> np.ndarray:
        """The step's one device-to-host copy (:meth:`.runner.ModelRunner.fetch`)."""
        return self.runner.fetch(result)


def _check_tensor_parallel(model: DiffusionLM, config: EngineConfig) -> int:
    """The model's tensor-parallel degree, checked against the engine's settings."""
    tp = model.tp.world if model.tp is not None else 1
    if config.tensor_parallel_size != tp:
        raise ValueError(f"EngineConfig.tensor_parallel_size is {config.tensor_parallel_size} but the model is "
                         f"{'sharded over ' + str(tp) + ' ranks' if tp > 1 else 'on one device'}; start a "
                         f"tensor-parallel model with LLM(path, tensor_parallel_size=N), which starts the ranks.")
    if tp > 1 and config.cuda_graphs:
        raise ValueError("cuda_graphs=True is not supported with tensor parallelism; use None or False.")
    return tp
