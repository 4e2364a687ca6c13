"""What a step recomputes (engine/recompute.py): one rule per cache mode, read by both the plan and the cost
model, checked here against the positions each mode is defined to feed."""

import pytest

from diffuse_engine.engine.recompute import recompute, step_item
from diffuse_engine.engine.request import Request
from diffuse_engine.sampling_params import SamplingParams

MASK = 99


def _request(cache: str, block_size: int | None = None) -> Request:
    params = SamplingParams(gen_length=16, block_length=block_size or 8, steps=16, cache=cache)
    return Request("r", list(range(5)), params, "low_confidence", 0, MASK, "llada", block_size)


@pytest.mark.parametrize("shift", [0, 1])
def test_each_mode_recomputes_its_positions(shift):
    for cache in ("prefix", "dual"):
        req = _request(cache)
        req.block, req.block_step = 1, 1  # the second block, past its refresh step
        start, end = req.block_span
        assert (start, end, req.seq_len) == (13, 21, 21)
        r = recompute(req, shift)
        assert (r.lo, r.write) == (start - shift, None)
        assert (r.hi, r.read) == ((21, [(0, start - shift)]) if cache == "prefix"
                                  else (end, [(0, start - shift), (end, 21)]))
        req.block_step = 0  # a refresh step: everything but the reused prefix, written back
        req.reused = 3
        assert recompute(req, shift) == (3, 21, [(0, 3)], (3, 21))
    none = _request("none")
    assert recompute(none, shift) == (0, 21, [], None)


def test_block_cache_and_the_steady_state():
    req = _request("none", block_size=4)  # a block-diffusion model: the exact block cache
    assert req.cache_mode == "block" and req.spans[0] == (5, 8)
    req.block, req.cached_upto = 2, 4
    start, end = req.block_span
    assert (start, end) == (12, 16)
    assert recompute(req) == (4, 16, [(0, 4)], (4, 12))
    assert recompute(req, steady=True) == (12, 16, [(0, 12)], (12, 12))
    req.block_masked_count = 3
    assert step_item(req) == (4, 12, 3)


def test_step_item_counts_the_steady_state_of_each_mode():
    for cache, item in (("none", (21, 0)), ("prefix", (8, 13)), ("dual", (8, 13))):
        req = _request(cache)
        req.block, req.block_step, req.block_masked_count = 1, 0, 20  # a refresh step counts as steady
        assert step_item(req) == (*item, min(item[0], 20))
    req = _request("dual")
    req.block_masked_count = 0
    assert step_item(req)[2] == 1  # at least one head row
