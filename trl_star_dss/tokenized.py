"""Tokenized datasets and their `star_weights` column (docs/training.md, "A pre-tokenized dataset"): the weights of
an example rendered and tokenized as TRL's `SFTTrainer` does, a public function that builds the column for a whole
dataset, and the check of a column the user brings (one weight per token, each in [0, 1]), as `formats` checks the
`star` column.
"""

from __future__ import annotations

import json

from .errors import STARDSSError
from .formats import STAR_COLUMN
from .weights import response_mask, token_weights


WEIGHTS_COLUMN = "star_weights"


def example_star_weights(
    example: dict, tokenizer, chat_template: str | None = None, lookahead: int = 0
) -> tuple[list[int], list[float]]:
    """The token ids and STAR weights of one scored example, rendered and tokenized as TRL's `SFTTrainer` does
    (the chat template for conversations; prompt + completion + EOS for plain text); `weights.token_weights` places
    the weights. Returns the full (untruncated) sequence."""
    text, encoded, messages, first_turn = _render(example, tokenizer, chat_template)
    # Each scored turn, by its index in the rendered message list (the completion follows the prompt).
    records = [{**record, "turn": first_turn + record["turn"]} for record in example[STAR_COLUMN]]
    return encoded["input_ids"], token_weights(text, encoded["offset_mapping"], messages, records, lookahead=lookahead)


def example_response_mask(example: dict, tokenizer, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """The token ids of one conversational example and 1 for each token of its trained assistant turns (every
    assistant message not marked `"train": False`), 0 elsewhere (`weights.response_mask`)."""
    text, encoded, messages, _ = _render(example, tokenizer, chat_template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True) is not False]
    # Special tokens: the named ones and every added token marked special (Llama 3's <|eot_id|> is only the latter).
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special = [i in specials for i in encoded["input_ids"]]
    return encoded["input_ids"], response_mask(text, encoded["offset_mapping"], messages, turns, special)


def _render(example: dict, tokenizer, chat_template: str | None):
    """(text, its tokens with offsets, the messages rendered, where the completion starts among them), as TRL's
    `SFTTrainer` renders and tokenizes the example."""
    if "messages" in example:
        messages, first_turn = example["messages"], 0
    elif isinstance(example["prompt"], list):
        messages, first_turn = example["prompt"] + example["completion"], len(example["prompt"])
    else:
        completion = example["completion"]
        if not completion.endswith(tokenizer.eos_token or "\0"):
            completion += tokenizer.eos_token or ""
        messages, first_turn = (
            [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": completion}],
            1,
        )
    if "messages" in example or isinstance(example["prompt"], list):
        tools = example.get("tools")  # TRL reads a JSON string as its list of tools (trl 1.16 `tokenize_fn`)
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=chat_template,
            tools=json.loads(tools) if isinstance(tools, str) else tools,
        )
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:  # standard prompt/completion: TRL tokenizes prompt + completion (+ EOS) as plain text
        text = messages[0]["content"] + messages[1]["content"]
        encoded = tokenizer(text=text, return_offsets_mapping=True)
    return text, encoded, messages, first_turn


def star_weights_column(dataset, tokenizer, chat_template: str | None = None, lookahead: int = 0):
    """`dataset` with a `star_weights` column: one STAR weight per token of each example as TRL's `SFTTrainer`
    tokenizes it (the chat template for conversations; prompt + completion + EOS for plain text), and `input_ids`
    beside it. For a dataset that you tokenize yourself and pass with `dataset_kwargs={"skip_prepare_dataset": True}`.

    Args:
        dataset: a scored `datasets.Dataset` (`messages` or `prompt` + `completion`, and the `star` column of
            `star-dss score`). If it has `input_ids` already, they must be the tokens this tokenization gives (an
            error names the first example that differs); otherwise they are added.
        tokenizer: the policy's tokenizer.
        chat_template: the template to render conversations with, when not the tokenizer's own.
        lookahead: `star_lookahead` (docs/method.md, "Look-ahead").

    Returns the dataset with `input_ids` and `star_weights`, untruncated: cut both the same way if you truncate.
    `labels` (or TRL's `completion_mask` / `assistant_masks`) stay yours to give: the weights do not say which
    tokens are trained.
    """
    if STAR_COLUMN not in dataset.column_names:
        raise STARDSSError(
            f"star_weights_column needs the dataset's `{STAR_COLUMN}` column (its columns: {dataset.column_names}). "
            "Score it first with `star-dss score` (or `trl_star_dss.score_dataset`)."
        )

    def add(example, index):
        ids, weights = example_star_weights(example, tokenizer, chat_template, lookahead)
        if "input_ids" in example and list(example["input_ids"]) != ids:
            raise STARDSSError(
                f"Example {index} has `input_ids` that are not the tokens of its rendered conversation, so its STAR "
                "weights cannot be placed on them. Drop the `input_ids` column and let star_weights_column tokenize "
                "(pass the chat_template you render with), or place the weights with `trl_star_dss.token_weights`."
            )
        return {"input_ids": ids, WEIGHTS_COLUMN: weights}

    return dataset.map(add, with_indices=True, desc="Placing STAR weights on tokens")


def check_star_weights_column(dataset, dataset_name: str) -> None:
    """A tokenized dataset's `star_weights` column, as `formats.check_star_dataset` checks the `star` column: present,
    one value per token of `input_ids`, each in [0, 1]. A `datasets.IterableDataset` is read while training and not
    checked here."""
    if not hasattr(dataset, "__len__"):
        return
    if WEIGHTS_COLUMN not in dataset.column_names:
        raise STARDSSError(
            f"The {dataset_name} dataset is tokenized (it has `input_ids`) but has no `{WEIGHTS_COLUMN}` column, so "
            "shaping='star_dss' has no weights for its tokens. Add it with "
            "`trl_star_dss.star_weights_column(dataset, tokenizer)` from the scored conversations, or pass the "
            f"untokenized scored dataset (with its `{STAR_COLUMN}` column) and let the trainer tokenize it."
        )
    columns = dataset.with_format(None).select_columns(["input_ids", WEIGHTS_COLUMN])
    for index, example in enumerate(columns):
        ids, weights = example["input_ids"], example[WEIGHTS_COLUMN]
        if weights is None or len(weights) != len(ids):
            count = "no" if weights is None else len(weights)
            raise STARDSSError(
                f"Example {index} of the {dataset_name} dataset has {count} `{WEIGHTS_COLUMN}` for {len(ids)} "
                "`input_ids`. Give one weight per token, cut exactly as `input_ids` were "
                "(`trl_star_dss.star_weights_column` builds them)."
            )
        bad = next((w for w in weights if w is None or not 0 <= w <= 1), False)
        if bad is not False:
            raise STARDSSError(
                f"Example {index} of the {dataset_name} dataset has a `{WEIGHTS_COLUMN}` value of {bad!r}, outside "
                "[0, 1]: a STAR weight is a probability that the text so far is safe, and a larger one would turn "
                "the KL term negative. Use the weights `trl_star_dss.star_weights_column` builds."
            )
