"""The options several commands share, as argparse parent parsers (`Parents`), and the flags that set a STAR-DSS
setting, whose default, allowed values and help come from `STARArguments` (`setting`), so a flag and the setting it
stands for cannot drift apart.

Only light modules are imported here (`arguments`, `choices`): `star-dss --help` builds every parser."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..arguments import STARArguments
from ..choices import DTYPES, FAMILIES


def setting(name: str, help: str | None = None, **overrides) -> dict:
    """`add_argument` keywords for a flag that sets the STAR setting `name` (a `STARArguments` field): the field's
    default, type, allowed values and help, which ends by naming the setting (the training configuration and the
    Axolotl plugin's keys take the same value). `help` replaces the field's text where the command line says it
    otherwise; `overrides` replace the other keywords."""
    field = {f.name: f for f in dataclasses.fields(STARArguments)}[name]
    default = field.default if field.default is not dataclasses.MISSING else None
    choices = [value for value in field.metadata.get("choices", ()) if value is not None]
    text = (help or field.metadata["help"]).replace("%", "%%")  # argparse formats help with `%`
    shown = "" if default is None else f", default {default}"
    keywords = {"default": default, "help": f"{text} Setting `{name}`{shown}."}
    if isinstance(default, bool):  # a switch: the flag sets True (argparse's `type=bool` would read "False" as True)
        keywords["action"] = "store_true"
    else:
        keywords["type"] = type(default) if default is not None else str
    if choices:
        keywords["choices"] = choices
    return keywords | overrides


@dataclass(frozen=True)
class Parents:
    """Parent parsers (argparse `parents=`) for the options several commands declare alike."""

    model: argparse.ArgumentParser  # the model a command evaluates
    placement: argparse.ArgumentParser  # where and in which dtype the command's models load
    guard: argparse.ArgumentParser  # the guard(s) that score or judge
    scoring: argparse.ArgumentParser  # how responses are cut into chunks and scored
    columns: argparse.ArgumentParser  # which columns of `--dataset` hold the prompt and the response
    progress: argparse.ArgumentParser  # progress bars


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def build_parents() -> Parents:
    model = _parent()
    model.add_argument("--model", required=True, help="Model path or hub id.")
    model.add_argument("--adapter", help="A PEFT adapter to load on top of --model.")

    placement = _parent()
    placement.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype of the models this command loads (auto: the checkpoint's).",
    )
    placement.add_argument(
        "--device", help="Device of the models this command loads (default: this process's accelerator, else CPU)."
    )

    guard = _parent()
    guard.add_argument(
        "--guardrail",
        nargs="+",
        required=True,
        help="Guard model(s): hub ids, local paths or `module:function` Python rules. Several: mean.",
    )
    # The command line reads the named families only (`generic` needs a template, which only Python can give).
    family = (
        "Force the guard family (default: recognised from its chat template, else its name; README, table of guards)."
    )
    guard.add_argument("--family", **setting("guardrail_family", help=family, choices=FAMILIES))

    scoring = _parent()
    scoring.add_argument(
        "--policy-tokenizer",
        help="Tokenizer of the model to finetune; chunks are counted in its tokens (required with --unit token).",
    )
    scoring.add_argument("--chunk-size", **setting("star_chunk_size"))
    scoring.add_argument("--unit", **setting("star_unit"))
    scoring.add_argument("--temperature", **setting("guardrail_temperature"))
    scoring.add_argument("--batch-size", type=int, default=16, help="Examples per guard call (default 16).")
    scoring.add_argument("--trust-remote-code", action="store_true", help="Allow the guard's own modelling code.")

    columns = _parent()
    columns.add_argument(
        "--prompt-column",
        default="prompt",
        help="Column holding the user prompt (default: prompt). "
        "With --completion-column, the scored dataset holds them as TRL's `prompt` and `completion`.",
    )
    columns.add_argument(
        "--completion-column", default="completion", help="Column holding the response to score (default: completion)."
    )
    columns.add_argument(
        "--input-column",
        help="Column joined into the prompt after a blank line when not empty "
        "(Alpaca's `input`: --prompt-column instruction --input-column input --completion-column output).",
    )
    columns.add_argument("--split", default="train", help="Dataset split (default: train).")

    progress = _parent()
    progress.add_argument(
        "--no-progress", action="store_true", help="No progress bars (this command's and `datasets`')."
    )
    return Parents(model, placement, guard, scoring, columns, progress)
