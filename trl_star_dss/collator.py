"""Per-token STAR weights: from a scored example to its tokens, and through padding, packing and padding-free.

A tokenized example carries `star_weights` (one float per token, aligned with `input_ids` and `labels`) and, when
the reference is precomputed, `ref_logps` (log pi_ref of each token given the ones before it; 0 for the first).
Both are plain per-token lists, so TRL's truncation and packing carry them exactly like `labels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from .scoring import STAR_COLUMN, token_scores

# Per-token columns and their padding values (padded positions are never trained, the values are placeholders).
TOKEN_COLUMNS = {"star_weights": 1.0, "ref_logps": 0.0}


def message_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Where each message's content sits in the rendered `text`, searched in order."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = message["content"]
        start = text.find(content, cursor) if content else cursor
        if start < 0:
            stripped = content.strip()  # some templates trim the content
            start = text.find(stripped, cursor)
            content = stripped
        if start < 0:
            raise ValueError(
                f"messages[{i}] ({content[:40]!r}...) does not appear in the chat template's rendering, so its STAR "
                "scores cannot be placed on tokens. Use a chat template that writes message contents verbatim."
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


def example_star_weights(example: dict, tokenizer, chat_template: str | None = None, threshold: float | None = None):
    """The STAR weight of every token of one example, as tokenized by TRL's `SFTTrainer`.

    Response tokens take their chunk's score (`token_scores`); the tokens after a response up to the next message
    (the end-of-turn token) take its last score; all other tokens weigh 1. With `threshold` (rejection sampling,
    docs/method.md 1.3), an example is kept whole (its responses weigh 1) only if every response's whole-response score is
    at least `threshold`; otherwise all its responses weigh 0.

    Returns `(input_ids, star_weights)` for the full (untruncated) sequence.
    """
    if "messages" in example:
        messages, first_turn = example["messages"], 0
    elif isinstance(example["prompt"], list):
        messages, first_turn = example["prompt"] + example["completion"], len(example["prompt"])
    else:
        messages, first_turn = None, 0
    # Each scored turn, by its index in the rendered message list (the completion is index 0 for plain text).
    records = {first_turn + record["turn"]: record for record in example[STAR_COLUMN]}
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                             tools=example.get("tools"))  # fmt: skip
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = message_spans(text, messages)
        regions = {i: (spans[i][0], spans[i + 1][0] if i + 1 < len(spans) else len(text)) for i in records}
    else:  # standard prompt/completion: TRL tokenizes prompt + completion (+ EOS) as plain text
        completion = example["completion"]
        if not completion.endswith(tokenizer.eos_token or "\0"):
            completion += tokenizer.eos_token or ""
        text = example["prompt"] + completion
        encoded = tokenizer(text=text, return_offsets_mapping=True)
        regions = {0: (len(example["prompt"]), len(text))}
    return encoded["input_ids"], region_weights(encoded["offset_mapping"], regions, records, threshold)


def region_weights(offsets: list[tuple[int, int]], regions: dict, records: dict, threshold: float | None = None):
    """Per-token weights from token character `offsets` and, for each scored turn, its character `region`
    `(start, stop)` in the text (the response plus what follows it up to the next message) and its STAR record
    (`chunk_ends` in characters from `start`, `scores`). Tokens outside every region weigh 1. With `threshold`
    (rejection sampling) a record keeps the example (weight 1) only if every response's last score reaches it."""
    weights = [1.0] * len(offsets)
    keep = threshold is None or all(r["scores"][-1] >= threshold for r in records.values())
    for index, (start, stop) in regions.items():
        record = records[index]
        scores = record["scores"] if threshold is None else [float(keep)] * len(record["scores"])
        inside = [t for t, (a, b) in enumerate(offsets) if b > start and a < stop and b > a]
        for t, value in zip(inside, token_scores([offsets[t][1] - start for t in inside], record["chunk_ends"], scores)):
            weights[t] = value
    return weights


@dataclass
class DataCollatorForSTAR(DataCollatorForLanguageModeling):
    """TRL's language-modeling collator that also pads (or, padding-free, concatenates) `star_weights` and
    `ref_logps` exactly like `labels`, so they stay aligned with the tokens in every batch layout."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        for key, padding_value in TOKEN_COLUMNS.items():
            if key not in examples[0]:
                continue
            values = [torch.tensor(example[key], dtype=torch.float32) for example in examples]
            if self.padding_free:
                values = [torch.cat(values)]
            batch[key] = pad(values, padding_value=padding_value, padding_side="right",
                             pad_to_multiple_of=self.pad_to_multiple_of)  # fmt: skip
        return batch
