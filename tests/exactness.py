"""What the exactness tests of each family share (``test_exactness_llada.py``, ``test_exactness_dream.py``):
random tiny checkpoints of a preset in float64 (argmax / top-k decisions are not decided by rounding), the engine
on them, the family's reference implementation on the same model with the same counter-based noise, and the
checks: one prompt, a batch against each prompt run alone, and float32 models counting flipped tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name


def random_prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()  # byte tokens: no special ids


class Family:
    """``oracle(model, prompt, params, seed, config) -> canvas token ids``: the family's reference decoding.
    ``prompt_seed``: the seed of the main prompt; the batch's prompts (of ``batch_lengths``) follow it."""

    def __init__(self, preset: str, name: str, oracle: Callable[..., list[int]], *, prompt_seed: int,
                 prompt_length: int, batch_lengths: Sequence[int]) -> None:
        self.config = from_name(preset).config
        self.name = name
        self._oracle = oracle
        self.prompt = random_prompt(prompt_length, prompt_seed)
        self.batch_prompts = [random_prompt(n, prompt_seed + i) for i, n in enumerate(batch_lengths)]

    @functools.cache  # noqa: B019 - one Family per test module, alive for the session anyway
    def model(self, seed: int, dtype: torch.dtype = torch.float64, heavy: tuple[int, ...] = ()):
        """A random tiny model. ``heavy``: special token ids made frequent predictions (a random model almost
        never predicts EOS / EOT, which would leave the EOS options unexercised): the i-th id's LM-head row becomes
        1.1x the row of the model's i-th most frequent prediction on a masked canvas."""
        config = self.config
        model = build_model(config, dtype=dtype).init_random_(seed).eval()
        if heavy:
            with torch.no_grad():
                x = torch.tensor([self.prompt + [config.mask_token_id] * 32])
                counts = torch.bincount(model(x)[0, len(self.prompt):].argmax(-1), minlength=config.vocab_size)
                common = counts.argsort(descending=True, stable=True)
                head = model.lm_head_weight()
                for i, tok in enumerate(heavy):
                    head[tok] = head[common[i]] * 1.1
        return model

    @functools.cache  # noqa: B019
    def llm(self, seed: int, dtype: torch.dtype = torch.float64, heavy: tuple[int, ...] = ()) -> LLM:
        return LLM.from_model(self.model(seed, dtype, heavy))

    def oracle(self, model, prompt: list[int], p: SamplingParams, seed: int) -> list[int]:
        return self._oracle(model, prompt, p, seed, self.config)

    def check(self, model_seed: int, params: SamplingParams, prompt: list[int] | None = None, *,
              dtype: torch.dtype = torch.float64, heavy: tuple[int, ...] = ()) -> list[int]:
        """The engine's canvas for one prompt (default: the main one), asserted equal to the oracle's."""
        prompt = self.prompt if prompt is None else prompt
        got = self.llm(model_seed, dtype, heavy).generate([prompt], params)[0].token_ids
        want = self.oracle(self.model(model_seed, dtype, heavy), prompt, params, params.seed)
        diff = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        assert not diff, (f"engine != {self.name} at canvas positions {diff}\n engine {got}\n oracle {want}\n"
                          f" params {params}")
        return got

    def check_batch(self, model_seed: int, params: Sequence[SamplingParams], *, detail: bool = True) -> None:
        """The batch of :attr:`batch_prompts` (one params each) decodes each prompt as the oracle alone does."""
        outs = self.llm(model_seed).generate(self.batch_prompts, list(params))
        for prompt, p, out in zip(self.batch_prompts, params, outs, strict=True):
            want = self.oracle(self.model(model_seed), prompt, p, p.seed)
            if detail:
                assert out.token_ids == want, \
                    f"prompt of {len(prompt)} tokens: engine {out.token_ids} != oracle {want}"
            else:
                assert out.token_ids == want, p

    def float32_flips(self, cases: Iterable[tuple[int, SamplingParams, list[int], object]]) -> None:
        """float32 models against the oracle on the same model at temperature 0, counting flipped tokens (near-
        ties may legitimately flip; on the given cases none do). ``cases``: (model seed, params, prompt, label)."""
        flipped, total, failed = 0, 0, []
        for model_seed, p, prompt, label in cases:
            got = self.llm(model_seed, torch.float32).generate([prompt], p)[0].token_ids
            want = self.oracle(self.model(model_seed, torch.float32), prompt, p, 0)
            n = sum(a != b for a, b in zip(got, want, strict=True))
            flipped += n
            total += len(got)
            if n:
                failed.append((model_seed, label, len(prompt), n))
        assert flipped == 0, f"fp32: {flipped}/{total} tokens differ from the oracle ({flipped / total:.2%}): {failed}"
