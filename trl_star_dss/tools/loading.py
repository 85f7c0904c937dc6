"""Loading what the command line names: a dataset (a local file, a `save_to_disk` directory, or a dataset id) and
its columns as TRL's prompt/completion format (`--prompt-column`, `--completion-column`, `--input-column`); a
tokenizer (`--policy-tokenizer`); the device a model loads on when `--device` is not given."""

from __future__ import annotations

import logging
import os

from ..errors import STARDSSError


logger = logging.getLogger(__name__)

FILE_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def load_dataset_arg(path: str, split: str = "train", flag: str = "--dataset"):
    """A local JSON/JSONL/CSV/Parquet file, a `save_to_disk` directory (a dataset or a dataset dict), a local
    dataset directory or a hub id. Every failure is a `ValueError` that names `flag` (the option as the user typed it)
    and the value."""
    import datasets

    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if os.path.isfile(path):
        if extension not in FILE_BUILDERS:
            raise STARDSSError(
                f"{flag} {path!r}: files ending in .{extension} are not read. Use .jsonl, .json, .csv or .parquet, "
                "a directory saved with `save_to_disk`, or a hub id."
            )
        return datasets.load_dataset(FILE_BUILDERS[extension], data_files=path, split=split)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        return datasets.load_from_disk(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        return datasets.load_from_disk(path)[split]
    if not os.path.exists(path) and (extension in FILE_BUILDERS or path.startswith((os.sep, ".", "~"))):
        raise STARDSSError(f"{flag} {path!r} does not exist. Check the path (it is read relative to {os.getcwd()!r}).")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as error:  # the library's many failure types (offline hub, no data files, bad split)
        kind = "a directory that holds no dataset" if os.path.isdir(path) else "not a local file or directory"
        raise STARDSSError(
            f"{flag} {path!r} is {kind}, and loading it as a dataset id failed ({type(error).__name__}: {error}). "
            "Give a .jsonl/.json/.csv/.parquet file, a directory saved with `save_to_disk` (for scores: the "
            "`star-dss score --output` directory), or a dataset id the hub can serve."
        ) from error


def load_tokenizer(name: str, flag: str = "--policy-tokenizer"):
    """The tokenizer `name` (a hub id or a local directory), or an error that names `flag` and the value."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:  # transformers' failures for missing files, offline hub, unknown ids
        raise STARDSSError(
            f"{flag} {name!r} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Give the hub id or local directory of the model you will finetune (a directory needs its tokenizer files)."
        ) from error


def default_device() -> str:
    """This process's accelerator (its own GPU under `accelerate launch`), else the CPU."""
    from accelerate import PartialState

    return str(PartialState().device)


def response_columns(
    dataset,
    source: str,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    input_column: str | None = None,
):
    """`dataset` in a format whose response STAR can tell: as it is when it holds `messages` or `prompt` +
    `completion` and no other column is named; otherwise the named columns become TRL's `prompt` and `completion`
    (replacing them; other columns are kept). A non-empty `input_column` is joined into the prompt after a blank
    line (Alpaca's `instruction` + `input`). `source` is the `--dataset` value, for the errors, which name the flags.
    """
    columns = list(dataset.column_names)
    named = {
        "--prompt-column": prompt_column,
        "--completion-column": completion_column,
        "--input-column": input_column,
    }
    mapped = prompt_column != "prompt" or completion_column != "completion" or input_column is not None
    if mapped and "messages" in columns:
        raise STARDSSError(
            f"--dataset {source!r} has a `messages` column, which is what STAR scores, so --prompt-column, "
            "--completion-column and --input-column would be ignored. Leave them out, or remove the `messages` column."
        )
    for flag, column in named.items():
        if column is not None and column not in columns and column not in ("prompt", "completion"):
            raise STARDSSError(
                f"{flag} {column!r} is not a column of --dataset {source!r}, whose columns are {columns}. "
                "Name one of them."
            )
    if not mapped:
        if "messages" in columns or {"prompt", "completion"} <= set(columns):
            return dataset
        if {"instruction", "output"} <= set(columns):
            fix = "--prompt-column instruction" + (" --input-column input" if "input" in columns else "")
            raise STARDSSError(
                f"--dataset {source!r} has Alpaca's columns {columns}, so STAR cannot tell which text is the response "
                f"without being told. Add `{fix} --completion-column output` (the prompt is the instruction, then a "
                "blank line and the input when there is one)."
            )
        raise STARDSSError(
            f"--dataset {source!r} has columns {columns}, so STAR cannot tell which text is the assistant response. "
            "Name them with --prompt-column COLUMN --completion-column COLUMN, or give TRL's format: a `messages` "
            "column, or `prompt` and `completion` columns."
        )
    if len({prompt_column, completion_column, input_column} - {None}) < 2 + (input_column is not None):
        raise STARDSSError(
            f"--prompt-column {prompt_column!r}, --completion-column {completion_column!r} and --input-column "
            f"{input_column!r} name the same column twice. Name a different column for each."
        )
    for flag, column in (("--prompt-column", prompt_column), ("--completion-column", completion_column)):
        if column not in columns:  # a default left as it is, on data that has no such column
            raise STARDSSError(
                f"--dataset {source!r} has no {column!r} column (its columns are {columns}). Name the "
                f"column that holds it with {flag}."
            )
    for target in ("prompt", "completion"):
        if target in columns and target not in named.values():
            raise STARDSSError(
                f"--dataset {source!r} already has a `{target}` column, which the column named with --{target}-column "
                f"would replace. Pass --{target}-column {target}, or remove that column first."
            )
    if input_column is None and "input" in columns and "input" not in named.values():
        logger.warning(
            "--dataset %r has an `input` column that is not part of the prompt. Add --input-column input "
            "to join it into the prompt (Alpaca's layout).",
            source,
        )

    def to_prompt_completion(example: dict, index: int) -> dict:
        prompt, extra = example[prompt_column], example[input_column] if input_column else None
        if extra is not None and not (isinstance(prompt, str) and isinstance(extra, str)):
            raise STARDSSError(
                f"Example {index}: --prompt-column {prompt_column!r} holds a {type(prompt).__name__} and "
                f"--input-column {input_column!r} a {type(extra).__name__}; only text can be joined. Leave "
                "--input-column out for conversational columns."
            )
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return {"prompt": prompt, "completion": example[completion_column]}

    used = [c for c in (prompt_column, completion_column, input_column) if c is not None]
    return dataset.map(to_prompt_completion, with_indices=True, remove_columns=used)
