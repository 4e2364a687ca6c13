"""One forward for a whole batch of requests, and the per-row decisions of its head.

Requests are packed (no padding): each keeps its own positions from 0, as if it ran alone. Only the rows the
step can commit (``Request.candidates``: the still-masked positions up to the end of each request's current
block) go through the LM head; with Dream's shifted logits the row for position p is read from p - 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import ops
from ..models import DiffusionLM, TokenLayout
from .kv_cache import KVPlan, PagedKVCache, SeqPlan
from .request import Request

# Orderings that need a score beyond the sampled token's probability.
SCORE_OF = {"topk_margin": "margin", "entropy": "neg_entropy"}


@dataclass(slots=True)
class Verification:
    """Leave-one-out scores of committed tokens (revision policies): request i owns ``starts[i]:starts[i+1]``.
    ``position``: the verified sequence positions; ``current``: the token there; ``p_current``: its probability
    when its own position is hidden; ``top_token`` / ``top_prob``: the most probable token there."""

    starts: list[int]
    position: torch.Tensor
    current: torch.Tensor
    p_current: torch.Tensor
    top_token: torch.Tensor
    top_prob: torch.Tensor


@dataclass(slots=True)
class HeadRows:
    """The candidate rows of one step, grouped by request (request i owns rows ``starts[i]:starts[i+1]``).

    ``position``: sequence positions; ``token``, ``prob``, ``top1``, ``margin``, ``neg_entropy``: the outputs
    of :func:`ops.sample_and_score` for each row, on the CPU (``margin`` / ``neg_entropy`` only when a request
    of the batch orders by them, else None). ``entropy``: each row's entropy when a request needs it (EB-sampler).
    ``verify``: leave-one-out scores when requests asked for them.
    """

    starts: list[int]
    position: torch.Tensor
    token: torch.Tensor
    prob: torch.Tensor
    top1: torch.Tensor
    margin: torch.Tensor | None
    neg_entropy: torch.Tensor | None
    verify: Verification | None = None


@dataclass(slots=True)
class _Forward:
    hidden: torch.Tensor
    cond_rows: list[torch.Tensor]  # per request: hidden rows of its candidates
    uncond_rows: dict[int, torch.Tensor]  # request index -> hidden rows of its unconditional candidates
    verify_rows: list[torch.Tensor | None]  # per request: hidden rows of its verification queries


class ModelRunner:
    def __init__(self, model: DiffusionLM, fused_head: bool | None = None, cache: PagedKVCache | None = None) -> None:
        self.model = model
        self.config = model.config
        self.device = model.device
        self.fused_head = fused_head
        self.cache = cache
        self.block_size = getattr(model.config, "block_size", None)  # block-causal attention (block diffusion)
        self._positions_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _positions(self, seqlens: list[int]) -> torch.Tensor:
        key = tuple(seqlens)
        cached = self._positions_cache.get(key)
        if cached is None:
            cached = torch.cat([torch.arange(n, dtype=torch.int64) for n in seqlens]).to(self.device)
            if len(self._positions_cache) > 256:
                self._positions_cache.clear()
            self._positions_cache[key] = cached
        return cached

    @staticmethod
    def _uncond(r: Request, mask_id: int) -> torch.Tensor:
        un = r.seq.clone()
        un[: r.prompt_len] = mask_id
        return un

    def _forward_full(self, batch: list[Request], positions: list[torch.Tensor]) -> _Forward:
        """Every request's whole sequence (and its unconditional copy) in one packed forward, no cache."""
        shift = 1 if self.config.shifted_logits else 0
        seqs, cond_rows, offset = [], [], 0
        for r, pos in zip(batch, positions, strict=True):
            seqs.append(r.seq)
            cond_rows.append(pos - shift + offset)
            offset += r.seq_len
        uncond_rows = {}
        for i, r in enumerate(batch):
            if r.params.cfg_scale > 0:
                seqs.append(self._uncond(r, self.config.mask_token_id))
                uncond_rows[i] = positions[i] - shift + offset
                offset += r.seq_len
        seqlens = [s.numel() for s in seqs]
        tokens = torch.cat(seqs).to(self.device, non_blocking=True)
        layout = TokenLayout.packed(seqlens, block_size=self.block_size)
        hidden = self.model.hidden_states(tokens, self._positions(seqlens), layout)
        return _Forward(hidden, cond_rows, uncond_rows, [None] * len(batch))

    def _plan(self, r: Request, tokens: torch.Tensor, pages: torch.Tensor | None,
              verify: torch.Tensor | None) -> tuple[SeqPlan, torch.Tensor]:
        """What one sequence of ``r`` recomputes, reads and writes this step, and its fresh input tokens."""
        shift = 1 if self.config.shifted_logits else 0
        start, end = r.block_span
        length = tokens.numel()
        mode, read, write = r.cache_mode, [], None
        if mode == "block":  # finished blocks are cached once; the first step also runs what is not cached yet
            lo, hi = r.cached_upto, end
            read, write = [(0, lo)], (lo, self._block_floor(start))
        elif mode == "none":
            lo, hi = 0, length
        elif r.refresh_step:  # everything but what an earlier turn of the conversation left in the cache
            lo, hi = r.reused, length
            read, write = [(0, lo)], (lo, length)
        else:
            lo = start - shift
            hi = length if mode == "prefix" else end
            read = [(0, lo)] + ([(end, length)] if mode == "dual" else [])
        positions = torch.arange(lo, hi, dtype=torch.int64)
        fresh = tokens[lo:hi]
        hidden = None
        if verify is not None and verify.numel():
            q = verify - shift
            fresh = torch.cat((fresh, tokens[q] if shift else torch.full_like(q, self.config.mask_token_id)))
            positions = torch.cat((positions, q))
            hidden = verify
        plan = SeqPlan(lo, hi - lo, positions, read, write, pages, self.block_size, hidden)
        return plan, fresh

    def _block_floor(self, position: int) -> int:
        """The start of the model block holding ``position``: positions before it are in finished blocks (the
        prompt part of a block that the canvas completes sees the canvas, so it is cached with that block)."""
        return position - position % self.block_size

    def _forward_planned(self, batch: list[Request], positions: list[torch.Tensor],
                         verify: list[torch.Tensor | None]) -> _Forward:
        """One packed forward in which each sequence recomputes only what its cache mode needs."""
        shift = 1 if self.config.shifted_logits else 0
        plans, fresh, cond_rows, verify_rows, offset = [], [], [], [], 0
        for r, pos, ver in zip(batch, positions, verify, strict=True):
            plan, toks = self._plan(r, r.seq, r.pages, ver)
            plans.append(plan)
            fresh.append(toks)
            cond_rows.append(pos - shift - plan.lo + offset)
            verify_rows.append(None if plan.hidden is None else
                               torch.arange(plan.num_main, plan.num_tokens) + offset)
            offset += plan.num_tokens
        uncond_rows = {}
        for i, r in enumerate(batch):
            if r.params.cfg_scale > 0:
                plan, toks = self._plan(r, self._uncond(r, self.config.mask_token_id), r.uncond_pages, None)
                plans.append(plan)
                fresh.append(toks)
                uncond_rows[i] = positions[i] - shift - plan.lo + offset
                offset += plan.num_tokens
        tokens = torch.cat(fresh).to(self.device, non_blocking=True)
        pos = torch.cat([p.positions for p in plans]).to(self.device, non_blocking=True)
        kv = KVPlan(self.cache, plans, self.device)
        layout = TokenLayout.packed([p.num_tokens for p in plans], block_size=self.block_size, kv=kv)
        hidden = self.model.hidden_states(tokens, pos, layout)
        for r in batch:
            if r.cache_mode == "block":
                r.cached_upto = self._block_floor(r.block_span[0])
        return _Forward(hidden, cond_rows, uncond_rows, verify_rows)

    @torch.inference_mode()
    def run(self, batch: list[Request], verify: list[torch.Tensor | None] | None = None) -> HeadRows:
        """One forward for ``batch`` and the head of its candidate rows. ``verify[i]``: committed positions of
        request i to score with their own position hidden (revision policies), or None."""
        verify = verify if verify is not None else [None] * len(batch)
        positions = [r.candidates() for r in batch]
        starts = [0]
        for pos in positions:
            starts.append(starts[-1] + pos.numel())
        if all(r.cache_mode == "none" for r in batch) and all(v is None for v in verify):
            fwd = self._forward_full(batch, positions)
        else:
            fwd = self._forward_planned(batch, positions, verify)
        rows = self._verify(batch, fwd, verify)
        head = self._head(batch, fwd, starts, torch.cat(positions))
        head.verify = rows
        return head

    def _verify(self, batch: list[Request], fwd: _Forward, verify: list[torch.Tensor | None]) -> Verification | None:
        if all(v is None for v in fwd.verify_rows):
            return None
        starts, rows, pos, cur = [0], [], [], []
        for r, vr, v in zip(batch, fwd.verify_rows, verify, strict=True):
            n = 0 if vr is None else vr.numel()
            starts.append(starts[-1] + n)
            if n:
                rows.append(vr)
                pos.append(v)
                cur.append(r.seq[v])
        logits = self.model.logits_from_hidden(fwd.hidden[torch.cat(rows).to(self.device)])
        probs = torch.softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
        current = torch.cat(cur)
        top_prob, top_token = probs.max(-1)
        p_current = probs.gather(1, current.to(probs.device)[:, None])[:, 0]
        return Verification(starts, torch.cat(pos), current, p_current.cpu(), top_token.cpu(), top_prob.cpu())

    def _head(self, batch: list[Request], fwd: _Forward, starts: list[int], position: torch.Tensor) -> HeadRows:
        hidden = fwd.hidden
        num_rows = starts[-1]
        uncond = [fwd.uncond_rows[i] for i in sorted(fwd.uncond_rows)]
        guided, un_first = [], num_rows
        for i in sorted(fwd.uncond_rows):
            guided.append((starts[i], starts[i + 1], un_first, batch[i].params.cfg_scale))
            un_first += starts[i + 1] - starts[i]
        rows = torch.cat(fwd.cond_rows + uncond).to(self.device)
        if not guided and self._fuse(batch, hidden):
            kwargs = self._score_args(batch, starts, position)
            try:
                stats = ops.lm_head_stats(hidden, self.model.lm_head_weight(), rows, *kwargs.pop("args"), **kwargs)
                return self._rows(starts, position, stats)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where the unfused head runs
                if self.fused_head:
                    raise
                self.fused_head = False
                warnings.warn(f"the fused LM head failed ({type(exc).__name__}: {exc}); using the unfused head "
                              f"from now on. EngineConfig(fused_head=True) raises the error instead.",
                              RuntimeWarning, stacklevel=2)
        logits = self.model.logits_from_hidden(hidden[rows])
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logits = logits.to(work)
        if guided:
            cond = logits[:num_rows].clone()
            for first, last, un, scale in guided:
                c = logits[first:last]
                u = logits[un:un + (last - first)]
                cond[first:last] = u + (scale + 1) * (c - u)
            logits = cond
        return self._score(batch, starts, position, logits)

    def _fuse(self, batch: list[Request], hidden: torch.Tensor) -> bool:
        """Whether this step's head can be the fused kernel (its statistics cover every request's settings)."""
        if self.fused_head is False or hidden.dtype == torch.float64:
            return False
        if self.fused_head is None and hidden.device.type != "cuda":
            return False
        return all(not r.params.top_k and (r.params.top_p is None or r.params.top_p >= 1)
                   and not r.params.logits_eos_inf for r in batch)

    def _per_row(self, starts: list[int]):
        """A function expanding one value per request to one per candidate row, on the device."""
        counts = torch.tensor([starts[i + 1] - starts[i] for i in range(len(starts) - 1)])

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), counts, dim=0).to(self.device)

        return per_row

    def _score_args(self, batch: list[Request], starts: list[int], position: torch.Tensor) -> dict:
        """Per-row sampling arguments of the candidate rows: ``args`` (temperature, seed, step, position) and
        the keyword arguments of :func:`ops.sample_and_score`."""
        cfg = self.config
        per_row = self._per_row(starts)

        # LLaDA's confidence_eos_eot_inf as published: `logits_with_noise[:, :, eos] = logits[:, :, eot] = -inf`
        # after sampling. At temperature 0 `add_gumbel_noise` returns the logits tensor itself, so EOS leaves the
        # confidence softmax too; at temperature > 0 only EOT does.
        exclude = [[cfg.eot_token_id, cfg.eos_token_id if r.params.temperature == 0 else -1]
                   if r.params.confidence_eos_eot_inf else [-1, -1] for r in batch]
        return {
            "args": (per_row([r.params.temperature for r in batch], torch.float32),
                     per_row([r.seed_bits for r in batch], torch.int64),
                     per_row([r.nfe for r in batch], torch.int64),
                     position.to(self.device)),
            "raw_confidence": per_row([r.remasking == "low_confidence" for r in batch], torch.bool),
            "conf_exclude": per_row(exclude, torch.int64) if any(e[0] >= 0 for e in exclude) else None,
        }

    @staticmethod
    def _scores(batch: list[Request]) -> tuple[str, ...]:
        """The statistics beyond the sampled token's probability that this batch's orderings and policies use."""
        names = {SCORE_OF[r.remasking] for r in batch if r.remasking in SCORE_OF}
        if any(r.params.policy == "eb" for r in batch):
            names.add("neg_entropy")
        return tuple(sorted(names))

    @staticmethod
    def _rows(starts: list[int], position: torch.Tensor, stats: dict[str, torch.Tensor]) -> HeadRows:
        cpu = {k: v.cpu() for k, v in stats.items()}
        return HeadRows(starts, position, cpu["token"], cpu["prob"], cpu["top1"], cpu.get("margin"),
                        cpu.get("neg_entropy"))

    def _score(self, batch: list[Request], starts: list[int], position: torch.Tensor,
               logits: torch.Tensor) -> HeadRows:
        cfg = self.config
        per_row = self._per_row(starts)

        ban_eos = [r.params.logits_eos_inf for r in batch]
        if any(ban_eos):
            rows = per_row(ban_eos, torch.bool).nonzero().squeeze(1)
            logits[rows, cfg.eos_token_id] = float("-inf")
        top_k = [r.params.top_k or 0 for r in batch]
        top_p = [r.params.top_p if r.params.top_p is not None else 1.0 for r in batch]
        kwargs = self._score_args(batch, starts, position)
        stats = ops.sample_and_score(
            logits, *kwargs.pop("args"),
            top_k=per_row(top_k, torch.int64) if any(top_k) else None,
            top_p=per_row(top_p, torch.float32) if any(p < 1 for p in top_p) else None,
            scores=self._scores(batch),
            **kwargs,
        )
        return self._rows(starts, position, stats)
