"""One rank's tensor-parallel context (:class:`TPContext`): what a sharded model calls for its collectives, and the
three entry points of a model under tensor parallelism (``forward``, ``logits``, ``head_stats``).

On rank 0 each entry point first sends the command to the other ranks (:mod:`.channel`), which run the same entry
point on their shards (:mod:`.worker`); then every rank runs it, meeting in the same collectives: one all-reduce
after each row-parallel projection (a mixture-of-experts layer: after its routed plus shared partial outputs) and
after the embedding, an all-gather of the logits slices (``logits``) or of a
few numbers per row (``head_stats``: the vocabulary-parallel head). The attention plan travels as its host
description (the sequences' :class:`~diffuse_engine.engine.attention_plan.SeqPlan` list), sent once per plan and
rebuilt by each rank over its own head-sharded KV cache.

Any failure inside an entry point on rank 0 (a collective that times out or finds a peer gone, or an error that only
this rank met) leaves the ranks out of step: the context turns it into a
:class:`~diffuse_engine.errors.TensorParallelError` and refuses every later call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from ..engine.attention_plan import AttentionPlan
from ..engine.ceilings import LinkCeilings
from ..engine.kv_cache import PagedKVCache
from ..errors import TensorParallelError
from ..layout import TokenLayout
from ..ops import linear
from ..ops.vocab_parallel import combine_partials, slice_neg_entropy, slice_partials, split_columns
from .channel import Channel

_HEAD_ARGS = ("rows", "temperature", "seed", "step", "position", "raw_confidence", "conf_exclude")


class TPContext:
    """Rank ``rank`` of ``world``; ``channel`` carries rank 0's commands; ``describe``: on rank 0, a sentence about
    the workers' state for error messages."""

    def __init__(self, rank: int, world: int, vocab_size: int, device: torch.device, channel: Channel,
                 describe: Callable[[], str] | None = None) -> None:
        self.rank, self.world, self.device, self.channel = rank, world, device, channel
        self.ranges = split_columns(vocab_size, world)
        self.vocab = self.ranges[rank]
        self.width = self.ranges[0][1] - self.ranges[0][0]
        self.describe = describe
        self.broken: str | None = None
        self.last_hidden: torch.Tensor | None = None
        self.link: LinkCeilings | None = None  # measured by measure_link
        self._sent_layout: TokenLayout | None = None  # rank 0: the layout the workers hold
        self._layout: TokenLayout | None = None  # workers: the layout rank 0 last sent
        self._cache: PagedKVCache | None = None  # workers: this rank's KV-cache shard

    @property
    def driver(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ failures
    def _fail(self, what: str, exc: BaseException) -> TensorParallelError:
        detail = f"{type(exc).__name__}: {exc}".strip()
        state = f" {self.describe()}" if self.describe is not None else ""
        self.broken = (f"the tensor-parallel ranks failed during {what} ({detail[:400]}).{state} The engine cannot "
                       f"run further steps; start a new one.")
        return TensorParallelError(self.broken)

    def _check(self) -> None:
        if self.broken is not None:
            raise TensorParallelError(self.broken)

    def _guard(self, what: str, fn, *args, **kwargs):
        self._check()
        try:
            return fn(*args, **kwargs)
        except TensorParallelError:
            raise
        except BaseException as exc:  # the ranks are out of step, whatever stopped this one (Ctrl-C included)
            if not self.driver:
                raise
            error = self._fail(what, exc)
            if not isinstance(exc, Exception):
                raise
            raise error from exc

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel.all_reduce(x)

    def embed(self, embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """The vocabulary-parallel embedding: each rank looks up the ids in its slice, zeros elsewhere, summed."""
        lo, hi = self.vocab
        local = ids - lo
        inside = (local >= 0) & (local < hi - lo)
        h = embed(local.clamp(0, hi - lo - 1))
        return self.all_reduce(h.masked_fill(~inside[:, None], 0))

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """The whole rows ``[M, V]`` from every rank's logits slice ``[M, V_r]``."""
        padded = local.new_zeros((local.shape[0], self.width))
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.channel.all_gather(parts, padded)
        return torch.cat([p[:, : hi - lo] for p, (lo, hi) in zip(parts, self.ranges, strict=True)], dim=1)

    # ------------------------------------------------------------------ entry points
    def forward(self, model, input_ids: torch.Tensor, positions: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.driver:
            vocab = self.ranges[-1][1]
            # Each rank looks up only its slice, so an id outside the vocabulary would embed as zeros: refuse it
            # first (on the CPU, where the check costs no synchronisation; the engine checks prompts anyway).
            if input_ids.device.type == "cpu" and input_ids.numel() and not (
                    0 <= int(input_ids.min()) and int(input_ids.max()) < vocab):
                raise ValueError(f"token ids must be in [0, {vocab}); got ids from {int(input_ids.min())} to "
                                 f"{int(input_ids.max())}.")
            self._guard("sending a forward", self._send_forward, input_ids, positions, layout)
        h = self._guard("the forward", model.local_hidden_states, input_ids, positions, layout)
        self.last_hidden = h
        return h

    def logits(self, model, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.driver:
            self._guard("sending a head", self._send_rows, "logits", hidden, {"rows": rows}, {})

        def run() -> torch.Tensor:
            local = linear(hidden if rows is None else hidden[rows], model.lm_head_weight())
            return self.gather_vocab(local)

        return self._guard("the LM head", run)

    def head_stats(self, model, hidden: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                   seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor,
                   conf_exclude: torch.Tensor | None = None, entropy_eps: float = 0.0,
                   flags=None) -> dict[str, torch.Tensor]:
        args = dict(zip(_HEAD_ARGS, (rows, temperature, seed, step, position, raw_confidence, conf_exclude),
                        strict=True))
        if self.driver:
            self._guard("sending a head", self._send_rows, "head", hidden, args,
                        {"entropy_eps": entropy_eps, "flags": flags})
        return self._guard("the vocabulary-parallel head", self._head_stats, model, hidden, args, entropy_eps, flags)

    def _head_stats(self, model, hidden: torch.Tensor, a: dict, entropy_eps: float,
                    flags) -> dict[str, torch.Tensor]:
        x = linear(hidden[a["rows"]], model.lm_head_weight())
        scores = flags.scores if flags is not None else ("margin", "neg_entropy")
        host = None if flags is None else (flags.any_hot, flags.any_raw, flags.all_raw, flags.any_exclude)
        parts, q = slice_partials(x, self.vocab[0], a["temperature"], a["seed"], a["step"], a["position"],
                                  raw_confidence=a["raw_confidence"], conf_exclude=a["conf_exclude"], scores=scores,
                                  flags=host)
        gathered = [torch.empty_like(parts) for _ in range(self.world)]
        self.channel.all_gather(gathered, parts)
        out = combine_partials(torch.stack(gathered), scores)
        if entropy_eps > 0 and "neg_entropy" in scores:
            share = self.all_reduce(slice_neg_entropy(q, out["mx"], out["s"], entropy_eps))
            out["neg_entropy"] = torch.where(out["invalid"].bool(), out["neg_entropy"], share)
        return out

    # ------------------------------------------------------------------ rank 0: commands
    def _send_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: TokenLayout) -> None:
        same = layout is self._sent_layout
        self.channel.send("forward", {"layout": None if same else encode_layout(layout)}, [input_ids, positions])
        self._sent_layout = layout

    def _send_rows(self, op: str, hidden: torch.Tensor, args: dict, meta: dict) -> None:
        own = hidden is self.last_hidden
        present = [name for name, t in args.items() if t is not None]
        tensors = [args[name] for name in present] + ([] if own else [hidden])
        self.channel.send(op, {**meta, "own": own, "present": present}, tensors)

    def stop(self) -> None:
        self.channel.send("stop", {}, [])

    def measure_link(self, dtype: torch.dtype = torch.float32) -> LinkCeilings:
        """Rank 0: time all-reduces of 1 element (latency) and of 4 MiB (bandwidth) on every rank; the result is
        what the cost model charges for the step's collectives (kept as :attr:`link`)."""
        if self.driver:
            self._guard("sending a link probe", self.channel.send, "probe", {"dtype": dtype}, [])
        link = self._guard("the link probe", _probe, self.channel, self.device, dtype, self.world)
        self.link = link
        return link

    # ------------------------------------------------------------------ workers: commands
    def run_command(self, model, op: str, meta: dict, tensors: list[torch.Tensor]) -> bool:
        """Run one command of rank 0 on this rank's shard; False for ``stop``."""
        if op == "stop":
            return False
        if op == "probe":
            self.measure_link(meta["dtype"])
            return True
        if op == "forward":
            if meta["layout"] is not None:
                self._layout = decode_layout(meta["layout"], self, model)
            model.hidden_states(tensors[0], tensors[1], self._layout)
            return True
        present = meta["present"]
        args = dict.fromkeys(_HEAD_ARGS)
        args.update(zip(present, tensors[: len(present)], strict=True))
        hidden = self.last_hidden if meta["own"] else tensors[len(present)]
        if op == "logits":
            model.logits_at(hidden, args["rows"])
        elif op == "head":
            a = args
            model.head_stats(hidden, a["rows"], a["temperature"], a["seed"], a["step"], a["position"],
                             raw_confidence=a["raw_confidence"], conf_exclude=a["conf_exclude"],
                             entropy_eps=meta["entropy_eps"], flags=meta["flags"])
        else:
            raise ValueError(f"unknown tensor-parallel command {op!r}.")
        return True

    def cache_for(self, geometry: tuple, model) -> PagedKVCache:
        """This worker's KV-cache shard for rank 0's pool geometry (allocated once, again when it changes)."""
        num_pages, page_size, dtype = geometry
        c = self._cache
        if c is None or (c.num_pages, c.page_size, c.k.dtype) != (num_pages, page_size, dtype):
            self._cache = None
            cfg = model.config
            self._cache = PagedKVCache(cfg.num_layers, model.kv_heads(), cfg.head_dim, num_pages, page_size, dtype,
                                       self.device)
        return self._cache


def _probe(channel: Channel, device: torch.device, dtype: torch.dtype, world: int) -> LinkCeilings:
    small = torch.zeros(1, dtype=dtype, device=device)
    big = torch.zeros((4 << 20) // small.element_size(), dtype=dtype, device=device)
    times = []
    for x, reps in ((small, 20), (big, 4)):
        channel.all_reduce(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            channel.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / reps)
    latency = times[0]
    moved = 2.0 * (world - 1) / world * big.numel() * big.element_size()
    bandwidth = moved / max(times[1] - latency, 1e-9) / 1e9
    return LinkCeilings(f"{'nccl' if device.type == 'cuda' else 'gloo'}-{world}", bandwidth, latency, "measured")


def encode_layout(layout: TokenLayout) -> dict:
    """A layout's host description (what another rank needs to rebuild it)."""
    mask = layout.key_mask
    out = {"batch": layout.batch, "seq_len": layout.seq_len, "cu": layout.cu_seqlens, "block_size": layout.block_size,
           "key_mask": None if mask is None else mask.cpu().numpy()}
    kv = layout.kv
    if kv is not None:
        seqs = getattr(kv, "seqs", None)
        if seqs is None:
            raise ValueError("this attention plan has no host description; tensor parallelism cannot send it.")
        cache = kv.cache
        out["seqs"] = seqs
        out["cache"] = None if cache is None else (cache.num_pages, cache.page_size, cache.k.dtype)
    return out


def decode_layout(desc: dict, ctx: TPContext, model) -> TokenLayout:
    device = ctx.device
    mask = desc["key_mask"]
    layout = TokenLayout(batch=desc["batch"], seq_len=desc["seq_len"], cu_seqlens=desc["cu"],
                         block_size=desc["block_size"],
                         key_mask=None if mask is None else torch.from_numpy(mask).to(device))
    if "seqs" in desc:
        cache = ctx.cache_for(desc["cache"], model) if desc["cache"] is not None else None
        layout.kv = AttentionPlan(cache, desc["seqs"], device)
    elif layout.cu_seqlens is not None:
        layout.cu_seqlens_device = torch.from_numpy(np.asarray(layout.cu_seqlens, dtype=np.int32)).to(device)
    return layout
