"""Where STAR weights land on tokens (docs/method.md, "STAR: a safety score for every prefix of a response", 1.3): from the scored records of an example, its rendered
text and the character offsets of its tokens to one weight per token. It knows nothing of TRL or Axolotl: the TRL
trainer and the Axolotl plugin render and tokenize in their own ways and hand the results here.

A scored record is one element of the `star` column: `{"turn": i, "chunk_ends": [...], "scores": [...]}`, with
`turn` the index of the response among the messages given here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from .errors import STARDSSError


def token_scores(token_ends: Sequence[int], chunk_ends: Sequence[int], scores: Sequence[float]) -> list[float]:
    """The STAR score of each token of a response, from where each token's text ends (character offsets in the
    response). A token takes the score of the first chunk that ends at or after its end; a token past the last
    chunk (an end-of-turn token) takes the last score."""
    last = len(chunk_ends) - 1
    return [scores[min(bisect.bisect_left(chunk_ends, end), last)] for end in token_ends]


def content_text(message: dict) -> str:
    """A message's content as a chat template writes it: a string as it is; text parts joined with nothing between
    them, as Qwen2-VL's and Llama 4's templates write them (docs/method.md, "What is read as text: content parts and tool calls"); no content
    (an assistant turn that only calls tools) as the empty string."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def message_spans(text: str, messages: Sequence[dict]) -> list[tuple[int, int]]:
    """Where each message's content sits in the rendered `text`, searched in order."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = content_text(message)
        start = text.find(content, cursor) if content else cursor
        if start < 0:
            stripped = content.strip()  # some templates trim the content
            start = text.find(stripped, cursor)
            content = stripped
        if start < 0:
            raise STARDSSError(
                f"messages[{i}] ({content[:40]!r}...) does not appear in the chat template's rendering, so its STAR "
                "scores cannot be placed on tokens. Use a chat template that writes message contents verbatim."
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


def response_regions(
    text: str, messages: Sequence[dict], turns: Sequence[int], rewritten_prompt: bool = False
) -> dict[int, tuple[int, int]]:
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
        content = content_text(messages[i]).strip()
        start = text.rfind(content, 0, end)
        if start < 0:
            raise STARDSSError(
                f"A response ({content[:40]!r}...) does not appear in its tokenized example, so its STAR scores "
                "cannot be placed on tokens. Use a prompt format that writes responses verbatim."
            )
        regions[i], end = (start, end), start
    return regions


def look_ahead(scores: Sequence[float], lookahead: int) -> list[float]:
    """Chunk scores seen `lookahead` chunks ahead (docs/method.md, "Look-ahead", this project's extension, not the paper's):
    chunk k takes min(s_k, ..., s_{k+L}). Scores are computed offline, so a token may weigh by what its response goes
    on to say: a guard that flags harm one chunk late then still pulls the chunk that names it toward the reference.
    0 is the paper's STAR (each chunk its own score)."""
    return [min(scores[k : k + lookahead + 1]) for k in range(len(scores))]


def region_weights(
    offsets: Sequence[tuple[int, int]],
    regions: dict[int, tuple[int, int]],
    records: dict,
    whole_turns: Sequence[int] = (),
    lookahead: int = 0,
) -> list[float]:
    """Per-token weights from token character `offsets` and, for each scored turn, its `region` in the text and its
    record (`chunk_ends` in characters from the region's start, `scores`). Tokens outside every region (prompt,
    template) weigh 1; a token past a response's last chunk (its end-of-turn tokens) takes the last score. Every
    token of a turn in `whole_turns` (one that calls tools, docs/method.md, "What is read as text: content parts and tool calls") takes the turn's lowest score.
    `lookahead` chunks: see `look_ahead`."""
    weights = [1.0] * len(offsets)
    for turn, (start, stop) in regions.items():
        record = records[turn]
        inside = [t for t, (a, b) in enumerate(offsets) if b > start and a < stop and b > a]
        if turn in whole_turns:
            lowest = min(record["scores"])
            for t in inside:
                weights[t] = lowest
            continue
        ends = [offsets[t][1] - start for t in inside]
        scores = look_ahead(record["scores"], lookahead)
        for t, value in zip(inside, token_scores(ends, record["chunk_ends"], scores)):
            weights[t] = value
    return weights


def token_weights(
    text: str,
    offsets: Sequence[tuple[int, int]],
    messages: Sequence[dict],
    records: Sequence[dict],
    rewritten_prompt: bool = False,
    lookahead: int = 0,
) -> list[float]:
    """The STAR weight of every token of one rendered example: `text`, its tokens' character `offsets`, the
    `messages` it was rendered from and their scored `records`; `lookahead` chunks (`look_ahead`, 0: the paper's)."""
    by_turn = {record["turn"]: record for record in records}
    # The policy's template writes a tool call in its own syntax, so the scored text's character offsets do not map
    # into it: such a turn is weighted whole (docs/method.md, "What is read as text: content parts and tool calls").
    calls = [turn for turn in by_turn if messages[turn].get("tool_calls")]
    regions = response_regions(text, messages, list(by_turn), rewritten_prompt)
    return region_weights(offsets, regions, by_turn, calls, lookahead)


def response_mask(
    text: str,
    offsets: Sequence[tuple[int, int]],
    messages: Sequence[dict],
    turns: Sequence[int],
    special: Sequence[bool],
) -> list[int]:
    """1 for every token of the response `turns` and the end-of-turn token that closes each (the first `special`
    token after its text: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`), 0 for the rest: system and user
    messages, tool results and the template's headers, the next turn's included. A turn that calls tools keeps its
    whole region (`response_regions`), where the template writes the calls in its own syntax. The responses-only
    objective of the paper (docs/training.md, "What is trained")."""
    spans = message_spans(text, messages)
    mask = [0] * len(offsets)
    for turn in turns:
        start, end = spans[turn]
        stop = spans[turn + 1][0] if turn + 1 < len(spans) else len(text)
        whole = bool(messages[turn].get("tool_calls"))
        for t, (a, b) in enumerate(offsets):
            if b <= a or b <= start or a >= stop:
                continue
            if a < end or whole:
                mask[t] = 1
            elif special[t]:
                mask[t] = 1
                break
    return mask


def rejected(records: Sequence[dict], threshold: float) -> bool:
    """Rejection sampling (docs/method.md, "Baselines in the same trainer"): an example is dropped whole when any of its scored responses has a
    whole-response score (its last chunk's) below `threshold`."""
    return any(record["scores"][-1] < threshold for record in records)


def rejection_report(kept: int, total: int, threshold: float) -> tuple[str, dict[str, int]]:
    """What rejection sampling says once, the same in the TRL trainer and the Axolotl plugin: a log line and the
    counts for the run's metrics (kept `kept` of `total` examples at `threshold`)."""
    message = f"rejection sampling kept {kept} of {total} examples (threshold {threshold})"
    return message, {"rejection_sampling/kept_examples": kept, "rejection_sampling/examples": total}


# -- the `star` column is input ------------------------------------------------------------------------------------

STAR_RECORD_FIX = (
    'Records are {"turn": i, "chunk_ends": [...], "scores": [...]} as `star-dss score` writes them (README, "How '
    'scores are stored"): score the data again, or correct the record.'
)


def check_star_records(
    records,
    responses: Sequence[str | None],
    index: int,
    column: str = "messages",
    roles: Sequence[str | None] | None = None,
) -> None:
    """Refuse an example's `star` records unless each places scores that mean something (issue 25): `turn` names an
    assistant response; `chunk_ends` are strictly increasing positive whole numbers, none past the response's
    length in characters; as many `scores` as ends, each finite and in [0, 1].

    `responses[i]` is the text scored for message `i` of `column` (`scoring.message_text`), None where message `i`
    is not an assistant response (`roles[i]` names what it is). `index` is the example's, for the error. The
    trainers and `star-dss show` call it before any model step: a NaN or a score of 1.5 would otherwise train as
    a weight, and an end past the response would silently weigh the wrong tokens."""

    def fail(problem: str, turn=None):
        head = "the `star` record" if turn is None else f"the `star` record of turn {turn!r}"
        raise STARDSSError(f"Example {index}: {head}: {problem}. {STAR_RECORD_FIX}")

    if not isinstance(records, list):
        raise STARDSSError(
            f"Example {index}: the `star` value is {records!r}, not a list of records. {STAR_RECORD_FIX}"
        )
    seen = set()
    for r, record in enumerate(records):
        if not isinstance(record, dict):
            raise STARDSSError(f"Example {index}: the `star` record {r} is {record!r}, not a dict. {STAR_RECORD_FIX}")
        for key in ("turn", "chunk_ends", "scores"):
            if key not in record:
                raise STARDSSError(f"Example {index}: the `star` record {r} has no {key!r}. {STAR_RECORD_FIX}")
        turn, ends, scores = record["turn"], record["chunk_ends"], record["scores"]
        if type(turn) is not int:
            fail(f"turn {turn!r} is not a whole number", turn)
        if not 0 <= turn < len(responses):
            fail(f"turn {turn} is not a message (the example has {len(responses)} in {column})", turn)
        response = responses[turn]
        if response is None:
            role = roles[turn] if roles is not None else None
            fail(f"turn {turn} is {column}[{turn}], a {role!r} message, not an assistant response", turn)
        if turn in seen:
            fail(f"two records for turn {turn}", turn)
        seen.add(turn)
        if not isinstance(ends, list) or not isinstance(scores, list):
            fail(f"chunk_ends and scores must be lists (got {type(ends).__name__} and {type(scores).__name__})", turn)
        if not ends:
            fail("it has no chunk_ends (every scored response has at least one chunk)", turn)
        if len(ends) != len(scores):
            fail(f"it has {len(ends)} chunk_ends but {len(scores)} scores (one score per chunk)", turn)
        previous = 0
        for k, end in enumerate(ends):
            if type(end) is not int and not (type(end) is float and end.is_integer()):
                fail(f"chunk_ends[{k}] = {end!r} is not a positive whole number", turn)
            if end <= previous:
                fail(
                    f"chunk_ends[{k}] = {end!r} is not a positive whole number"
                    if k == 0
                    else f"chunk_ends are not strictly increasing (chunk_ends[{k}] = {end} after {previous})",
                    turn,
                )
            previous = end
        if previous > len(response):
            fail(f"chunk_ends[-1] = {previous} is past the end of the response ({len(response)} characters)", turn)
        for k, score in enumerate(scores):
            if type(score) not in (float, int) or not 0.0 <= score <= 1.0 or math.isnan(score):
                fail(f"scores[{k}] = {score!r} is not a probability in [0, 1]", turn)
