"""How many tokens each denoising step commits: the published schedules, computed exactly as published."""

from __future__ import annotations

import torch

from .ordering import ORDERINGS

# The architectures that follow Dream's schedule (timesteps from 1 to eps); the others follow LLaDA's counts.
DREAM_SCHEDULE_ARCHS = ("dream",)


def dream_schedule(arch: str) -> bool:
    """Whether the fixed policy of architecture ``arch`` follows Dream's timesteps (else LLaDA's counts)."""
    return arch in DREAM_SCHEDULE_ARCHS


def uses_timesteps(arch: str, ordering: str) -> bool:
    """Whether a request needs Dream's timesteps: for Dream's schedule, or for an ordering whose coins use them."""
    return dream_schedule(arch) or ORDERINGS[ordering].coins


def llada_transfer_counts(num_masked: int, steps: int) -> list[int]:
    """LLaDA's ``get_num_transfer_tokens``: ``num_masked // steps`` per step, the remainder spread over the
    first steps (one extra each)."""
    base, rem = divmod(num_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's ``torch.linspace(1, eps, steps + 1)`` (fp32, as the reference computes it)."""
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)


def dream_transfer_count(num_masked: int, step: int, timesteps: torch.Tensor) -> int:
    """Dream's count at step ``step`` with ``num_masked`` positions still masked: ``int(n * (1 - s / t))``
    in fp32, and every remaining position at the last step."""
    steps = timesteps.numel() - 1
    if step >= steps - 1:
        return num_masked
    t, s = timesteps[step], timesteps[step + 1]
    n = torch.tensor(float(num_masked), dtype=torch.float32)
    return int(n * (1 - s / t))


def dream_transfer_probability(step: int, timesteps: torch.Tensor) -> float:
    """Dream's ``origin`` coin: each masked position is unmasked with probability ``1 - s / t`` (1 at the
    last step)."""
    steps = timesteps.numel() - 1
    if step >= steps - 1:
        return 1.0
    t, s = timesteps[step], timesteps[step + 1]
    return float(1 - s / t)
