"""What every model family provides to the engine, and the plain full forward built on it."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .layers import Rotary, TokenLayout, init_linear_, rope_cos_sin


class DiffusionLM(nn.Module):
    """A bidirectional transformer that predicts every position of its input.

    Subclasses define the parameter tree (names of the published checkpoints) and:
    ``embed(ids)``, ``blocks()``, ``final_norm(h)``, ``lm_head_weight()`` and ``rope_full_precision``;
    each block is called as ``block(h, rope, layout)`` (:class:`~.layers.Rotary` tables; q and k go to
    :func:`~.layers.attend` before RoPE).
    """

    rope_full_precision = False
    # A tensor-parallel context (:class:`diffuse_engine.distributed.TPContext`) when this instance holds one rank's
    # shard of the model; None on a single device. The context tells the other ranks what to run (on rank 0) and
    # does the collectives; the model only calls it.
    tp = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    # -- provided by the family
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight().dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight().device

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Final-norm hidden states ``[N, hidden]`` of flat ``input_ids`` ``[N]`` at RoPE ``positions`` ``[N]``."""
        if input_ids.ndim != 1 or positions.shape != input_ids.shape:
            raise ValueError("hidden_states takes flat input_ids and positions of the same shape [num_tokens].")
        if input_ids.numel() != layout.num_tokens:
            raise ValueError(f"layout covers {layout.num_tokens} tokens but {input_ids.numel()} were given.")
        if self.tp is not None:  # every rank runs its shard (rank 0 first tells the others what to run)
            return self.tp.forward(self, input_ids, positions, layout)
        return self.local_hidden_states(input_ids, positions, layout)

    def local_hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                            layout: TokenLayout) -> torch.Tensor:
        """:meth:`hidden_states` on this instance's weights (one rank's share under tensor parallelism, whose
        embedding and row-parallel projections do their own collectives)."""
        cfg = self.config
        tables = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype, cfg.rotary_dim)
        rope = Rotary(*tables, self.rope_full_precision)
        h = self.embed(input_ids) if self.tp is None else self.tp.embed(self.embed, input_ids)
        for block in self.blocks():
            h = block(h, rope, layout)
        return self.final_norm(h)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: ``[M, hidden] -> [M, vocab]`` in the model dtype."""
        return self.logits_at(hidden)

    def logits_at(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the rows ``rows`` (indices; None: all) of ``hidden`` ``[N, hidden]``: ``[M, vocab]``. Under
        tensor parallelism each rank computes its vocabulary slice and the slices are gathered."""
        if self.tp is not None:
            return self.tp.logits(self, hidden, rows)
        return ops.linear(hidden if rows is None else hidden[rows], self.lm_head_weight())

    def head_stats(self, hidden: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                   step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor,
                   conf_exclude: torch.Tensor | None = None, entropy_eps: float = 0.0,
                   flags=None) -> dict[str, torch.Tensor]:
        """The sampling statistics of rows ``rows`` of ``hidden`` without writing their logits: the fused head
        (:func:`ops.lm_head_stats`, exact entropy, every score) on one device; under tensor parallelism the
        vocabulary-parallel head (:mod:`diffuse_engine.ops.vocab_parallel`), with Dream's ``entropy_eps`` when it is
        > 0. ``flags``: the rows' host flags (``kernels.sample_torch.RowFlags``, the step's plan): the parallel head
        then reads no device value and computes of ``margin`` and ``neg_entropy`` only those ``flags.scores`` names
        (None: every score, flags read from the tensors)."""
        if self.tp is None:
            return ops.lm_head_stats(hidden, self.lm_head_weight(), rows, temperature, seed, step, position,
                                     raw_confidence=raw_confidence, conf_exclude=conf_exclude, check=False)
        return self.tp.head_stats(self, hidden, rows, temperature, seed, step, position, raw_confidence=raw_confidence,
                                  conf_exclude=conf_exclude, entropy_eps=entropy_eps, flags=flags)

    def kv_heads(self) -> int:
        """Key/value heads this instance holds (all of them, or one rank's share under tensor parallelism)."""
        return self.blocks()[0].n_kv if self.tp is not None else self.config.num_kv_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The plain full forward: logits ``[batch, seq, vocab]`` for every position.

        ``attention_mask`` ``[batch, seq]`` (1 = real token) hides padded keys. Positions default to
        ``0..seq-1`` in every row, as the published LLaDA model does even for left-padded batches. A config with
        a ``block_size`` (SDAR) makes attention block-causal: the token in column p of a row (block
        ``p // block_size``, counted from the row's first column whatever ``position_ids`` say) sees every column
        of blocks ``<= p // block_size``, bidirectionally within its own block.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
        b, s = input_ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings}).")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"attention_mask must have shape {(b, s)}, got {tuple(attention_mask.shape)}.")
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = attention_mask.to(device=input_ids.device).bool()
        layout = TokenLayout.padded(b, s, key_mask)
        layout.block_size = self.config.block_size
        h = self.hidden_states(input_ids.reshape(-1), position_ids.reshape(-1), layout)
        return self.logits_at(h).view(b, s, -1)

    @torch.no_grad()
    def init_random_(self, seed: int = 0, *, on_device: bool = False) -> DiffusionLM:
        """Fill every parameter from ``seed``: linear weights N(0, 1/fan_in) (q/k projections 3x that std, so
        that a random model's predictions vary with position and context), embeddings N(0, 1), biases
        N(0, 0.02), norms 1, stacked experts ``[E, out, in]`` N(0, 1/in) each, expert biases N(0, 0.02). By
        default drawn in fp32 on the CPU and copied, so the values are the same on every device; ``on_device=True``
        draws directly on the parameters' device (fast for 8B-size models, reproducible only on the same kind of
        device)."""
        gen = torch.Generator(device=self.device if on_device else "cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            t = p if on_device else torch.empty(p.shape, dtype=torch.float32)
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                t.fill_(1.0)
            elif name.endswith(".bias"):
                t.normal_(0.0, 0.02, generator=gen)
            elif p.ndim == 2 and ("wte" in name or "embed_tokens" in name or "word_embeddings" in name):
                t.normal_(0.0, 1.0, generator=gen)
            elif p.ndim == 3:
                t.normal_(0.0, p.shape[2] ** -0.5, generator=gen)
            elif p.ndim == 2:
                init_linear_(t, gen)
                if "q_proj" in name or "k_proj" in name:
                    t.mul_(3.0)  # sharp attention: predictions vary with position and context
            else:
                t.normal_(0.0, 0.02, generator=gen)
            if not on_device:
                p.copy_(t)
        return self
