"""Which slice of each weight a tensor-parallel rank holds (Megatron-style sharding of the three dense families).

- Column-parallel (output features split, dim 0 of the weight and its bias): q, k, v projections and the SwiGLU
  gate / up projections. Query heads are split evenly; key/value heads too when ``num_kv_heads >= tp``, else each
  key/value head is replicated on the ``tp / num_kv_heads`` ranks whose query heads read it (GQA).
- Row-parallel (input features split, dim 1): the attention output and the MLP down projection, followed by one
  all-reduce each (``models.layers.row_linear``); their biases are kept whole and added once after it.
- Vocabulary-parallel (rows of the vocabulary, dim 0): the embedding (a masked lookup plus an all-reduce) and the
  LM head (each rank's logits slice; :mod:`diffuse_engine.ops.vocab_parallel` reduces its statistics).
- Everything else (norms, q/k norms) is replicated.

:class:`ShardPlan` answers for a parameter name (the published checkpoints' names) and is what the loader reads
slices with (``loader.load_model(shard=...)``: each rank reads only its slices from the safetensors files).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..ops.vocab_parallel import split_columns

_VOCAB = ("model.transformer.wte.weight", "model.transformer.ff_out.weight", "model.embed_tokens.weight",
          "lm_head.weight")
_COLUMN_Q = ("q_proj",)
_COLUMN_KV = ("k_proj", "v_proj")
_COLUMN_MLP = ("ff_proj", "up_proj", "gate_proj")
_ROW = ("attn_out", "o_proj", "ff_out", "down_proj")
DENSE_ARCHS = ("llada", "dream", "sdar")


def check_tensor_parallel(config: ModelConfig, size: object, device: torch.device | str | None = None) -> int:
    """``size`` as a valid tensor-parallel degree for ``config`` on ``device``; a ValueError that says why not."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer; got {size!r}.")
    if size == 1:
        return 1
    c = config
    if c.arch not in DENSE_ARCHS:
        raise ValueError(f"tensor parallelism supports the {', '.join(DENSE_ARCHS)} families; this model is "
                         f"{c.arch!r}.")
    if c.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {c.num_heads} attention heads.")
    if c.num_kv_heads % size and size % c.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} and the model's {c.num_kv_heads} key/value heads must divide "
                         f"one another (heads are split, or replicated when there are fewer than ranks).")
    if c.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the MLP width {c.intermediate_size}.")
    split_columns(c.vocab_size, size)  # raises when the vocabulary is too small
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        have = torch.cuda.device_count()
        if size > have:
            raise ValueError(f"tensor_parallel_size {size} needs {size} CUDA devices; this machine has {have}.")
    elif dev is not None and dev.type != "cpu":
        raise ValueError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo); got device {dev}.")
    return size


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
        width = c.intermediate_size // world
        self.mlp_rows = (rank * width, (rank + 1) * width)
        self.vocab = split_columns(c.vocab_size, world)[rank]

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """``(dim, lo, hi)`` of parameter ``name`` held by this rank, or None when it is replicated."""
        if name in _VOCAB:
            return (0, *self.vocab)
        parts = name.split(".")
        if len(parts) < 2:
            return None
        module, leaf = parts[-2], parts[-1]
        if module in _COLUMN_Q:
            return (0, *self.q_rows)
        if module in _COLUMN_KV:
            return (0, *self.kv_rows)
        if module in _COLUMN_MLP:
            return (0, *self.mlp_rows)
        if module in _ROW and leaf == "weight":
            return (1, *(self.q_rows if module in ("attn_out", "o_proj") else self.mlp_rows))
        return None

    def local_shape(self, name: str, shape: torch.Size) -> torch.Size:
        cut = self.slice_of(name)
        if cut is None:
            return shape
        dim, lo, hi = cut
        out = list(shape)
        out[dim] = hi - lo
        return torch.Size(out)

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the whole tensor ``name`` (a copy, contiguous)."""
        cut = self.slice_of(name)
        if cut is None:
            return tensor
        dim, lo, hi = cut
        return tensor.narrow(dim, lo, hi - lo).contiguous()

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
