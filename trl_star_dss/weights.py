"""Where STAR weights land on tokens (docs/method.md 1.1, 1.3): from the scored records of an example, its rendered
text and the character offsets of its tokens to one weight per token. It knows nothing of TRL or Axolotl: the TRL
trainer and the Axolotl plugin render and tokenize in their own ways and hand the results here.

A scored record is one element of the `star` column: `{"turn": i, "chunk_ends": [...], "scores": [...]}`, with
`turn` the index of the response among the messages given here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def token_scores(token_ends: Sequence[int], chunk_ends: Sequence[int], scores: Sequence[float]) -> list[float]:
    """The STAR score of each token of a response, from where each token's text ends (character offsets in the
    response). A token takes the score of the first chunk that ends at or after its end; a token past the last
    chunk (an end-of-turn token) takes the last score."""
    last = len(chunk_ends) - 1
    return [scores[min(bisect.bisect_left(chunk_ends, end), last)] for end in token_ends]


def message_spans(text: str, messages: Sequence[dict]) -> list[tuple[int, int]]:
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


def response_regions(text: str, messages: Sequence[dict], turns: Sequence[int],
                     rewritten_prompt: bool = False) -> dict[int, tuple[int, int]]:  # fmt: skip
    """For each scored turn, its region of `text`: from the start of its response to the start of the next message
    (so the end-of-turn tokens after it belong to it), or to the end of the text.

    A chat template writes every message verbatim, so the messages are found in order. With `rewritten_prompt`
    (an instruction format that rewrites the user turn, e.g. Alpaca) a failed search falls back to finding the
    responses from the end backwards: the prompt comes first and may quote them."""
    try:
        spans = message_spans(text, messages)
        return {i: (spans[i][0], spans[i + 1][0] if i + 1 < len(spans) else len(text)) for i in turns}
    except ValueError:
        if not rewritten_prompt:
            raise
    regions, end = {}, len(text)
    for i in sorted(turns, reverse=True):
        content = messages[i]["content"].strip()
        start = text.rfind(content, 0, end)
        if start < 0:
            raise ValueError(
                f"A response ({content[:40]!r}...) does not appear in its tokenized example, so its STAR scores "
                "cannot be placed on tokens. Use a prompt format that writes responses verbatim."
            )
        regions[i], end = (start, end), start
    return regions


def look_ahead(scores: Sequence[float], lookahead: int) -> list[float]:
    """Chunk scores seen `lookahead` chunks ahead (docs/method.md 1.5, this project's extension, not the paper's):
    chunk k takes min(s_k, ..., s_{k+L}). Scores are computed offline, so a token may weigh by what its response goes
    on to say: a guard that flags harm one chunk late then still pulls the chunk that names it toward the reference.
    0 is the paper's STAR (each chunk its own score)."""
    return [min(scores[k : k + lookahead + 1]) for k in range(len(scores))]


def region_weights(offsets: Sequence[tuple[int, int]], regions: dict[int, tuple[int, int]], records: dict,
                   lookahead: int = 0) -> list[float]:  # fmt: skip
    """Per-token weights from token character `offsets` and, for each scored turn, its `region` in the text and its
    record (`chunk_ends` in characters from the region's start, `scores`). Tokens outside every region (prompt,
    template) weigh 1; a token past a response's last chunk (its end-of-turn tokens) takes the last score.
    `lookahead` chunks: see `look_ahead`."""
    weights = [1.0] * len(offsets)
    for turn, (start, stop) in regions.items():
        record = records[turn]
        inside = [t for t, (a, b) in enumerate(offsets) if b > start and a < stop and b > a]
        ends = [offsets[t][1] - start for t in inside]
        scores = look_ahead(record["scores"], lookahead)
        for t, value in zip(inside, token_scores(ends, record["chunk_ends"], scores)):
            weights[t] = value
    return weights


def token_weights(text: str, offsets: Sequence[tuple[int, int]], messages: Sequence[dict], records: Sequence[dict],
                  rewritten_prompt: bool = False, lookahead: int = 0) -> list[float]:  # fmt: skip
    """The STAR weight of every token of one rendered example: `text`, its tokens' character `offsets`, the
    `messages` it was rendered from and their scored `records`; `lookahead` chunks (`look_ahead`, 0: the paper's)."""
    by_turn = {record["turn"]: record for record in records}
    regions = response_regions(text, messages, list(by_turn), rewritten_prompt)
    return region_weights(offsets, regions, by_turn, lookahead)


def rejected(records: Sequence[dict], threshold: float) -> bool:
    """Rejection sampling (docs/method.md 1.3): an example is dropped whole when any of its scored responses has a
    whole-response score (its last chunk's) below `threshold`."""
    return any(record["scores"][-1] < threshold for record in records)
