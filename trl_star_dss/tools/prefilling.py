"""The prefilling attack as Qi et al. 2024 measure it ("Safety Alignment Should Be Made More Than Just a Few Tokens
Deep", arXiv 2406.05946): every harmful prompt's answer is forced to start with the first K tokens, in the evaluated
model's tokenizer, of a harmful answer to that prompt, for each K given. The arguments are checked here, before any
model is loaded, and the K-token prefixes are cut here; `evaluation.evaluate_safety` feeds them to the model.
What was checked against the authors' code, and where this differs from it: docs/evaluation.md, "Prefilling attacks".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from ..errors import STARDSSError
from .loading import load_dataset_arg


def _where(prefill_column: str | None) -> str:
    """How the errors name the answers: by their column when the caller read them from one (the command line)."""
    return f"prefill_column={prefill_column!r}" if prefill_column else "prefill_answers"


def check_prefill_arguments(
    num_prompts: int,
    prefill: str = "",
    prefill_answers: Sequence[str] | None = None,
    prefill_tokens: Sequence[int] | None = None,
    prefill_column: str | None = None,
) -> None:
    """Refuse a prefilling attack that is not well formed: answers without Ks or Ks without answers, a fixed
    `prefill` text together with per-row answers, a K that is not a whole number >= 0, a K given twice, or a number
    of answers that is not the number of prompts. Needs no model, so a command line calls it before loading one."""
    where = _where(prefill_column)
    if prefill_answers is None and prefill_tokens is None:
        return
    if prefill_answers is None:
        raise STARDSSError(
            f"prefill_tokens={list(prefill_tokens)} is given without the harmful answers to cut them from. Pass "
            "prefill_answers (one harmful answer per prompt), or leave prefill_tokens out.",
            arguments=("prefill_tokens", "prefill_answers"),
        )
    if prefill_tokens is None or isinstance(prefill_tokens, (str, int)) or not list(prefill_tokens):
        raise STARDSSError(
            f"{where} is given, but prefill_tokens={prefill_tokens!r} is not a list of token counts. Pass the Ks to "
            "prefill, e.g. [0, 5, 10, 20, 40] (Qi et al.'s, with 0 = no prefill).",
            arguments=("prefill_column", "prefill_tokens"),
        )
    if prefill:
        raise STARDSSError(
            f"prefill={prefill!r} and {where} both force the start of the answer. Choose one: prefill= forces one "
            f"text on every prompt, {where} the first K tokens of each row's own harmful answer.",
            arguments=("prefill", "prefill_column"),
        )
    ks = list(prefill_tokens)
    for k in ks:
        # `bool` is an `int` in Python; `True` tokens is a slip, not a count.
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise STARDSSError(
                f"prefill_tokens={ks}: {k!r} is not a whole number >= 0. Give token counts such as 0 5 10 20 40 "
                "(0 = no prefill).",
                arguments=("prefill_tokens",),
            )
    repeated = sorted({k for k in ks if ks.count(k) > 1})
    if repeated:
        raise STARDSSError(
            f"prefill_tokens={ks} gives {repeated} more than once. Give each K once.", arguments=("prefill_tokens",)
        )
    if len(prefill_answers) != num_prompts:
        raise STARDSSError(
            f"{where} holds {len(prefill_answers)} answers for {num_prompts} prompts. Give one harmful answer per "
            "prompt, in the prompts' order.",
            arguments=("prefill_column",),
        )


def prefill_token_ids(
    tokenizer, prefill_answers: Sequence[str], prefill_tokens: Sequence[int], prefill_column: str | None = None
) -> list[list[int]]:
    """The first max(K) token ids of each harmful answer in `tokenizer` (the evaluated model's own), cut as the
    authors' code cuts them: the answer tokenized alone, no special token added (docs/evaluation.md, "Prefilling
    attacks"). Row i's K-token prefix is `ids[i][:K]`.

    A row that is empty or shorter than the largest K is refused, never prefilled with fewer tokens than its K says;
    so is a row whose prefix holds a special token (a turn end or role marker written in the answer's text would
    end or forge a turn, not prefill text)."""
    where = _where(prefill_column)
    largest = max(prefill_tokens)
    special = set(tokenizer.all_special_ids)
    ids, short = [], []
    for row, answer in enumerate(prefill_answers):
        cut = tokenizer(answer or "", add_special_tokens=False)["input_ids"][:largest]
        if len(cut) < largest:
            short.append((row, len(cut)))
        forced = [t for t in cut if t in special]
        if forced:
            raise STARDSSError(
                f"Row {row} (counted from 0) of {where}: its first {largest} tokens hold the special token "
                f"{tokenizer.convert_ids_to_tokens(forced[0])!r}, which would end or forge a turn instead of "
                "prefilling text. Remove it from that answer, or leave the row out.",
                arguments=("prefill_column",),
            )
        ids.append(cut)
    if short:
        row, count = short[0]
        others = f" ({len(short) - 1} more rows are too short too)" if len(short) > 1 else ""
        raise STARDSSError(
            f"Row {row} (counted from 0) of {where} has {count} tokens in the model's tokenizer, fewer than K = "
            f"{largest} of prefill_tokens={list(prefill_tokens)}{others}. Give every row a harmful answer of at "
            f"least {largest} tokens, or leave such rows out (a shorter prefill would be reported as K = {largest}).",
            arguments=("prefill_column", "prefill_tokens"),
        )
    return ids


def answers_fingerprint(prefill_answers: Sequence[str]) -> str:
    """A digest of the answers, kept with an evaluation's settings: a run is resumed only with the same answers."""
    return hashlib.sha256(json.dumps(list(prefill_answers), ensure_ascii=False).encode("utf-8")).hexdigest()


def load_prefill_answers(path: str, prefill_column: str, split: str = "train") -> list[str]:
    """The harmful answer of every row, from `prefill_column` of the prompts file (or dataset id) `path`; a missing
    value reads as empty (and is refused by `prefill_token_ids`, naming its row)."""
    dataset = load_dataset_arg(path, split, flag="--prompts")
    if prefill_column not in dataset.column_names:
        raise STARDSSError(
            f"The prompts in {path!r} have no column prefill_column={prefill_column!r} (columns: "
            f"{dataset.column_names}). Name the column that holds each row's harmful answer.",
            arguments=("prefill_column",),
        )
    return ["" if answer is None else str(answer) for answer in dataset[prefill_column]]
