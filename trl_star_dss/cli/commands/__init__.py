"""The commands of `star-dss`, one module each (as TRL's `trl/cli/commands/`). Each module has

- `NAME` and `register(subparsers, parents)`: adds its parser, with the shared options from `parents` (`Parents`),
  and sets the defaults `run`, `rules` (its table of flag rules, `rules.py`) and `command_parser`;
- `run(args)`: does the work; torch, transformers, datasets, the scoring engine and the demo are imported there,
  so `star-dss --help` loads none of them.

A new flag is an `add_argument` in its command's `register` (or in a parent of `options.py` when several commands
share it), plus a line in its `RULES` when it needs or excludes another flag, and its use in `run`."""

from __future__ import annotations

from ..options import Parents
from . import demo, eval_capability, eval_guard, eval_safety, score, show


def register_commands(subparsers, parents: Parents) -> None:
    """Every command, in the order `star-dss --help` lists them; `eval` groups the evaluations."""
    for command in (score, show, demo):
        command.register(subparsers, parents)
    evaluations = subparsers.add_parser("eval", help="Evaluate a model.")
    kinds = evaluations.add_subparsers(dest="kind", required=True)
    for command in (eval_safety, eval_guard, eval_capability):
        command.register(kinds, parents)
