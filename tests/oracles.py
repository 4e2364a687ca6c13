"""Independent re-expressions of the published decoding algorithms, used as test oracles.

* :func:`llada_generate` follows ``generate()`` of ML-GSAI/LLaDA ``generate.py``.
* :func:`dream_generate` follows ``_sample()`` of Dream-org's ``generation_utils.py`` (``diffusion_generate``).

Nothing here imports the engine: the only shared piece is the counter-based noise of
``kernels/reference.py``, injected through a ``noise`` object so that a sampled run of the oracle can be
compared token for token with the engine run under the same seed. Without ``noise`` the oracles draw from
torch's global generator, as the published code does.

Deviations from the published code, all of which leave the algorithm (and its distribution) unchanged:

* ``torch.topk`` does not specify which of several equal confidences it returns; the oracles break ties by
  the lowest position (a stable descending sort). Exact ties do occur: LLaDA's ``confidence_eos_eot_inf``
  gives every position that predicts end-of-turn the confidence 0.
* Sampling a token from ``softmax(z)`` is written as Gumbel-max ``argmax(z + G)`` (LLaDA's own form
  ``exp(logits) / (-log u)^T`` is kept as published), and Dream's ``torch.multinomial`` without replacement
  over ``softmax(confidence / alg_temp)`` as Gumbel-top-k ``topk(confidence / alg_temp + G)``: both are exact
  samples of the same distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # installed location
    from diffuse_engine.kernels import reference as _noise_ref
except ImportError:  # pragma: no cover - running from a source tree without the package installed
    from kernels import reference as _noise_ref


# ------------------------------------------------------------------------------------------------ noise
class KeyedNoise:
    """The counter-based uniforms of one request, keyed by ``(seed, step, position)``.

    ``step`` is the request's 0-based forward index (number of forwards before this one, across blocks) and
    ``position`` the index in the full sequence (prompt + canvas).
    """

    def __init__(self, seed: int) -> None:
        if not 0 <= seed < 2 ** 64:
            raise ValueError("seed must be in [0, 2**64)")
        self.seed = seed - (1 << 64) if seed >= (1 << 63) else seed  # uint64 bits as int64

    def _keys(self, step: int, positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        return torch.full_like(pos, self.seed), torch.full_like(pos, int(step)), pos

    def uniform_vocab(self, step: int, positions, num_cols: int) -> torch.Tensor:
        """float64 uniforms ``[len(positions), num_cols]`` for token sampling (stream SAMPLE)."""
        seed, st, pos = self._keys(step, positions)
        return _noise_ref.counter_uniform(seed, st, pos, _noise_ref.STREAM_SAMPLE, num_cols).to(torch.float64)

    def uniform_pos(self, step: int, positions, stream: int = _noise_ref.STREAM_REMASK) -> torch.Tensor:
        """float64 uniforms ``[len(positions)]``, one per position (default: LLaDA 'random' remasking)."""
        seed, st, pos = self._keys(step, positions)
        return _noise_ref.counter_uniform(seed, st, pos, stream).to(torch.float64)

    def uniform_coin(self, step: int, positions) -> torch.Tensor:
        """Dream 'origin': the per-position coin (stream TRANSFER)."""
        return self.uniform_pos(step, positions, _noise_ref.STREAM_TRANSFER)

    def uniform_order(self, step: int, positions) -> torch.Tensor:
        """Dream alg_temp: the per-position noise for sampling positions without replacement (stream ORDER)."""
        return self.uniform_pos(step, positions, _noise_ref.STREAM_ORDER)


def _topk_stable(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D tensor; ties go to the lowest index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


# ------------------------------------------------------------------------------------------------ LLaDA
def _llada_gumbel(logits: torch.Tensor, temperature: float, noise, step: int) -> torch.Tensor:
    """``add_gumbel_noise``: at temperature 0 the logits tensor itself is returned (the published code returns
    the same object, which matters for ``confidence_eos_eot_inf`` below)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    if noise is None:
        u = torch.rand_like(logits, dtype=torch.float64)
    else:
        b, s, v = logits.shape
        if b != 1:
            raise ValueError("keyed noise is per request: run the oracle one prompt at a time")
        u = noise.uniform_vocab(step, torch.arange(s), v).view(1, s, v).to(logits.device)
    gumbel_noise = (-torch.log(u)) ** temperature
    return logits.exp() / gumbel_noise


def llada_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """``get_num_transfer_tokens``: ``[batch, steps]``, masked // steps each, one more in the first
    ``masked % steps`` steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64, device=mask_index.device) + base
    for i in range(mask_num.size(0)):
        out[i, : int(remainder[i])] += 1
    return out


@torch.no_grad()
def llada_generate(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 128,
                   temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence", *,
                   mask_id: int, logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
                   eos_id: int | None = None, eot_id: int | None = None, noise=None,
                   suffix: list[int] | None = None) -> torch.Tensor:
    """LLaDA's ``generate``: returns the whole sequence ``[batch, prompt + gen_length]``.

    ``model(x)`` must return logits ``[batch, seq, vocab]``; the loop runs on ``prompt``'s device.
    ``eos_id`` / ``eot_id`` play the roles of the published 126081 / 126348.
    ``suffix`` (not in the published code): infilling, fixed tokens appended after the masked canvas. They are
    observed like the prompt (``prompt_index``, so CFG's unconditional copy masks them too) and lie past every
    block's end, so they are never candidates; the returned sequence leaves them out.
    """
    if prompt.ndim != 2:
        raise ValueError("prompt must be [batch, length]")
    plen = prompt.shape[1]
    tail = len(suffix or [])
    x = torch.full((prompt.shape[0], plen + gen_length + tail), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt.clone()
    if tail:
        x[:, plen + gen_length:] = torch.tensor(suffix, dtype=torch.long, device=prompt.device)
    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    nfe = 0
    for num_block in range(num_blocks):
        lo, hi = plen + num_block * block_length, plen + (num_block + 1) * block_length
        block_mask_index = x[:, lo:hi] == mask_id
        num_transfer_tokens = llada_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(both, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            logits = logits.clone()  # a private tensor: the in-place edits below must not reach the model

            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf

            logits_with_noise = _llada_gumbel(logits, temperature, noise, nfe)
            x0 = torch.argmax(logits_with_noise, dim=-1)

            if confidence_eos_eot_inf:
                # As published: a chained assignment. At temperature 0 ``logits_with_noise`` IS ``logits``, so
                # both the EOS and the EOT column of ``logits`` become -inf; at temperature > 0 only EOT does.
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                if noise is None:
                    x0_p = torch.rand((x0.shape[0], x0.shape[1]), dtype=torch.float64, device=x0.device)
                else:
                    if x0.shape[0] != 1:
                        raise ValueError("keyed noise is per request: run the oracle one prompt at a time")
                    x0_p = noise.uniform_pos(nfe, torch.arange(x0.shape[1])).view(1, -1).to(x0.device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, hi:] = -torch.inf

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf, dtype=x0_p.dtype, device=x0_p.device))

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                select_index = _topk_stable(confidence[j], int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            nfe += 1
    return x[:, :plen + gen_length]


# ------------------------------------------------------------------------------------------------ Dream
def _top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()  # keep the first above
    sorted_indices_to_remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def _dream_sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                         top_k: int | None = None, margin_confidence: bool = False, neg_entropy: bool = False,
                         uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tokens`` for rows ``[M, V]``; ``uniforms`` ``[M, V]`` drive the sampling when given."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_logits(logits, top_p)
    if top_k is not None:
        logits = _top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)

    if temperature > 0:
        if uniforms is None:
            x0 = torch.distributions.Categorical(probs=probs).sample()
        else:
            gumbel = -torch.log(-torch.log(uniforms.to(logits.dtype)))
            x0 = torch.argmax(logits + gumbel, dim=-1)
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)

    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(model, prompt: torch.Tensor, gen_length: int, steps: int, eps: float = 1e-3,
                   alg: str = "maskgit_plus", alg_temp: float | None = None, temperature: float = 0.0,
                   top_p: float | None = None, top_k: int | None = None, *, mask_id: int,
                   noise=None, suffix: list[int] | None = None) -> torch.Tensor:
    """Dream's ``diffusion_generate`` (``_sample``) for one prompt ``[1, L]`` without padding; returns the
    whole sequence ``[1, L + gen_length]``. ``suffix`` (not in the published code): infilling, fixed tokens after
    the masked canvas (never masked, so never candidates); left out of the result."""
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError("prompt must be [1, length]: run a batch one prompt at a time")
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    if suffix:
        x = torch.cat([x, torch.tensor([suffix], dtype=torch.long)], dim=1)
    timesteps = torch.linspace(1, eps, steps + 1)
    seq_len = x.shape[1]

    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shifted: position p reads row p - 1
        mask_logits = logits[mask_index]
        positions = mask_index[0].nonzero().squeeze(1)
        t = timesteps[i]
        s = timesteps[i + 1]
        uniforms = None
        if noise is not None and temperature > 0:
            uniforms = noise.uniform_vocab(i, positions, mask_logits.shape[-1])

        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
            if noise is None:
                coin = torch.rand(*x0.shape)
            else:
                coin = noise.uniform_coin(i, positions)
            transfer_index_t_s = coin < p_transfer
            _, x0[transfer_index_t_s] = _dream_sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k,
                uniforms=None if uniforms is None else uniforms[transfer_index_t_s])
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = _dream_sample_tokens(mask_logits, temperature, top_p, top_k, uniforms=uniforms)
            elif alg == "topk_margin":
                confidence, x0 = _dream_sample_tokens(mask_logits, temperature, top_p, top_k,
                                                      margin_confidence=True, uniforms=uniforms)
            elif alg == "entropy":
                confidence, x0 = _dream_sample_tokens(mask_logits, temperature, top_p, top_k, neg_entropy=True,
                                                      uniforms=uniforms)
            else:
                raise RuntimeError(f"Unknown alg: {alg}")
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    transfer_index = _topk_stable(full_confidence[0], number_transfer_tokens)[None]
                else:
                    full_confidence = full_confidence / alg_temp
                    if noise is None:
                        probs = F.softmax(full_confidence, dim=-1)
                        transfer_index = torch.multinomial(probs, num_samples=number_transfer_tokens)
                    else:  # Gumbel-top-k: the same law as multinomial without replacement
                        u = noise.uniform_order(i, torch.arange(seq_len)).view(1, -1)
                        keys = full_confidence - torch.log(-torch.log(u))
                        transfer_index = _topk_stable(keys[0], number_transfer_tokens)[None]
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x[:, :prompt.shape[1] + gen_length]
