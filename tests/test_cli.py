"""The ``diffuse-engine`` command line: generate (JSON, plain, live view, errors), info, presets, init-random."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.engine import StepOutput
from diffuse_engine.entrypoints.cli import main
from diffuse_engine.entrypoints.cli_view import LiveView, printable
from diffuse_engine.presets import PRESETS

GEN = ["--gen-length", "16", "--block-length", "8", "--steps", "8", "--seed", "5", "--device", "cpu"]
PARAMS = SamplingParams(gen_length=16, block_length=8, steps=8, seed=5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model runs fastest on one thread, and stays fast when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("cli") / "m", "llada-tiny", seed=0)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model_dir, device="cpu")


def generate(model_dir: Path, *extra: str, prompt: str = "Hello") -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", prompt, *GEN, *extra]


def test_generate_json_matches_llm(model_dir, llm, capsys):
    assert main(generate(model_dir, "--json")) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)  # the whole of stdout is one JSON object
    expected = llm.generate("Hello", PARAMS)[0]
    assert record["token_ids"] == expected.token_ids
    assert record["text"] == expected.text
    assert record["prompt"] == "Hello" and record["prompt_token_ids"] == llm.tokenizer.encode("Hello")
    assert record["nfe"] == expected.nfe == 8 and record["seed"] == 5
    assert record["tokens_per_forward"] == pytest.approx(expected.tokens_per_forward)
    assert record["finish_reason"] == expected.finish_reason and record["seconds"] > 0
    assert record["params"] == dataclasses.asdict(PARAMS)
    assert record["model"] == {"path": str(model_dir.resolve()), "arch": "llada"}
    assert record["device"] == "cpu" and record["dtype"] == "float32"
    assert "\x1b" not in out and err == ""


def test_chat_matches_llm_chat(model_dir, llm, capsys):
    assert main(generate(model_dir, "--json", "--chat", prompt="Hi there")) == 0
    record = json.loads(capsys.readouterr().out)
    expected = llm.chat([{"role": "user", "content": "Hi there"}], PARAMS)[0]
    assert record["prompt"] == "Hi there"
    assert record["prompt_token_ids"] == expected.prompt_token_ids
    assert record["token_ids"] == expected.token_ids


def test_plain_run_prints_only_the_text(model_dir, llm, capsys):
    assert main(generate(model_dir)) == 0
    out, err = capsys.readouterr()
    assert out == llm.generate("Hello", PARAMS)[0].text + "\n"
    assert "\x1b" not in out + err
    assert "NFE 8" in err and "tokens/forward" in err and "tokens/s" in err


def test_live_view_renders_into_the_stream(model_dir, llm, capsys):
    assert main(generate(model_dir, "--live")) == 0
    out, _ = capsys.readouterr()
    text = llm.generate("Hello", PARAMS)[0].text
    assert "\x1b[?25l" in out and "\x1b[?25h" in out  # cursor hidden while drawing, shown again
    assert "F\x1b[J" in out  # in-place redraw: cursor up over the previous frame, erase below
    assert "░" in out and "NFE 1/8" in out and "block 1/2" in out
    tail = out.rsplit("\x1b[?25h", 1)[1]  # after the view is closed: the answer, then the summary
    assert tail.startswith(printable(text, "\n") + "\n") and "NFE 8" in tail
    assert main(generate(model_dir, "--live", "--json")) == 0  # --json wins: no ANSI
    out = capsys.readouterr().out
    assert "\x1b" not in out and json.loads(out)["text"] == text


class _CharTokenizer:
    special_ids = frozenset({2})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join({1: "\n", 2: "<eos>"}.get(i, chr(ord("a") + i)) for i in ids)


def test_live_view_frame():
    stream = io.StringIO()
    view = LiveView(stream, _CharTokenizer(), steps=4, steps_per_block=2, num_blocks=2, block_length=4, mask_id=9,
                    width=80, height=20, max_fps=0, color=True)
    view.update([StepOutput("r", 0, 0, [(0, 3), (1, 1)], [3, 1, 9, 9, 9, 9, 9, 9], False)])
    view.update([StepOutput("r", 3, 1, [(7, 2)], [3, 1, 4, 5, 2, 2, 2, 2], True)])
    view.close()
    frames = stream.getvalue()
    first, last = view.render(StepOutput("r", 0, 0, [(0, 3), (1, 1)], [3, 1, 9, 9, 9, 9, 9, 9], False), 0.1), \
        view.render(StepOutput("r", 3, 1, [(7, 2)], [3, 1, 4, 5, 2, 2, 2, 2], True), 0.2)
    assert "step 1/2" in first[0] and "block 1/2" in first[0] and "NFE 1/4" in first[0] and "2/8 tokens" in first[0]
    assert "\x1b[30;102md⏎" in first[1]  # committed this step: highlighted, newline drawn as ⏎
    assert "░░" in first[1] and "····" in first[1]  # current block masked vs later blocks
    assert "<eos>×3" in last[1] and "\x1b[30;102m<eos>" in last[1] and "done" in last[0]
    assert frames.count("\x1b[2F\x1b[J") == 2  # second frame and close both go up over the 2-line frame
    plain = LiveView(io.StringIO(), None, steps=1, steps_per_block=1, num_blocks=1, block_length=2, mask_id=9,
                     color=False)
    assert plain.render(StepOutput("r", 0, 0, [(0, 42)], [42, 9], False), 0.0)[1] == "42 ░"
    tall = LiveView(io.StringIO(), None, steps=4, steps_per_block=1, num_blocks=4, block_length=100, mask_id=9,
                    width=101, height=6, color=False)  # 100 columns: 3 lines per block of "42 " * 100
    frame = tall.render(StepOutput("r", 2, 2, [], [42] * 300 + [9] * 100, False), 0.0)
    assert len(frame) == 5 and "lines 7-10 of 10" in frame[0]  # clipped to the terminal, showing the current block
    assert frame[-1] == "░" * 100


@pytest.mark.parametrize("flags, field", [(["--steps", "0"], "steps"), (["--steps", "32"], "steps"),
                                          (["--block-length", "5"], "block_length"), (["--top-p", "2"], "top_p")])
def test_invalid_sampling_params_exit_2(model_dir, capsys, flags, field):
    assert main(generate(model_dir, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffuse-engine: error: invalid sampling parameters:") and field in err
    assert "Traceback" not in err


def test_bad_arguments_exit_2(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffuse-engine: error:") and "absent" in err and "does not exist" in err
    assert main(generate(model_dir, "--steps", "many")) == 2
    assert "diffuse-engine: error: argument --steps" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1,2", "--chat"]) == 2
    assert "--chat" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err
    assert main(["--version"]) == 0 and "diffuse-engine" in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"torch", "triton", "cuda", "flash-attn"} <= set(info["backends"])
    assert info["backends"]["torch"]["available"] is True
    assert all(isinstance(b["available"], bool) and b["reason"] for b in info["backends"].values())
    assert info["torch"] and info["python"] and isinstance(info["cuda"]["available"], bool)
    assert info["cuda"]["available"] or info["cuda"]["reason"]
    assert main(["info"]) == 0 and "flash-attn" in capsys.readouterr().out


def test_presets(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(PRESETS)
    assert rows["llada-8b"]["parameters"] == PRESETS["llada-8b"].config.num_parameters()
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "llada-tiny" in text and "8.0B" in text


def test_init_random_then_generate(tmp_path, capsys):
    out = tmp_path / "dream"
    assert main(["init-random", "--preset", "dream-tiny", "--out", str(out), "--seed", "1",
                 "--shard-size", "100000"]) == 0
    assert "dream-tiny" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert main(["generate", "--model", str(out), "--prompt-ids", "65,66,67", "--json", *GEN]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"]["arch"] == "dream" and record["prompt_token_ids"] == [65, 66, 67]
    assert len(record["token_ids"]) == 16
    assert main(["init-random", "--preset", "dream-tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["init-random", "--preset", "gpt-5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_installed_script(model_dir, llm):
    script = shutil.which("diffuse-engine", path=str(Path(sys.executable).parent)) or shutil.which("diffuse-engine")
    if script is None:
        pytest.skip("the diffuse-engine console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSE_BACKEND"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([script, *generate(model_dir)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == llm.generate("Hello", PARAMS)[0].text + "\n"  # not a TTY: the text only, no ANSI
    assert "NFE 8" in run.stderr and "\x1b" not in run.stdout + run.stderr


@pytest.mark.parametrize("typed, prompt", [("Hello\n", "Hello"), ("Hello\r\n", "Hello"), ("Hello", "Hello"),
                                           ("Hello\n\n", "Hello\n"), ("two\nlines\n", "two\nlines")])
def test_prompt_from_stdin_drops_one_trailing_newline(typed, prompt):
    from diffuse_engine.entrypoints.cli import read_stdin_prompt

    assert read_stdin_prompt(io.StringIO(typed)) == prompt


def test_generate_reads_stdin(model_dir, llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # as `echo Hello | diffuse-engine generate --prompt -`
    assert main(generate(model_dir, "--json", prompt="-")) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "Hello" and record["prompt_token_ids"] == llm.tokenizer.encode("Hello")


def test_json_reports_the_shipped_models_folder(capsys, tmp_path, monkeypatch):
    from diffuse_engine.quality.zoo import ZOO_DIR

    monkeypatch.chdir(tmp_path)  # a name, not a path: resolved to the shipped folder, not to ./addition
    assert main(["generate", "--model", "addition", "--prompt", "04821+00379=", "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    path = Path(record["model"]["path"])
    assert path.is_absolute() and path.is_dir() and path == (ZOO_DIR / "addition").resolve()
    assert (path / "config.json").is_file() and record["text"].endswith("5200")


def test_eval_progress_on_stderr_and_quiet(capsys):
    args = ["eval", "--model", "addition", "--task", "addition", "--limit", "20", "--device", "cpu", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert record["n"] == 20 and Path(record["model"]).is_dir()
    lines = err.splitlines()  # not a terminal: a line per further 10%, the last one at the end
    assert lines and lines[-1].startswith("eval: 20/20 examples, ") and lines[-1].endswith(" s")
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_line_on_a_terminal():
    from diffuse_engine.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = Progress("eval", "examples", stream)
    for done in (1, 2, 3):
        progress(done, 3)
    progress.close()
    text = stream.getvalue()  # a tqdm bar redrawn in place, erased at the end
    assert "\r" in text and "eval: " in text and "3/3" in text and "\n" not in text.rstrip("\n")
    stream = io.StringIO()
    progress = Progress("sweep", "settings", stream)
    for done in range(1, 101):
        progress(done, 100)
    assert len(stream.getvalue().splitlines()) == 10  # not a terminal: every 10%


def test_progress_over_an_iterable_and_disabled(monkeypatch):
    from diffuse_engine import progress as p

    monkeypatch.setenv("DIFFUSE_PROGRESS", "0")
    assert not p.enabled() and p.enabled(True)
    assert list(p.progress(range(5), desc="x")) == list(range(5))
    monkeypatch.setenv("DIFFUSE_PROGRESS", "1")
    assert p.enabled() and not p.enabled(False)
    stream = io.StringIO()
    bar = p.progress(desc="bench", unit="rows", total=4, show=True)
    bar.stream = stream
    for i in range(4):
        bar.set_postfix_str(f"row {i + 1}")
        bar.update()
    bar.message("a note")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[-2].startswith("bench: 4/4 rows, ") and lines[-2].endswith(" row 4") and lines[-1] == "a note"


def test_sweep_writes_under_the_working_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--model", "addition", "--task", "addition", "--limit", "4", "--policies", "low_confidence",
            "--steps", "6", "--block-lengths", "6", "--device", "cpu", "--no-plot", "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    (folder,) = (tmp_path / "diffuse-results").iterdir()
    assert folder.name.startswith("sweep-") and (folder / "addition_addition.csv").is_file()
    assert (folder / "addition_addition.csv").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sweep_without_matplotlib_fails_before_running(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr("diffuse_engine.entrypoints.llm.LLM.__init__",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["sweep", "--model", "addition", "--task", "addition", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "--no-plot" in err and "pip install" in err
    assert not any(tmp_path.iterdir())
