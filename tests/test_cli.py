import os
import re
import subprocess
import sys

import pytest
from datasets import load_from_disk

from trl_star_dss.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "data", "toy_sample.jsonl")
SCRIPTED = "trl_star_dss.testing:scripted_guardrail"


def test_readme_quickstart_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"^python3\.11 -m venv .*$", readme.split("## Quickstart")[1].split("```")[1], re.M)
    assert len(commands) == 2 and commands[0].endswith("star-dss demo") and "pytest" in commands[1]
    assert commands[1] in open(os.path.join(ROOT, ".ci", "run")).read()


def test_score_command_on_bundled_sample(tmp_path, capsys):
    main(["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--unit", "word", "--output", str(tmp_path),
          "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert "examples 10 (scored now 10, from cache 0)" in out and "flagged examples (min STAR < 0.5): 6" in out
    scored = load_from_disk(str(tmp_path / "dataset"))
    # The misleading closing sentence fools the guard on the whole response, not on the prefixes before it.
    assert scored[4]["star"][0]["scores"][-1] > 0.5 and min(scored[4]["star"][0]["scores"]) < 0.5
    main(["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--unit", "word", "--output", str(tmp_path),
          "--no-progress"])  # fmt: skip
    assert "(scored now 0, from cache 10)" in capsys.readouterr().out


def test_score_command_errors_name_argument_and_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"unit='token' cuts chunks with the policy tokenizer, but none was given"):
        main(["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"chunk_size=0 must be a positive whole number"):
        main(["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--unit", "word", "--chunk-size", "0",
              "--output", str(tmp_path)])  # fmt: skip
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"files ending in \.txt are not read"):
        main(["score", "--guardrail", SCRIPTED, "--dataset", str(tmp_path / "data.txt"), "--unit", "word",
              "--output", str(tmp_path / "out")])  # fmt: skip


def test_user_errors_are_one_line_and_other_errors_keep_their_traceback(tmp_path, monkeypatch):
    import trl_star_dss.cli as cli

    with pytest.raises(SystemExit, match=r"--dataset '.*missing\.jsonl' does not exist"):
        main(["score", "--guardrail", SCRIPTED, "--dataset", str(tmp_path / "missing.jsonl"), "--unit", "word",
              "--output", str(tmp_path / "out")])  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--dataset '.*empty' is a directory that holds no dataset.*star-dss score"):
        main(["show", "--dataset", str(tmp_path / "empty"), "--output", str(tmp_path / "pictures")])

    def broken(args):  # a ValueError from outside the package (a library, a bug): not an input error
        raise ValueError("something inside a library")

    monkeypatch.setattr(cli, "score_command", broken)
    with pytest.raises(ValueError, match="something inside a library"):
        main(["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--output", str(tmp_path / "out2")])


def test_two_processes_give_the_one_process_result(tmp_path, llama_guard_tiny):
    model, tokenizer = llama_guard_tiny
    model.save_pretrained(tmp_path / "tiny-llama-guard")
    tokenizer.save_pretrained(tmp_path / "tiny-llama-guard")
    args = ["score", "--guardrail", str(tmp_path / "tiny-llama-guard"), "--policy-tokenizer",
            str(tmp_path / "tiny-llama-guard"), "--dataset", SAMPLE, "--shard-size", "2", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    main(args + ["--output", str(tmp_path / "one")])
    # On a machine without GPUs, `--multi_gpu` starts 2 CPU processes on the gloo backend.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trl_star_dss.cli"]  # fmt: skip
    result = subprocess.run(launch + args + ["--output", str(tmp_path / "two")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples 10 (scored now 10" in result.stdout
    work = [open(tmp_path / "two" / "shards" / f"work-{rank}.json").read() for rank in (0, 1)]
    assert all('"scored_now": 0' not in w for w in work)  # both processes scored examples
    one, two = load_from_disk(str(tmp_path / "one" / "dataset")), load_from_disk(str(tmp_path / "two" / "dataset"))
    for a, b in zip(one["star"], two["star"]):
        for turn_a, turn_b in zip(a, b):
            assert turn_a["chunk_ends"] == turn_b["chunk_ends"]
            assert max(abs(x - y) for x, y in zip(turn_a["scores"], turn_b["scores"])) <= 1e-5
