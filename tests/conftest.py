"""Session setup: without a CUDA device, Triton kernels run on the CPU interpreter. TRITON_INTERPRET is read when
triton decorates its functions (its own standard library included), so it must be set before anything imports
triton; setting it here, before any test module is imported, makes every test file runnable on its own."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
