"""Which slice of each weight a tensor-parallel rank holds (Megatron-style sharding of the dense families and of
the mixture-of-experts families LLaDA-MoE and LLaDA2).

- Column-parallel (output features split, dim 0 of the weight and its bias): q, k, v projections and the SwiGLU
  gate / up projections. Query heads are split evenly; key/value heads too when ``num_kv_heads >= tp``, else each
  key/value head is replicated on the ``tp / num_kv_heads`` ranks whose query heads read it (GQA). LLaDA2's fused
  ``query_key_value`` rows ``[q | k | v]`` give a rank three ranges (its query heads, its key heads, its value
  heads), read and concatenated in that order.
- Row-parallel (input features split, dim 1): the attention output and the MLP down projection, followed by one
  all-reduce each (``models.layers.row_linear``); their biases are kept whole and added once after it.
- Mixture of experts: every rank holds every expert with its intermediate dim split (gate / up ``[E, I/tp, d]``,
  down ``[E, d, I/tp]``; per expert in the checkpoint: gate / up dim 0, down dim 1), the shared experts split the
  same way, the router and its expert bias replicated (every rank routes every token identically). A layer's routed
  and shared partial outputs are added and summed over the ranks by one all-reduce.
- Vocabulary-parallel (rows of the vocabulary, dim 0): the embedding (a masked lookup plus an all-reduce) and the
  LM head (each rank's logits slice; :mod:`diffuse_engine.ops.vocab_parallel` reduces its statistics).
- Everything else (norms, q/k norms, routers) is replicated.

:class:`ShardPlan` answers for a parameter name (the published checkpoints' names, and the stacked experts'
``...experts.{gate,up,down}_proj``) and is what the loader reads slices with (``loader.load_model(shard=...)``: each
rank reads only its slices from the safetensors files).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..models.moe import EXPERT_PROJECTIONS
from ..ops.vocab_parallel import split_columns

_VOCAB = ("model.transformer.wte.weight", "model.transformer.ff_out.weight", "model.embed_tokens.weight",
          "model.word_embeddings.weight", "lm_head.weight")
_COLUMN_Q = ("q_proj",)
_COLUMN_KV = ("k_proj", "v_proj")
_COLUMN_QKV = ("query_key_value",)
_COLUMN_MLP = ("ff_proj", "up_proj", "gate_proj")
_ROW_ATTN = ("attn_out", "o_proj", "dense")
_ROW_MLP = ("ff_out", "down_proj")
_SHARED = ("shared_expert", "shared_experts")
DENSE_ARCHS = ("llada", "dream", "sdar")
MOE_ARCHS = ("llada_moe", "llada2")
TP_ARCHS = DENSE_ARCHS + MOE_ARCHS

# (dim, lo, hi): one range of dim ``dim``; (dim, ((lo, hi), ...)): several ranges of it, concatenated in order.
Cut = tuple[int, int, int] | tuple[int, tuple[tuple[int, int], ...]]


def check_tensor_parallel(config: ModelConfig, size: object, device: torch.device | str | None = None) -> int:
    """``size`` as a valid tensor-parallel degree for ``config`` on ``device``; a ValueError that says why not."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer; got {size!r}.")
    if size == 1:
        return 1
    c = config
    if c.arch not in TP_ARCHS:
        raise ValueError(f"tensor parallelism supports the {', '.join(TP_ARCHS)} families; this model is "
                         f"{c.arch!r}.")
    if c.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {c.num_heads} attention heads.")
    if c.num_kv_heads % size and size % c.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} and the model's {c.num_kv_heads} key/value heads must divide "
                         f"one another (heads are split, or replicated when there are fewer than ranks).")
    for what, width in _split_widths(c):
        if width % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide {what} {width}.")
    split_columns(c.vocab_size, size)  # raises when the vocabulary is too small
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        have = torch.cuda.device_count()
        if size > have:
            raise ValueError(f"tensor_parallel_size {size} needs {size} CUDA devices; this machine has {have}.")
    elif dev is not None and dev.type != "cpu":
        raise ValueError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo); got device {dev}.")
    return size


def _split_widths(c: ModelConfig) -> list[tuple[str, int]]:
    """The intermediate widths that tensor parallelism splits: the dense MLP's (when some layer has one), the
    routed experts' and the shared experts' (a multiple of the routed width today, checked for its own message)."""
    out = [("the MLP width", c.intermediate_size)] if c.num_layers > c.num_moe_layers else []
    if c.num_moe_layers:
        out.append(("the experts' width moe_intermediate_size", c.moe_intermediate_size))
        if c.num_shared_experts:
            out.append(("the shared experts' width", c.num_shared_experts * c.moe_intermediate_size))
    return out


def _rank_rows(width: int, rank: int, world: int) -> tuple[int, int]:
    share = width // world
    return (rank * share, (rank + 1) * share)


def cut_ranges(cut: Cut) -> tuple[int, tuple[tuple[int, int], ...]]:
    """``(dim, ranges)`` of a :meth:`ShardPlan.slice_of` answer, whether it names one range or several."""
    dim, *rest = cut
    return (dim, ((rest[0], rest[1]),)) if len(rest) == 2 else (dim, tuple(rest[0]))


class ShardPlan:
    """Rank ``rank`` of ``world``'s slices of ``config``'s weights."""

    def __init__(self, config: ModelConfig, rank: int, world: int) -> None:
        check_tensor_parallel(config, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}); got {rank!r}.")
        self.config, self.rank, self.world = config, rank, world
        c, hd = config, config.head_dim
        self.heads = c.num_heads // world
        self.q_rows = (rank * self.heads * hd, (rank + 1) * self.heads * hd)
        if c.num_kv_heads >= world:
            self.kv_heads = c.num_kv_heads // world
            self.kv_rows = (rank * self.kv_heads * hd, (rank + 1) * self.kv_heads * hd)
        else:  # replicated: rank r's query heads all read key/value head r // (world / num_kv_heads)
            self.kv_heads = 1
            head = rank // (world // c.num_kv_heads)
            self.kv_rows = (head * hd, (head + 1) * hd)
        self.mlp_rows = _rank_rows(c.intermediate_size, rank, world)
        self.expert_rows = _rank_rows(c.moe_intermediate_size or 0, rank, world)
        self.shared_rows = _rank_rows(c.num_shared_experts * (c.moe_intermediate_size or 0), rank, world)
        q_all, kv_all = c.num_heads * hd, c.num_kv_heads * hd
        self.qkv_rows = (self.q_rows, tuple(q_all + r for r in self.kv_rows),
                         tuple(q_all + kv_all + r for r in self.kv_rows))
        self.vocab = split_columns(c.vocab_size, world)[rank]

    def slice_of(self, name: str) -> Cut | None:
        """``(dim, lo, hi)`` of parameter ``name`` held by this rank, ``(dim, ((lo, hi), ...))`` when it holds
        several ranges of that dim (LLaDA2's fused ``query_key_value``: its q, k and v rows), or None when the
        parameter is replicated."""
        if name in _VOCAB:
            return (0, *self.vocab)
        parts = name.split(".")
        if len(parts) < 2:
            return None
        module, leaf = parts[-2], parts[-1]
        if module == "experts" and leaf in EXPERT_PROJECTIONS:  # stacked: [E, I, d] / [E, d, I]
            return (2 if leaf == "down_proj" else 1, *self.expert_rows)
        if module in _COLUMN_Q:
            return (0, *self.q_rows)
        if module in _COLUMN_KV:
            return (0, *self.kv_rows)
        if module in _COLUMN_QKV:
            return (0, self.qkv_rows)
        if module in _COLUMN_MLP:
            return (0, *self._mlp_rows(parts))
        if module in _ROW_ATTN and leaf == "weight":
            return (1, *self.q_rows)
        if module in _ROW_MLP and leaf == "weight":
            return (1, *self._mlp_rows(parts))
        return None

    def _mlp_rows(self, parts: list[str]) -> tuple[int, int]:
        """This rank's intermediate rows of the SwiGLU projection named ``parts``: one routed expert's
        (``...experts.{j}.{proj}.weight``), the shared experts' or the dense MLP's."""
        if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit():
            return self.expert_rows
        return self.shared_rows if len(parts) >= 3 and parts[-3] in _SHARED else self.mlp_rows

    def local_shape(self, name: str, shape: torch.Size) -> torch.Size:
        cut = self.slice_of(name)
        if cut is None:
            return shape
        dim, ranges = cut_ranges(cut)
        out = list(shape)
        out[dim] = sum(hi - lo for lo, hi in ranges)
        return torch.Size(out)

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the whole tensor ``name`` (a copy, contiguous)."""
        cut = self.slice_of(name)
        if cut is None:
            return tensor
        dim, ranges = cut_ranges(cut)
        parts = [tensor.narrow(dim, lo, hi - lo) for lo, hi in ranges]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim)

    def resize_meta(self, model: torch.nn.Module) -> None:
        """Give the parameters of a model built on the meta device their local shapes (before a sharded load)."""
        for name, p in list(model.named_parameters()):
            shape = self.local_shape(name, p.shape)
            if shape != p.shape:
                module = model.get_submodule(name.rpartition(".")[0])
                module._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(
                    torch.empty(shape, dtype=p.dtype, device=p.device), requires_grad=False)

    def shard_module(self, model: torch.nn.Module) -> None:
        """Cut a whole model in place to this rank's slices (for models built in memory, e.g. random weights)."""
        for name, p in list(model.named_parameters()):
            local = self.take(name, p.detach())
            if local is not p:
                module = model.get_submodule(name.rpartition(".")[0])
                module._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(local, requires_grad=False)

    def attach(self, model, context) -> None:
        """Set the local head counts of every block and hand the model and its blocks the tensor-parallel
        ``context``."""
        model.tp = context
        for block in model.blocks():
            block.n_heads, block.n_kv = self.heads, self.kv_heads
            block.tp = context
