"""The checks of flags that argparse cannot state itself: a flag that needs or excludes another, a number that must
be positive. Each command lists its rules in one table (`RULES` in its module) and `check` reads it before anything
loads, so a rule is a line of a table, not a branch of code.

A flag in a rule is its argparse `dest` (`"max_steps"` for `--max-steps`), alone (the flag was given: not None,
not False, not empty) or with a value (`("policy", "smollm2")`: the flag holds that value, given or by default)."""

from __future__ import annotations

import argparse
from typing import NamedTuple

from ..errors import STARDSSError


class Rule(NamedTuple):
    """When `flag` holds, `relation` must hold of `other`, else `message` (its `{flag}` and `{value}` are the flag
    as typed and its value):

    - `"requires"`: `other` holds too;
    - `"excludes"`: `other` does not hold;
    - `"positive"`: the flag's value is > 0 (`other` is None)."""

    flag: str | tuple[str, object]
    relation: str
    other: str | tuple[str, object] | None
    message: str


def positive(flag: str, fix: str) -> Rule:
    """The rule that `flag`, when given, is a positive whole number; `fix` says what to pass instead."""
    return Rule(flag, "positive", None, "{flag} {value} must be a positive whole number. " + fix)


def _holds(args: argparse.Namespace, condition: str | tuple[str, object]) -> bool:
    if isinstance(condition, tuple):
        dest, value = condition
        return getattr(args, dest) == value
    value = getattr(args, condition)
    return value is not None and value is not False and value != []


def check(args: argparse.Namespace, rules: tuple[Rule, ...], flags: dict[str, str]) -> None:
    """Raise a `STARDSSError` with the message of the first rule in `rules` that `args` break. `flags` maps each
    `dest` to the flag as typed (`option_strings`)."""
    for rule in rules:
        if not _holds(args, rule.flag):
            continue
        dest = rule.flag[0] if isinstance(rule.flag, tuple) else rule.flag
        value = getattr(args, dest)
        if rule.relation == "positive":
            broken = not value > 0
        elif rule.relation == "requires":
            broken = not _holds(args, rule.other)
        elif rule.relation == "excludes":
            broken = _holds(args, rule.other)
        else:
            raise ValueError(f"Unknown relation {rule.relation!r} in a rule of the command line.")  # a bug of ours
        if broken:
            raise STARDSSError(rule.message.format(flag=flags[dest], value=value))


# The rules of the scoring options (`Parents.scoring`), which `score` and `eval guard` share.
CHUNK_AND_BATCH = (
    positive("chunk_size", "Use e.g. 5 (the paper's M); 1 scores after every unit."),
    positive("batch_size", "Use e.g. 16 (the default)."),
)
UNIT_NEEDS_TOKENIZER = Rule(
    ("unit", "token"),
    "requires",
    "policy_tokenizer",
    "--unit token (the default) counts chunks in the tokens of the model you will finetune, but "
    "--policy-tokenizer was not given. Pass --policy-tokenizer with that model's hub id or path, or count "
    "words with --unit word.",
)
