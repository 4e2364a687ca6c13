"""The engine's sync-free torch sampling path (kernels/sample_torch.py) equals the reference bit for bit: every
output of :func:`kernels.reference.sample_and_score`, for every mix of temperatures, filters, raw-logit
confidence and excluded columns, with ties; bad rows come back flagged instead of raising."""

from __future__ import annotations

import pytest
import torch

from diffuse_engine.kernels import reference as ref
from diffuse_engine.kernels.sample_torch import RowFlags, sample_rows


def _inputs(m: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, v, generator=g) * 3).to(dtype)
    x[1, 5] = x[1, 11] = x[1].max() + 1  # a tie at the maximum: the first column wins in both
    keys = dict(seed=torch.arange(m) * 977 + 3, step=torch.arange(m) % 5, position=torch.arange(m) + 10)
    return x, keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hot", ["none", "some", "all"])
@pytest.mark.parametrize("raw", ["none", "some", "all"])
@pytest.mark.parametrize("filters", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_equals_the_reference(dtype, hot, raw, filters, exclude):
    m, v = 19, 1111
    x, keys = _inputs(m, v, dtype)
    t = {"none": torch.zeros(m), "some": torch.where(torch.arange(m) % 3 == 0, 0.7, 0.0),
         "all": torch.full((m,), 1.3)}[hot]
    rc = {"none": None, "some": torch.arange(m) % 2 == 0, "all": torch.ones(m, dtype=torch.bool)}[raw]
    top_k = torch.where(torch.arange(m) % 4 == 1, 7, 0) if filters else None
    top_p = torch.where(torch.arange(m) % 5 == 2, 0.8, 1.0) if filters else None
    excl = torch.where(torch.arange(m)[:, None] % 2 == 0, torch.tensor([[3, 17]]), -1) if exclude else None
    want = ref.sample_and_score(x, t, **keys, top_k=top_k, top_p=top_p, raw_confidence=rc, conf_exclude=excl)
    flags = RowFlags(any_hot=bool((t > 0).any()), any_raw=rc is not None and bool(rc.any()),
                     all_raw=rc is not None and bool(rc.all()), any_exclude=exclude, any_top_k=filters,
                     any_top_p=filters)
    got = sample_rows(x, t, keys["seed"], keys["step"], keys["position"], flags, top_k=top_k, top_p=top_p,
                      raw_confidence=rc, conf_exclude=excl)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert not got["invalid"].any()


def test_bad_rows_are_flagged_not_raised():
    x, keys = _inputs(6, 50, torch.float32)
    x[2, 4] = float("nan")
    x[4] = float("-inf")
    x[5, 0] = float("inf")
    flags = RowFlags(False, False, False, False, False, False)
    got = sample_rows(x, torch.zeros(6), keys["seed"], keys["step"], keys["position"], flags)
    assert got["invalid"].tolist() == [0, 0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="row 2"):
        ref.sample_and_score(x, torch.zeros(6), **keys)
