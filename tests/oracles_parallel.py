"""Plain re-expressions of the parallel-decoding algorithms, used as test oracles (greedy decoding).

* :func:`fastdllm_generate` follows NVlabs/Fast-dLLM ``llada/generate.py`` without a cache: ``generate`` with
  ``get_transfer_index`` (``threshold``: every masked token of the block with confidence >= threshold, and
  always the top-1) and its factor variant ``get_transfer_index_dynamic`` (with sorted confidences
  c_0 >= c_1 >= ..., thresholds 1 - factor / (i + 2) with the first forced, the first index that falls below
  ends the prefix; an end at the first or the last index commits one more).
* :func:`sdar_generate` follows JetAstra/SDAR ``generate.py`` (``block_diffusion_generate`` with
  ``low_confidence_static``), with the KV cache replaced by a full recomputation of every block so far: with a
  block-causal model that recomputation is what the cache must equal.

Nothing here imports the engine. Ties go to the lowest position (stable sorts), as in ``oracles.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _stable_order(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, descending=True, stable=True).indices


def transfer_index_threshold(confidence: torch.Tensor, num_masked: int, threshold: float) -> torch.Tensor:
    """``get_transfer_index`` with a threshold, one row: the top ``num_masked`` by confidence, minus those after
    the first whose confidence is below ``threshold``."""
    select = _stable_order(confidence)[:num_masked]
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    transfer[select] = True
    for k in range(1, num_masked):
        if confidence[select[k]] < threshold:
            transfer[select[k]] = False
    return transfer


def transfer_index_factor(confidence: torch.Tensor, mask_index: torch.Tensor, factor: float) -> torch.Tensor:
    """``get_transfer_index_dynamic``, one row."""
    n = int(mask_index.sum())
    thresholds = [1 - factor / (k + 1) for k in range(1, n + 1)]
    thresholds[0] = -1
    ranked = torch.sort(confidence[mask_index], descending=True).values
    top_i = 0
    for top_i in range(len(thresholds)):
        if ranked[top_i] < thresholds[top_i]:
            break
    if top_i == 0 or top_i == len(thresholds) - 1:
        top_i += 1
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    transfer[_stable_order(confidence)[:top_i]] = True
    return transfer


@torch.no_grad()
def fastdllm_generate(model, prompt: list[int], *, gen_length: int, block_length: int, mask_id: int,
                      threshold: float | None = None, factor: float | None = None) -> tuple[list[int], int]:
    """Fast-dLLM's no-cache loop for one prompt: returns (canvas tokens, forwards)."""
    plen = len(prompt)
    x = torch.full((1, plen + gen_length), mask_id, dtype=torch.long)
    x[0, :plen] = torch.tensor(prompt)
    nfe = 0
    for b in range(gen_length // block_length):
        lo, hi = plen + b * block_length, plen + (b + 1) * block_length
        while True:
            nfe += 1
            mask_index = x == mask_id
            logits = model(x).to(torch.float64)
            mask_index[:, hi:] = False
            x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf, dtype=x0_p.dtype))
            if factor is not None:
                transfer = transfer_index_factor(confidence[0], mask_index[0], factor)
            else:
                transfer = transfer_index_threshold(confidence[0], int(mask_index[0].sum()), threshold)
            x[0, transfer] = x0[0, transfer]
            if int((x[0, lo:hi] == mask_id).sum()) == 0:
                break
    return x[0, plen:].tolist(), nfe


@torch.no_grad()
def sdar_generate(model, prompt: list[int], *, gen_length: int, block_length: int, steps_per_block: int,
                  mask_id: int) -> tuple[list[int], int]:
    """SDAR's block-diffusion loop for one prompt (greedy, ``low_confidence_static``): returns the generated
    tokens (the blocks after the prompt, cut to ``gen_length``) and the denoising forwards."""
    plen = len(prompt)
    num_blocks = (plen + gen_length + block_length - 1) // block_length
    x = torch.full((1, num_blocks * block_length), mask_id, dtype=torch.long)
    x[0, :plen] = torch.tensor(prompt)
    base, rem = divmod(block_length, steps_per_block)
    counts = [base + (1 if i < rem else 0) for i in range(steps_per_block)]
    nfe = 0
    for blk in range(plen // block_length, num_blocks):
        lo, hi = blk * block_length, (blk + 1) * block_length
        for step in range(steps_per_block + 1):
            cur = x[:, lo:hi]
            mask_index = cur == mask_id
            if int(mask_index.sum()) == 0:
                break
            logits = model(x[:, :hi])[:, lo:hi].to(torch.float64)  # the cache of blocks < blk, recomputed
            nfe += 1
            x0 = logits.argmax(-1)
            x0_p = torch.gather(F.softmax(logits, -1), -1, x0[..., None])[..., 0]
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf, dtype=x0_p.dtype))
            # SDAR's static schedule counts per block_length (not per masked count); the first block can be
            # partly prompt, so never take more than what is masked.
            k = min(counts[min(step, steps_per_block - 1)], int(mask_index.sum()))
            idx = _stable_order(confidence[0])[:k]
            cur[0, idx] = x0[0, idx]
    return x[0, plen:plen + gen_length].tolist(), nfe
