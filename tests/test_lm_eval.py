"""The lm-evaluation-harness model ``diffuse-engine`` (skipped without lm-eval): the shipped tasks through
``lm_eval.simple_evaluate`` score what ``diffuse-engine eval`` scores on the same examples; the loglikelihood
ranking of held-out text continuations is well above chance; the Monte-Carlo bound is exact where it must be (one
masked token); ``diffuse-engine lm-eval`` runs lm-eval's command line offline; bad ``model_args`` name the key."""

from __future__ import annotations

import math

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from diffuse_engine import LLM, SamplingParams  # noqa: E402
from diffuse_engine.entrypoints.cli import main  # noqa: E402
from diffuse_engine.integrations.lm_eval import TASKS_DIR, DiffuseEngineLM  # noqa: E402
from diffuse_engine.models import build_model  # noqa: E402
from diffuse_engine.presets import from_name  # noqa: E402
from diffuse_engine.quality.evaluate import evaluate_task  # noqa: E402
from diffuse_engine.quality.likelihood import continuation_loglikelihood  # noqa: E402
from diffuse_engine.quality.tasks import get_task  # noqa: E402


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR))


def _score(results: dict, task: str, metric: str) -> float:
    return results["results"][task][f"{metric},none"]


@pytest.mark.parametrize("name, limit", [("addition", 50), ("sudoku4x4", 20)])
def test_generate_tasks_score_what_eval_scores(tasks, name, limit):
    lm = DiffuseEngineLM(pretrained=name, device="cpu")
    results = lm_eval.simple_evaluate(model=lm, tasks=[f"diffuse_{name}"], limit=limit, task_manager=tasks)
    harness = _score(results, f"diffuse_{name}", "exact_match")
    ours = evaluate_task(LLM(name, device="cpu"), get_task(name), limit=limit).accuracy
    assert harness == pytest.approx(ours) and harness >= 0.9


def test_registered_name_and_model_args_through_simple_evaluate(tasks):
    results = lm_eval.simple_evaluate(model="diffuse-engine", model_args="pretrained=addition,policy=threshold,"
                                      "threshold=0.9", tasks=["diffuse_addition"], limit=20, task_manager=tasks,
                                      device="cpu")
    assert _score(results, "diffuse_addition", "exact_match") >= 0.95


def test_loglikelihood_ranks_the_true_continuation_well_above_chance(tasks):
    lm = DiffuseEngineLM(pretrained="text-char", device="cpu", mc_num=16, batch_size=16, check_greedy=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["diffuse_text_choice"], limit=24, task_manager=tasks)
    assert _score(results, "diffuse_text_choice", "acc") >= 0.45  # chance: 0.25


@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
def test_one_masked_token_bound_is_the_exact_conditional(preset):
    """With one continuation token every sample masks exactly it, with weight 1: the estimate is log p(c | prefix,
    [MASK] at c) exactly (row i - 1 for Dream's shifted logits)."""
    model = build_model(from_name(preset).config, dtype=torch.float64).init_random_(3).eval()
    prefix, token = [5, 17, 99, 3], 42
    got = continuation_loglikelihood(model, prefix, [token], mc_num=8, batch_size=4, seed=1)
    with torch.no_grad():
        logits = model(torch.tensor([prefix + [model.config.mask_token_id]]))[0].double()
    row = len(prefix) - 1 if model.config.shifted_logits else len(prefix)
    assert got == pytest.approx(float(F.log_softmax(logits[row], -1)[token]), rel=0, abs=1e-9)


def test_monte_carlo_bound_is_deterministic_and_below_zero():
    model = build_model(from_name("llada-tiny").config, dtype=torch.float64).init_random_(0).eval()
    args = (model, [1, 2, 3], [7, 8, 9, 10])
    a = continuation_loglikelihood(*args, mc_num=16, batch_size=8, seed=5)
    assert a == continuation_loglikelihood(*args, mc_num=16, batch_size=8, seed=5) and a < 0
    with pytest.raises(ValueError, match="multiple of batch_size"):
        continuation_loglikelihood(*args, mc_num=10, batch_size=4)


def test_generate_until_maps_until_and_max_gen_toks():
    lm = DiffuseEngineLM(pretrained="addition", device="cpu", block_length=4)
    reqs = [Instance("generate_until", {}, ("04821+00379=", {"until": ["2"], "max_gen_toks": 6}), 0),
            Instance("generate_until", {}, ("04821+00379=", {"until": "\n\n", "max_gen_toks": 6}), 1)]
    params, _ = lm._gen_params(reqs[0].args[1])
    assert (params.gen_length, params.block_length, params.steps, list(params.stop)) == (8, 4, 8, ["2"])
    first, second = lm.generate_until(reqs)
    assert first == second.split("2", 1)[0] and "2" not in first


def test_two_tensor_parallel_ranks_answer_as_one_process():
    """model_args tensor_parallel_size=2: the same generations, and the same Monte-Carlo bounds (fp64 masks and
    forwards on the same seeds, logits gathered from the vocabulary slices), as one process."""
    reqs = [Instance("generate_until", {}, ("04821+00379=", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    ll = [Instance("loglikelihood", {}, ("04821+00379=", "005200"), 0)]
    one = DiffuseEngineLM(pretrained="addition", device="cpu", dtype="float64", mc_num=4, batch_size=4)
    two = DiffuseEngineLM.create_from_arg_string(
        "pretrained=addition,dtype=float64,mc_num=4,batch_size=4,tensor_parallel_size=2", {"device": "cpu"})
    try:
        assert two.generate_until(reqs) == one.generate_until(reqs) == ["005200"]
        (a, greedy_a), (b, greedy_b) = one.loglikelihood(ll)[0], two.loglikelihood(ll)[0]
        assert greedy_a is greedy_b is True and a == pytest.approx(b, rel=1e-9)
    finally:
        two.llm.close()


def test_loglikelihood_requests_and_rolling():
    lm = DiffuseEngineLM(pretrained="addition", device="cpu", mc_num=8, batch_size=8)
    right, wrong = lm.loglikelihood([Instance("loglikelihood", {}, ("04821+00379=", "005200"), 0),
                                     Instance("loglikelihood", {}, ("04821+00379=", "999999"), 1)])
    assert right[0] > wrong[0] and right[1] is True and wrong[1] is False
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("04821+00379=005200",), 0)])
    assert math.isfinite(rolling) and rolling < 0


def test_block_diffusion_models_refuse_loglikelihood(tmp_path):
    from diffuse_engine.checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "sdar", "sdar-tiny")
    lm = DiffuseEngineLM(pretrained=str(folder), device="cpu", block_length=4, steps=4, gen_length=8)
    with pytest.raises(NotImplementedError, match="full-attention model"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("ab", "cd"), 0)])


def test_lm_eval_command_runs_offline(capsys):
    code = main(["lm-eval", "--model", "diffuse-engine", "--model_args", "pretrained=addition", "--tasks",
                 "diffuse_addition", "--include_path", str(TASKS_DIR), "--limit", "30", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if "diffuse_addition" in line and "exact_match" in line)
    assert float(row.split("|")[7]) >= 0.97


@pytest.mark.parametrize("model_args, key", [
    ("pretrained=addition,bogus=1", "bogus"),
    ("pretrained=addition,threshold=7", "threshold"),
    ("pretrained=addition,policy=nope", "policy"),
    ("pretrained=addition,mc_num=0", "mc_num"),
    ("pretrained=addition,steps=0", "steps"),
    ("pretrained=addition,block_length=4,steps=3,gen_length=8", "steps"),
    ("steps=4", "pretrained"),
    ("pretrained=addition,tensor_parallel_size=0", "tensor_parallel_size"),
    ("pretrained=addition,tensor_parallel_size=3", "tensor_parallel_size"),
])
def test_bad_model_args_raise_naming_the_key(model_args, key):
    with pytest.raises(ValueError, match=key):
        DiffuseEngineLM.create_from_arg_string(model_args, {"device": "cpu"})


def test_bad_model_args_on_the_command_line_give_one_line(capsys):
    code = main(["lm-eval", "--model", "diffuse-engine", "--model_args", "pretrained=addition,bogus=1", "--tasks",
                 "diffuse_addition", "--include_path", str(TASKS_DIR), "--limit", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("diffuse-engine: error: model_args: unknown key 'bogus'")


def test_sampling_params_of_model_args_follow_the_folder_defaults():
    lm = DiffuseEngineLM(pretrained="addition", device="cpu", cache="dual", threshold=0.8, policy="threshold")
    p = lm._params({"gen_length": 6})
    assert isinstance(p, SamplingParams) and (p.cache, p.policy, p.threshold, p.gen_length) == ("dual", "threshold",
                                                                                                 0.8, 6)


def test_chat_template_for_apply_chat_template():
    lm = DiffuseEngineLM(pretrained="addition", device="cpu")
    history = [{"role": "user", "content": "04821+00379="}]
    rendered = lm.apply_chat_template(history)
    assert rendered == lm.llm.tokenizer.apply_chat_template(history) and "04821+00379=" in rendered
    assert lm.chat_template(True) == lm.llm.tokenizer.chat_template and lm.tokenizer_name == "addition"
