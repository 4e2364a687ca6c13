"""From a step's packed result to what the engine returns: the host mirror and every request's host state brought
up to date, block ends, the stable prefix a stream may emit, stop strings, finishing, and the answer text.

Everything here reads the step's one device-to-host copy (:meth:`.engine.Engine._fetch`) and host memory; nothing
reads a device tensor.
"""

from __future__ import annotations

import time

import numpy as np

from ..config import ModelConfig
from ..policies import decoding_policy
from .plan import COUNTERS, StepPlan
from .request import Request, RequestOutput, StepOutput, _StepView
from .scheduler import Scheduler

_BLOCK_MASKED, _FIRST_MASKED, _EOS, _INVALID, _REVISED = range(len(COUNTERS))


class OutputProcessor:
    """Turns steps into :class:`StepOutput` s for the requests of ``scheduler``; ``tokenizer`` (optional) decodes
    answers and finds stop strings."""

    def __init__(self, model_config: ModelConfig, tokenizer, scheduler: Scheduler) -> None:
        self.model_config, self.tokenizer, self.scheduler = model_config, tokenizer, scheduler
        self.store = scheduler.store

    def apply(self, plan: StepPlan, result: np.ndarray) -> list[StepOutput]:
        """Bring the host mirror and every request's host state up to date from the step's copy."""
        nb, k = plan.batch, len(COUNTERS)
        counters = result[:nb * k].reshape(nb, k)
        before, after, code = self._mirror(plan, result)
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
                outputs.append(self.finish(req, step, block, view, error=(
                    f"the model's logits for request {req.request_id!r} were not finite (NaN or +inf) at step {step}; "
                    f"the request stopped there.")))
                continue
            try:
                outputs.append(self._advance(req, step, block, view, bool(c[_EOS]), int(c[_FIRST_MASKED])))
            except Exception as exc:  # noqa: BLE001 - host-side handling of one request (stop strings, text)
                if req in self.scheduler.running:
                    outputs.append(self.finish(req, step, block, view, error=(
                        f"request {req.request_id!r} failed after step {step} ({type(exc).__name__}: {exc}).")))
        return outputs

    def _mirror(self, plan: StepPlan, result: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Write the step's window tokens (and confidences) into the host mirror; returns the windows' tokens
        before and after the step and each cell's code, as [B, W] matrices."""
        nb, width, k = plan.batch, plan.width, len(COUNTERS)
        cells = nb * width
        mask_id = self.model_config.mask_token_id
        after = np.full((nb, width), mask_id, dtype=np.int64)
        after[plan.host_valid] = result[nb * k:nb * k + cells].reshape(nb, width)[plan.host_valid]
        code = result[nb * k + cells:nb * k + 2 * cells].reshape(nb, width).copy()
        store = self.store
        before = np.full_like(after, mask_id)
        before[plan.host_valid] = store.host_tokens[plan.host_slot, plan.host_pos]
        store.host_tokens[plan.host_slot, plan.host_pos] = after[plan.host_valid]
        if plan.any_snapshot:
            conf = result[nb * k + 2 * cells:nb * k + 3 * cells].view(np.float32).reshape(nb, width)
            store.host_conf[plan.host_slot, plan.host_pos] = conf[plan.host_valid]
        return before, after, code

    def _advance(self, req: Request, step: int, block: int, view: _StepView, eos_in_block: bool,
                 first_masked: int) -> StepOutput:
        p, cfg = req.params, self.model_config
        advanced = False
        if decoding_policy(req).block_done(req):
            end = req.block_span[1]
            req.block += 1
            if p.early_stop and eos_in_block and req.block < req.num_blocks:
                self.store.fill(req, end, req.canvas_end, cfg.eos_token_id)
                req.block = req.num_blocks
            if req.block == req.num_blocks:
                return self.finish(req, step, block, view)
            req.start_block()
            advanced = True
        stop = self._update_stable(req, 0 if advanced else first_masked)
        if stop is not None:
            return self.finish(req, step, block, view, stop=stop)
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
        return self._stop(req, self.text(req.host[p:p + n].tolist())[0])

    @staticmethod
    def _stop(req: Request, text: str) -> tuple[str, int] | None:
        """(text, character cut) at the first of ``req``'s stop strings in ``text``; None when none appears."""
        hits = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        return (text, min(hits)) if hits else None

    def text(self, tokens: list[int]) -> tuple[str | None, int | None]:
        """The answer text of canvas ``tokens`` (cut at the first EOS / end-of-turn) and the cut position."""
        cfg = self.model_config
        stops = {cfg.eos_token_id} | ({cfg.eot_token_id} if cfg.eot_token_id is not None else set())
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        if self.tokenizer is None:
            return None, cut
        return self.tokenizer.decode(tokens[:cut] if cut is not None else tokens), cut

    def fail(self, req: Request, message: str) -> StepOutput:
        """Finish ``req`` with ``finish_reason="error"`` without a step of its own (its canvas as of its last
        completed step)."""
        lo = req.window_lo
        w = max(req.block_span[1] - lo, 0)
        window = req.host[lo:lo + w].copy()
        view = _StepView(None, lo - req.prompt_len, window, window, np.zeros(w, dtype=np.int64), None)
        return self.finish(req, req.nfe, req.block, view, error=message)

    def finish(self, req: Request, step: int, block: int, view: _StepView, stop: tuple[str, int] | None = None,
               error: str | None = None) -> StepOutput:
        """``req`` finishes at this step: it leaves the batch, and its output carries the final answer."""
        p = req.prompt_len
        tokens = req.host[p:p + req.params.gen_length].tolist()
        self.scheduler.finish(req, finished=error is None)
        req.metrics.finished_time = time.perf_counter()
        if error is not None:
            text, reason = self.text(tokens)[0], "error"
        else:
            if stop is None and req.params.stop and self.tokenizer is not None:  # a stop string final only now
                stop = self._stop(req, self.text(tokens)[0])
            if stop is not None:
                text, reason = stop[0][:stop[1]], "stop"
            else:
                text, cut = self.text(tokens)
                reason = "eos" if cut is not None else "length"
            req.stable = len(tokens)
        req.finish_reason, req.error = reason, error
        out = RequestOutput(req.request_id, req.prompt_ids, tokens, text, req.nfe, reason, req.seed, req.metrics,
                            req.num_revised, error, list(req.suffix_ids))
        step_out = self._output(req, step, block, view, True, out)
        step_out._canvas = tokens
        return step_out
