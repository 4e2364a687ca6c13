"""One checker for the tensor arguments of every launcher: the Triton kernels (``kernels/``), the native module
(:mod:`diffuse_engine.native`) and the torch paths.

Each broken rule raises ``ValueError`` with one sentence that names the argument, what it must be and what it is:

- ``{name} must be a torch.Tensor, got {type}.``
- ``{name} must be {dtypes}, got {dtype}.``
- ``{name} must be {n}-D {dims}, got shape {shape}.``
- ``{name} must have {n} entries ({what}), got {k}.``
- ``{name} must have shape {shape} {dims}, got {shape}.``
- ``{name} is on {device} but {reference} is on {device}; all tensors must be on one device.``
- ``{name} must be contiguous.`` / ``{name} must have a contiguous last dimension (stride 1), got strides ...``
- ``{a}, {b} and {c} must share one dtype of {dtypes}; got ...`` (:func:`same_dtype`)

A leaf module (it imports torch and nothing from the package), so ``kernels/`` uses it without importing the engine.
"""

from __future__ import annotations

import torch


class Dtypes(tuple):
    """A named set of dtypes, named as a whole in sentences ("integer") instead of dtype by dtype."""

    name: str

    def __new__(cls, name: str, dtypes: tuple[torch.dtype, ...]) -> Dtypes:
        self = super().__new__(cls, dtypes)
        self.name = name
        return self


INTEGER = Dtypes("integer", (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                             torch.uint32, torch.uint64))
FLOATING = Dtypes("floating-point", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the floating dtypes the kernels read

DtypeSpec = torch.dtype | tuple[torch.dtype, ...]


def dtype_name(dtype: torch.dtype) -> str:
    """``int64`` for ``torch.int64``."""
    return str(dtype).removeprefix("torch.")


def _listed(words: list[str], last: str) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def describe(dtypes: DtypeSpec) -> str:
    """``int64``, ``float32, float16 or bfloat16``, or the name of a :class:`Dtypes` set."""
    if isinstance(dtypes, Dtypes):
        return dtypes.name
    if isinstance(dtypes, torch.dtype):
        return dtype_name(dtypes)
    return _listed([dtype_name(d) for d in dtypes], "or")


def _shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


class Contract:
    """The tensor arguments of one call, checked one by one against the device of a reference tensor.

    ``Contract("logits", logits)`` checks that the reference is a tensor; each call ``contract(name, t, dtype,
    ...)`` then checks one argument and returns it. Rules, in the order checked (each optional): a tensor;
    ``dtype`` (one dtype, a tuple of them, or a :class:`Dtypes` set); ``ndim`` (``dims`` names the axes in
    sentences, e.g. ``"[M]"``); ``length``: ``(n, what)``, the size of the first axis, with ``what`` saying where
    n comes from (``"M, as rows"``); ``shape``: the exact shape; the reference's device; ``contiguous`` (the
    whole tensor) or ``last_dim_contiguous`` (unit stride along the last axis, any row stride).
    """

    __slots__ = ("device", "reference")

    def __init__(self, reference: str, tensor: object) -> None:
        _require_tensor(reference, tensor)
        self.reference = reference
        self.device = tensor.device

    def __call__(self, name: str, t: object, dtype: DtypeSpec | None = None, *, ndim: int | None = None,
                 dims: str = "", length: tuple[int, str] | None = None, shape: tuple[int, ...] | None = None,
                 contiguous: bool = False, last_dim_contiguous: bool = False) -> torch.Tensor:
        _require_tensor(name, t)
        if dtype is not None and not (t.dtype == dtype if isinstance(dtype, torch.dtype) else t.dtype in dtype):
            raise ValueError(f"{name} must be {describe(dtype)}, got {dtype_name(t.dtype)}.")
        if ndim is not None and t.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D{' ' + dims if dims else ''}, got shape {_shape(t.shape)}.")
        if length is not None and (t.ndim == 0 or t.shape[0] != length[0]):
            n, what = length
            got = t.shape[0] if t.ndim else "a 0-D tensor"
            raise ValueError(f"{name} must have {n} entries{f' ({what})' if what else ''}, got {got}.")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {_shape(shape)}{' ' + dims if dims else ''}, got "
                             f"{_shape(t.shape)}.")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but {self.reference} is on {self.device}; all tensors must "
                             f"be on one device.")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous.")
        if last_dim_contiguous and t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}.")
        return t


def _require_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")


def same_dtype(tensors: dict[str, torch.Tensor], dtypes: DtypeSpec) -> torch.dtype:
    """The one dtype that every tensor of ``tensors`` (name -> tensor) shares, which must be one of ``dtypes``."""
    first = next(iter(tensors.values())).dtype
    allowed = (dtypes,) if isinstance(dtypes, torch.dtype) else dtypes
    if first not in allowed or any(t.dtype != first for t in tensors.values()):
        got = ", ".join(dtype_name(t.dtype) for t in tensors.values())
        raise ValueError(f"{_listed(list(tensors), 'and')} must share one dtype of {describe(dtypes)}; got {got}.")
    return first
