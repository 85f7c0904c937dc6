"""The command line's flags: each command's parser, the flags that set a STAR setting (read from `STARArguments`),
the table of rules between flags, and how a library error names the flag the user typed."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from trl_star_dss import choices
from trl_star_dss.arguments import STARArguments
from trl_star_dss.cli import main
from trl_star_dss.cli.main import build_parser
from trl_star_dss.cli.options import setting
from trl_star_dss.cli.rules import Rule, check, positive
from trl_star_dss.errors import STARDSSError


SCRIPTED = "trl_star_dss.testing:scripted_guardrail"
COMMANDS = (["score"], ["show"], ["demo"], ["eval", "safety"], ["eval", "guard"], ["eval", "capability"])
# Each flag that sets a STAR setting, and that setting (the scoring commands take the same ones).
SETTINGS = {
    "--chunk-size": "star_chunk_size",
    "--unit": "star_unit",
    "--temperature": "guardrail_temperature",
    "--family": "guardrail_family",
}


def _parser(parser: argparse.ArgumentParser, command: list[str]) -> argparse.ArgumentParser:
    for name in command:
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = subparsers.choices[name]
    return parser


def _options(command: list[str]) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in _parser(build_parser(), command)._actions if a.option_strings}


@pytest.mark.parametrize("command", [["score"], ["eval", "guard"]])
def test_flags_that_set_a_setting_take_its_default_values_and_help(command):
    options = _options(command)
    fields = {f.name: f for f in dataclasses.fields(STARArguments)}
    for flag, name in SETTINGS.items():
        assert options[flag].default == fields[name].default, flag
        if flag != "--family":  # the command line says what it reads of the families (options.py)
            assert options[flag].help.startswith(fields[name].metadata["help"]), flag
        assert f"Setting `{name}`" in options[flag].help
    assert tuple(options["--unit"].choices) == choices.UNITS
    assert tuple(options["--family"].choices) == choices.FAMILIES
    assert tuple(options["--dtype"].choices) == choices.DTYPES
    if command == ["score"]:
        assert tuple(options["--controversial"].choices) == choices.CONTROVERSIAL
        assert tuple(options["--method"].choices) == choices.SCORING_METHODS


def test_a_changed_setting_reaches_the_flags_with_no_other_edit(monkeypatch, capsys):
    """The flags read `STARArguments` when the parser is built: a new default shows in the help and is parsed."""
    import trl_star_dss.cli.options as options

    changed = dataclasses.make_dataclass(
        "ChangedArguments",
        [
            ("star_chunk_size", int, dataclasses.field(default=7, metadata={"help": "M, changed."})),
            ("guardrail_temperature", float, dataclasses.field(default=0.5, metadata={"help": "T, changed."})),
        ],
        bases=(STARArguments,),
    )
    monkeypatch.setattr(options, "STARArguments", changed)
    args = build_parser().parse_args(["score", "--guardrail", "g", "--dataset", "d", "--output", "o"])
    assert (args.chunk_size, args.temperature) == (7, 0.5)
    with pytest.raises(SystemExit):
        main(["eval", "guard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "M, changed. Setting `star_chunk_size`, default 7." in text
    assert "T, changed. Setting `guardrail_temperature`, default 0.5." in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_says_what_it_does(command):
    for flag, action in _options(command).items():
        assert action.help and action.help.strip(), (command, flag)


def test_demo_constants_are_the_demos_own():
    """`star-dss demo --help` reads the demo's values from `choices`; the demo reads the same objects."""
    from trl_star_dss import demo

    assert demo.DEMO_TIME is choices.DEMO_TIME and demo.GUARDS is choices.DEMO_GUARDS
    assert tuple(_options(["demo"])["--guard"].choices) == choices.DEMO_GUARDS
    assert choices.DEMO_TIME in _parser(build_parser(), ["demo"]).description


RULES = (
    Rule("max_steps", "requires", ("policy", "smollm2"), "{flag} {value} is for --policy smollm2."),
    Rule("seeds", "excludes", "chunk_sizes", "{flag} is for the table, not an ablation."),
    positive("seeds", "Use e.g. 5."),
)
FLAGS = {"max_steps": "--max-steps", "seeds": "--seeds", "chunk_sizes": "--chunk-sizes", "policy": "--policy"}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_steps": 3, "policy": "toy"}, r"^--max-steps 3 is for --policy smollm2\.$"),
        ({"seeds": 2, "chunk_sizes": [1, 5]}, r"^--seeds is for the table, not an ablation\.$"),
        ({"seeds": 0}, r"^--seeds 0 must be a positive whole number\. Use e\.g\. 5\.$"),
    ],
)
def test_the_first_broken_rule_is_reported_with_the_flag_as_typed(values, message):
    args = argparse.Namespace(**({"max_steps": None, "policy": "toy", "seeds": None, "chunk_sizes": None} | values))
    with pytest.raises(STARDSSError, match=message):
        check(args, RULES, FLAGS)


def test_rules_that_hold_raise_nothing():
    for values in ({"max_steps": 3, "policy": "smollm2"}, {"seeds": 5}, {"chunk_sizes": [1]}, {}):
        args = argparse.Namespace(
            **({"max_steps": None, "policy": "toy", "seeds": None, "chunk_sizes": None} | values)
        )
        check(args, RULES, FLAGS)


def test_library_errors_say_which_flag_sets_the_argument_they_name(tmp_path):
    """The library names its arguments as a Python caller sets them (`output_dir=`, `resume=True`); the command line
    adds which of its flags set them, and leaves the library's sentence as it is."""
    data = tmp_path / "labelled.jsonl"
    row = {"prompt": "Bake bread?", "completion": "Mix flour and water.", "label": "safe"}
    data.write_text(json.dumps(row) + "\n")
    command = ["eval", "guard", "--guardrail", SCRIPTED, "--dataset", str(data), "--unit", "word", "--no-progress"]
    main(command + ["--output", str(tmp_path / "out")])
    with pytest.raises(
        SystemExit,
        match=r"^star-dss eval guard: error: output_dir='.*out' holds an earlier guard evaluation\. Pass resume=True to "
        r"continue it .* On the command line, output_dir is --output and resume=True is --resume\.$",
    ):
        main(command + ["--output", str(tmp_path / "out")])
    main(command + ["--output", str(tmp_path / "out"), "--resume"])  # the flag the message names works


def test_a_value_the_user_typed_is_shown_as_typed(tmp_path):
    """A path that holds an argument's name (`output_dir=`) is part of the value, not a name to rewrite."""
    missing = str(tmp_path / "output_dir=1" / "missing.jsonl")
    with pytest.raises(SystemExit, match=r"^star-dss show: error: --dataset '(.*)' does not exist") as error:
        main(["show", "--dataset", missing, "--output", str(tmp_path / "pictures")])
    assert f"--dataset {missing!r} does not exist" in str(error.value)


def test_the_old_module_path_still_runs(tmp_path):
    """`trl_star_dss.tools.cli` (the command line's former module) keeps `main` and `python -m`."""
    from trl_star_dss.tools.cli import main as old_main

    assert old_main is main
    result = subprocess.run(
        [sys.executable, "-m", "trl_star_dss.tools.cli", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0 and result.stdout.startswith("star-dss "), result.stderr[-2000:]


def test_a_setting_that_is_a_switch_becomes_a_switch():
    parser = argparse.ArgumentParser()
    parser.add_argument("--star-report", **setting("star_report"))
    assert parser.parse_args([]).star_report is False and parser.parse_args(["--star-report"]).star_report is True


def test_demo_runs_the_runner_its_flags_choose(monkeypatch, capsys, tmp_path):
    """`star-dss demo` passes its flags to the demo's runners (replaced here: each run takes minutes)."""
    from trl_star_dss.cli.commands.demo import FAST, load_demo

    demo, calls = load_demo(), []

    def runner(name, result):
        return lambda *args, **kwargs: calls.append((name, args, kwargs)) or result

    monkeypatch.setattr(demo, "run_demo", runner("table", {"guard_eval": None}))
    monkeypatch.setattr(demo, "run_demo_seeds", runner("seeds", {"seconds": 1.0}))
    monkeypatch.setattr(demo, "run_ablation", runner("ablation", {}))
    for name in ("format_report", "format_seeds_report", "format_ablation"):
        monkeypatch.setattr(demo, name, lambda result, name=name: name)
    out = str(tmp_path)
    main(["demo", "--fast", "--lookahead", "0", "2", "--no-progress", "--output", out])
    main(["demo", "--seeds", "3", "--seed", "4", "--guard", "rule", "--output", out])
    main(["demo", "--chunk-sizes", "1", "5", "--no-progress", "--output", out])
    assert calls == [
        ("table", (out, 0), {"progress": False, "guard": "learned", "lookaheads": (0, 2), **FAST}),
        ("seeds", (out, range(4, 7)), {"progress": True, "guard": "rule", "lookaheads": (0,)}),
        ("ablation", (out, 0, [1, 5], None, "learned"), {"progress": False, "noise_side": "both"}),
    ]
    printed = capsys.readouterr().out
    assert "a learned guard, not a real safety judge" in printed and "scripted guardrail" in printed
    assert "format_report" in printed and "format_seeds_report" in printed and "format_ablation" in printed
    assert f"wrote {out}/ablation.md" in printed
