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
from .request import Request

# Orderings that need a score beyond the sampled token's probability.
SCORE_OF = {"topk_margin": "margin", "entropy": "neg_entropy"}


@dataclass(slots=True)
class HeadRows:
    """The candidate rows of one step, grouped by request (request i owns rows ``starts[i]:starts[i+1]``).

    ``position``: sequence positions; ``token``, ``prob``, ``top1``, ``margin``, ``neg_entropy``: the outputs
    of :func:`ops.sample_and_score` for each row, on the CPU (``margin`` / ``neg_entropy`` only when a request
    of the batch orders by them, else None).
    """

    starts: list[int]
    position: torch.Tensor
    token: torch.Tensor
    prob: torch.Tensor
    top1: torch.Tensor
    margin: torch.Tensor | None
    neg_entropy: torch.Tensor | None


class ModelRunner:
    def __init__(self, model: DiffusionLM, fused_head: bool | None = None) -> None:
        self.model = model
        self.config = model.config
        self.device = model.device
        self.fused_head = fused_head
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

    @torch.inference_mode()
    def run(self, batch: list[Request]) -> HeadRows:
        cfg = self.config
        shift = 1 if cfg.shifted_logits else 0
        seqs: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        starts = [0]
        cond_rows: list[torch.Tensor] = []
        guided: list[tuple[int, int, int, float]] = []  # (first row, last row, uncond row offset, cfg_scale)
        offset = 0
        for r in batch:
            pos = r.candidates()
            positions.append(pos)
            seqs.append(r.seq)
            cond_rows.append(pos - shift + offset)
            offset += r.seq_len
            starts.append(starts[-1] + pos.numel())
        uncond_rows: list[torch.Tensor] = []
        num_rows = starts[-1]
        for i, r in enumerate(batch):
            if r.params.cfg_scale > 0:
                un = r.seq.clone()
                un[: r.prompt_len] = cfg.mask_token_id
                seqs.append(un)
                uncond_rows.append(positions[i] - shift + offset)
                guided.append((starts[i], starts[i + 1], num_rows + sum(t.numel() for t in uncond_rows[:-1]),
                               r.params.cfg_scale))
                offset += r.seq_len
        seqlens = [s.numel() for s in seqs]
        tokens = torch.cat(seqs).to(self.device, non_blocking=True)
        hidden = self.model.hidden_states(tokens, self._positions(seqlens), TokenLayout.packed(seqlens))
        rows = torch.cat(cond_rows + uncond_rows).to(self.device)
        if not guided and self._fuse(batch, hidden):
            kwargs = self._score_args(batch, starts, torch.cat(positions))
            try:
                stats = ops.lm_head_stats(hidden, self.model.lm_head_weight(), rows, *kwargs.pop("args"), **kwargs)
                return self._rows(starts, torch.cat(positions), stats)
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
            for first, last, un_first, scale in guided:
                c = logits[first:last]
                un = logits[un_first:un_first + (last - first)]
                cond[first:last] = un + (scale + 1) * (c - un)
            logits = cond
        return self._score(batch, starts, torch.cat(positions), logits)

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
            scores=tuple(SCORE_OF[name] for name in sorted({r.remasking for r in batch}) if name in SCORE_OF),
            **kwargs,
        )
        return self._rows(starts, position, stats)
