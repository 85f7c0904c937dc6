"""`star-dss`: the offline steps of STAR-DSS.

    star-dss score --guardrail meta-llama/Llama-Guard-3-1B --policy-tokenizer meta-llama/Llama-3.2-1B-Instruct \
        --dataset data.jsonl --output runs/scored

Run it under `accelerate launch -m trl_star_dss.cli` to split the scoring over several processes (GPUs).
"""

from __future__ import annotations

import argparse
import logging

from .. import __version__
from ..choices import DEMO_TIME
from ..errors import STARDSSError
from .commands import register_commands
from .options import build_parents
from .rules import check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star-dss",
        description="STAR-DSS: keep an LLM safe while finetuning.",
        epilog=f"New here? `star-dss demo` runs every step offline ({DEMO_TIME}); "
        "`star-dss score --help` shows how to score your own data.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    register_commands(parser.add_subparsers(dest="command", required=True), build_parents())
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The command's options by `dest` (argparse keeps a parser's actions in `_actions`, with no public accessor)."""
    return {action.dest: action for action in parser._actions if action.option_strings}


def _on_the_command_line(error: STARDSSError, actions: dict[str, argparse.Action]) -> str:
    """Which flags set the Python arguments `error` names (its `arguments`): the library names them as a Python
    caller sets them, and a flag whose `dest` is that argument sets it here."""
    named = []
    for argument in error.arguments:
        action = actions.get(argument)
        if action is not None:
            switch = action.nargs == 0 and action.const is True  # `store_true`: the flag is `argument=True`
            named.append(f"{argument}{'=True' if switch else ''} is {action.option_strings[0]}")
    if not named:
        return ""
    listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    return f" On the command line, {listed}."


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # The library reports through `logging` (scoring summaries, audit warnings): show its messages here.
    library = logging.getLogger("trl_star_dss")
    if not library.handlers:
        library.addHandler(logging.StreamHandler())
        library.setLevel(logging.INFO)
    # --no-progress silences the `datasets` bars too (loading, mapping, saving), for this command only.
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    if getattr(args, "no_progress", False):
        datasets.disable_progress_bars()
    actions = _actions(args.command_parser)
    try:
        check(args, args.rules, {dest: action.option_strings[0] for dest, action in actions.items()})
        args.run(args)
    except STARDSSError as error:
        # This package's input errors say what is wrong and how to fix it: show that sentence, not a traceback.
        # Anything else (a library's error, a bug) keeps its traceback.
        message = f"{error}{_on_the_command_line(error, actions)}"
        raise SystemExit(f"{args.command_parser.prog}: error: {message}") from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
