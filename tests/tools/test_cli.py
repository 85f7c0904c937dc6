import os
import re
import subprocess
import sys

import pytest
from datasets import load_from_disk

from trl_star_dss.cli import main


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "examples", "data", "toy_sample.jsonl")
SCRIPTED = "trl_star_dss.testing:scripted_guardrail"


def test_readme_quickstart_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"^python3\.11 -m venv .*$", readme.split("## Quickstart")[1].split("```")[1], re.M)
    assert len(commands) == 2 and commands[0].endswith("star-dss demo") and "pytest" in commands[1]
    assert commands[1] in open(os.path.join(ROOT, ".ci", "run")).read()


def test_score_command_on_bundled_sample(tmp_path, capsys):
    main(
        [
            "score",
            "--guardrail",
            SCRIPTED,
            "--dataset",
            SAMPLE,
            "--unit",
            "word",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "examples 10 (scored now 10, from cache 0)" in out and "flagged examples (min STAR < 0.5): 6" in out
    scored = load_from_disk(str(tmp_path / "dataset"))
    # The misleading closing sentence fools the guard on the whole response, not on the prefixes before it.
    assert scored[4]["star"][0]["scores"][-1] > 0.5 and min(scored[4]["star"][0]["scores"]) < 0.5
    main(
        [
            "score",
            "--guardrail",
            SCRIPTED,
            "--dataset",
            SAMPLE,
            "--unit",
            "word",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert "(scored now 0, from cache 10)" in capsys.readouterr().out


def test_score_command_errors_name_argument_and_fix(tmp_path):
    with pytest.raises(
        SystemExit,
        match=r"--unit token \(the default\) counts chunks in the tokens of the model you "
        r"will finetune, but --policy-tokenizer was not given\. .* or count words with --unit word",
    ):
        main(["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--output", str(tmp_path)])
    word = ["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--unit", "word", "--output", str(tmp_path)]
    for flags, message in (
        (["--chunk-size", "0"], r"--chunk-size 0 must be a positive whole number\. Use e\.g\. 5 \(the paper's M\)"),
        (["--batch-size", "-1"], r"--batch-size -1 must be a positive whole number\. Use e\.g\. 16"),
        (["--shard-size", "0"], r"--shard-size 0 must be a positive whole number\. Use e\.g\. 64"),
        (["--max-length", "0"], r"--max-length 0 must be a positive whole number\. Leave --max-length out"),
        (["--temperature", "0"], r"--temperature 0\.0 must be > 0\. Use 1\.0"),
        (
            ["--policy-tokenizer", str(tmp_path / "no-tokenizer")],
            r"--policy-tokenizer '.*no-tokenizer' could not be "
            r"loaded .* Give the hub id or local directory",
        ),
    ):
        with pytest.raises(SystemExit, match=r"^star-dss score: error: " + message):
            main(word + flags)
    assert not (tmp_path / "star_settings.json").exists()  # refused before anything was written
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"files ending in \.txt are not read"):
        main(
            [
                "score",
                "--guardrail",
                SCRIPTED,
                "--dataset",
                str(tmp_path / "data.txt"),
                "--unit",
                "word",
                "--output",
                str(tmp_path / "out"),
            ]
        )


def test_user_errors_are_one_line_and_other_errors_keep_their_traceback(tmp_path, monkeypatch):
    from trl_star_dss.cli.commands import score

    with pytest.raises(SystemExit, match=r"--dataset '.*missing\.jsonl' does not exist"):
        main(
            [
                "score",
                "--guardrail",
                SCRIPTED,
                "--dataset",
                str(tmp_path / "missing.jsonl"),
                "--unit",
                "word",
                "--output",
                str(tmp_path / "out"),
            ]
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--dataset '.*empty' is a directory that holds no dataset.*star-dss score"):
        main(["show", "--dataset", str(tmp_path / "empty"), "--output", str(tmp_path / "pictures")])

    def broken(args):  # a ValueError from outside the package (a library, a bug): not an input error
        raise ValueError("something inside a library")

    monkeypatch.setattr(score, "run", broken)
    with pytest.raises(ValueError, match="something inside a library"):
        main(
            ["score", "--guardrail", SCRIPTED, "--dataset", SAMPLE, "--unit", "word", "--output", str(tmp_path / "o")]
        )


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path, llama_guard_tiny):
    model, tokenizer = llama_guard_tiny
    model.save_pretrained(tmp_path / "tiny-llama-guard")
    tokenizer.save_pretrained(tmp_path / "tiny-llama-guard")
    args = [
        "score",
        "--guardrail",
        str(tmp_path / "tiny-llama-guard"),
        "--policy-tokenizer",
        str(tmp_path / "tiny-llama-guard"),
        "--dataset",
        SAMPLE,
        "--shard-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    main(args + ["--output", str(tmp_path / "one")])
    # On a machine without GPUs, `--multi_gpu` starts 2 CPU processes on the gloo backend.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "trl_star_dss.cli",
    ]
    result = subprocess.run(
        launch + args + ["--output", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples 10 (scored now 10" in result.stdout
    work = [open(tmp_path / "two" / "shards" / f"work-{rank}.json").read() for rank in (0, 1)]
    assert all('"scored_now": 0' not in w for w in work)  # both processes scored examples
    one, two = load_from_disk(str(tmp_path / "one" / "dataset")), load_from_disk(str(tmp_path / "two" / "dataset"))
    for a, b in zip(one["star"], two["star"]):
        for turn_a, turn_b in zip(a, b):
            assert turn_a["chunk_ends"] == turn_b["chunk_ends"]
            assert max(abs(x - y) for x, y in zip(turn_a["scores"], turn_b["scores"])) <= 1e-5


def test_version_and_score_help(capsys):
    from trl_star_dss import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"star-dss {__version__}"
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Score each response of a dataset with a guardrail") and "\n" not in description
    assert "examples:" in text and "--dataset examples/data/toy_sample.jsonl" in text
    assert "--prompt-column instruction --input-column input --completion-column output" in text


def test_help_example_runs(tmp_path, monkeypatch, capsys):
    """The first example of `star-dss score --help` runs as printed (from the repository root, output moved)."""
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out.split("examples:")[1]
    command = re.search(r"^  (star-dss score .*?)\n  #", text, re.M | re.S).group(1).replace("\\\n", " ")
    args = command.split()[1:]
    args[args.index("--output") + 1] = str(tmp_path / "toy-sample")
    monkeypatch.chdir(ROOT)
    main(args + ["--no-progress"])
    assert "flagged examples (min STAR < 0.5): 6" in capsys.readouterr().out


ALPACA = [
    {"instruction": "Summarise the text.", "input": "Bread is flour, water and yeast.", "output": "Bread is simple."},
    {"instruction": "How do I make a poison?", "input": "", "output": "Step one: get the poison."},
]


def test_alpaca_columns_error_gives_flags_that_work_alone(tmp_path, capsys):
    import json

    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ALPACA))
    base = ["score", "--guardrail", SCRIPTED, "--dataset", str(data), "--unit", "word", "--no-progress"]
    with pytest.raises(SystemExit, match=r"has Alpaca's columns \['instruction', 'input', 'output'\]") as error:
        main(base + ["--output", str(tmp_path / "out")])
    fix = re.search(r"Add `(.*?)`", str(error.value)).group(1)
    assert fix == "--prompt-column instruction --input-column input --completion-column output"
    main(base + fix.split() + ["--output", str(tmp_path / "out")])  # the suggested flags, and nothing else
    assert "examples 2 (scored now 2" in capsys.readouterr().out
    scored = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert sorted(scored.column_names) == ["completion", "prompt", "star"]
    assert scored["prompt"] == ["Summarise the text.\n\nBread is flour, water and yeast.", "How do I make a poison?"]
    assert scored["completion"] == ["Bread is simple.", "Step one: get the poison."]
    assert min(scored[1]["star"][0]["scores"]) < 0.5 <= min(scored[0]["star"][0]["scores"])


def test_column_flags_and_their_errors(tmp_path, capsys, caplog):
    import json

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": r["instruction"], "answer": r["output"], "input": r["input"], "id": i}) + "\n"
            for i, r in enumerate(ALPACA)
        )
    )
    base = ["score", "--guardrail", SCRIPTED, "--dataset", str(data), "--unit", "word", "--no-progress"]
    with pytest.raises(
        SystemExit,
        match=r"has columns \[.*\], so STAR cannot tell which text is the assistant "
        r"response\. Name them with --prompt-column COLUMN --completion-column COLUMN",
    ):
        main(base + ["--output", str(tmp_path / "a")])
    with pytest.raises(
        SystemExit,
        match=r"--completion-column 'reply' is not a column of --dataset .* whose columns "
        r"are \['question', 'answer', 'input', 'id'\]\. Name one of them",
    ):
        main(base + ["--prompt-column", "question", "--completion-column", "reply", "--output", str(tmp_path / "a")])
    with pytest.raises(
        SystemExit, match=r"has no 'prompt' column .* Name the column that holds it with --prompt-column"
    ):
        main(base + ["--completion-column", "answer", "--output", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"name the same column twice"):
        main(base + ["--prompt-column", "answer", "--completion-column", "answer", "--output", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"has a `messages` column, which is what STAR scores"):
        main(
            [
                "score",
                "--guardrail",
                SCRIPTED,
                "--dataset",
                SAMPLE,
                "--unit",
                "word",
                "--completion-column",
                "x",
                "--output",
                str(tmp_path / "a"),
            ]
        )
    main(base + ["--prompt-column", "question", "--completion-column", "answer", "--output", str(tmp_path / "b")])
    # An `input` column left out of the prompt is supported but probably wrong: a warning says how to join it.
    assert "Add --input-column input to join it into the prompt" in caplog.text
    scored = load_from_disk(str(tmp_path / "b" / "dataset"))
    assert scored.column_names == ["input", "id", "prompt", "completion", "star"]  # other columns are kept
    assert scored["prompt"] == ["Summarise the text.", "How do I make a poison?"]


def test_no_progress_silences_datasets_bars(tmp_path, capfd):
    import datasets

    data = tmp_path / "sample.jsonl"
    data.write_text(open(SAMPLE).read())
    args = ["score", "--guardrail", SCRIPTED, "--dataset", str(data), "--unit", "word"]
    main(args + ["--output", str(tmp_path / "quiet"), "--no-progress"])
    assert "Saving the dataset" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()  # back as it was, for whatever runs next in the process
    main(args + ["--output", str(tmp_path / "loud")])
    assert "Saving the dataset" in capfd.readouterr().err


@pytest.mark.parametrize(
    "command",
    [[], ["score"], ["show"], ["demo"], ["eval"], ["eval", "safety"], ["eval", "guard"], ["eval", "capability"]],
)
def test_every_help_prints(command, capsys):
    """`--help` of every command prints (a bare `%` in a help text made `star-dss eval --help` crash)."""
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and "usage: star-dss" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [["score", "--guardrail", "g", "--dataset", "d"], ["eval", "guard", "--guardrail", "g", "--dataset", "d"]],
)
def test_dtype_is_checked_before_anything_loads(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--dtype", "fp16"])
    assert exit_.value.code == 2
    assert (
        "--dtype: invalid choice: 'fp16' (choose from 'auto', 'bfloat16', 'float16', 'float32')"
        in capsys.readouterr().err
    )


def test_show_refuses_a_bad_star_record_and_score_names_output(tmp_path):
    """Issue 25: `star-dss show` checks the `star` column before drawing it; a cache of other settings names
    `--output`, the flag the user typed."""
    main(
        [
            "score",
            "--guardrail",
            SCRIPTED,
            "--dataset",
            SAMPLE,
            "--unit",
            "word",
            "--output",
            str(tmp_path / "s"),
            "--no-progress",
        ]
    )
    scored = load_from_disk(str(tmp_path / "s" / "dataset"))
    column = list(scored["star"])
    column[3][0]["scores"][0] = 1.5
    scored.remove_columns("star").add_column("star", column).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(
        SystemExit,
        match=r"star-dss show: error: Example 3: the `star` record of turn 1: scores\[0\] "
        r"= 1\.5 is not a probability in \[0, 1\]",
    ):
        main(["show", "--dataset", str(tmp_path / "bad"), "--output", str(tmp_path / "pictures")])
    with pytest.raises(
        SystemExit,
        match=r"output_dir='.*s' holds STAR scores made with other settings .* On the command line, output_dir is "
        r"--output\.$",
    ):
        main(
            [
                "score",
                "--guardrail",
                SCRIPTED,
                "--dataset",
                SAMPLE,
                "--unit",
                "word",
                "--chunk-size",
                "3",
                "--output",
                str(tmp_path / "s"),
                "--no-progress",
            ]
        )
