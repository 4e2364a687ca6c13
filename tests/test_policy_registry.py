"""The registries of diffuse_engine.policies are the one list of names: a decoding policy registered through the
public API is selectable in SamplingParams and runs end to end; the policies package stays below the engine."""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

import diffuse_engine
from diffuse_engine import LLM, SamplingParams
from diffuse_engine.models import build_model
from diffuse_engine.policies import (
    COMMIT_TOPK,
    COUNT_FRACTION,
    DECODING,
    ORDERINGS,
    BlockState,
    CommitRule,
    default_ordering,
    register_decoding,
    unregister_decoding,
)
from diffuse_engine.presets import from_name
from diffuse_engine.sampling_params import POLICIES, REMASKING, REVISIONS

POLICIES_DIR = pathlib.Path(diffuse_engine.__file__).parent / "policies"


class Half:
    """Commit half of the block's remaining masked positions each step (at least one)."""

    name = "half"
    adaptive = True
    needs: tuple[str, ...] = ()

    def rule(self, state: BlockState) -> CommitRule:
        return CommitRule(COMMIT_TOPK, count_kind=COUNT_FRACTION, factor=0.5)

    def block_done(self, state: BlockState) -> bool:
        return state.masked == 0 or state.block_step >= 2 * state.block_len


@pytest.fixture
def half():
    register_decoding(Half())
    try:
        yield
    finally:
        unregister_decoding("half")


@functools.cache
def _llm() -> LLM:
    return LLM.from_model(build_model(from_name("llada-tiny").config).init_random_(0).eval())


def test_registered_policy_is_selectable_and_unregistered_is_refused(half):
    assert "half" in POLICIES and "half" in DECODING
    params = SamplingParams(gen_length=16, block_length=8, policy="half")
    assert params.adaptive
    unregister_decoding("half")
    try:
        with pytest.raises(ValueError, match=r"^policy must be one of 'fixed', 'threshold', 'factor', 'eb'; got "
                                             r"'half'\.$"):
            SamplingParams(policy="half")
    finally:
        register_decoding(Half())


def test_registered_policy_commits_half_of_the_masked(half):
    llm = _llm()
    engine, mask = llm.engine, llm.model.config.mask_token_id
    params = SamplingParams(gen_length=16, block_length=8, policy="half", seed=0)
    rid = engine.add_request([5, 6, 7], params)
    per_step, finished = [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                per_step.append((out.block, len(out.committed), sum(t == mask for t in out.canvas)))
                finished = out.output or finished
    # Each block of 8: 4, 2, 1, 1 (half of what is masked, at least one), whatever the model predicts.
    assert [c for _, c, _ in per_step] == [4, 2, 1, 1] * 2
    assert [m for _, _, m in per_step] == [12, 10, 9, 8, 4, 2, 1, 0]
    assert finished is not None and finished.nfe == 8 and mask not in finished.token_ids


def test_registered_policy_in_a_mixed_batch_leaves_the_others_unchanged(half):
    llm = _llm()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    base = [SamplingParams(gen_length=16, block_length=8, seed=1),
            SamplingParams(gen_length=16, block_length=8, policy="threshold", seed=2)]
    alone = [llm.generate([p], s)[0].token_ids for p, s in zip(prompts, base, strict=True)]
    mixed = llm.generate(prompts + [[4, 4]], [*base, SamplingParams(gen_length=16, block_length=8, policy="half")])
    assert [o.token_ids for o in mixed[:2]] == alone and mixed[2].nfe == 8


def test_unknown_names_are_refused_with_the_same_messages():
    with pytest.raises(ValueError, match=r"^policy must be one of 'fixed', 'threshold', 'factor', 'eb'; got 'x'\.$"):
        SamplingParams(policy="x")
    with pytest.raises(ValueError, match=r"^revision must be one of 'remdm', 'wino', 'edit'; got 'x'\.$"):
        SamplingParams(revision="x")
    with pytest.raises(ValueError, match=r"^remasking must be one of low_confidence, random, origin, maskgit_plus, "
                                         r"topk_margin, entropy; got 'x'\.$"):
        SamplingParams(remasking="x")
    with pytest.raises(ValueError, match="^policy must be one of"):
        SamplingParams(policy=["fixed"])


def test_name_views_and_family_defaults():
    assert tuple(REMASKING) == ("low_confidence", "random", "origin", "maskgit_plus", "topk_margin", "entropy")
    assert tuple(POLICIES) == ("fixed", "threshold", "factor", "eb") and tuple(REVISIONS) == ("remdm", "wino", "edit")
    assert diffuse_engine.REMASKING == REMASKING and "entropy" in REMASKING and len(REMASKING) == 6
    assert [default_ordering(a) for a in ("llada", "sdar", "dream")] == ["low_confidence"] * 2 + ["maskgit_plus"]
    assert SamplingParams().resolved_remasking("dream") == "maskgit_plus"
    assert [o.name for o in ORDERINGS.values() if o.ranks_confidence] == [
        "low_confidence", "maskgit_plus", "topk_margin", "entropy"]


def _imports(path: pathlib.Path, runtime: bool = False) -> set[str]:
    """Every module ``path`` imports (relative imports resolved within diffuse_engine.policies); ``runtime``: leave
    out the blocks under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    if runtime:
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = ["diffuse_engine", "policies"][:max(0, 3 - node.level)] if node.level else []
            found.add(".".join(parts + ([node.module] if node.module else [])))
    return found


def test_policies_do_not_import_the_engine():
    for path in sorted(POLICIES_DIR.glob("*.py")):
        bad = {m for m in _imports(path) if m == "diffuse_engine.engine" or m.startswith("diffuse_engine.engine.")}
        assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("module", ["__init__.py", "registry.py", "ordering.py", "state.py"])
def test_registry_modules_are_light(module):
    """What SamplingParams imports of the policies needs no torch (the built-ins load when first looked up)."""
    assert not {m for m in _imports(POLICIES_DIR / module, runtime=True) if m.split(".")[0] == "torch"
                or m in ("diffuse_engine.policies.base", "diffuse_engine.ops", "diffuse_engine.kernels")}
