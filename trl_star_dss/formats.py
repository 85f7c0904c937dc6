"""The dataset formats STAR reads (docs/method.md, "What is read as text: content parts and tool calls"): which columns hold the conversation (TRL's `messages`, or
`prompt` + `completion`), which turns are responses, how each message reads as text (text parts joined, tool calls
as JSON), and the check of a scored dataset's `star` records. Shared by scoring and training, so both read an
example the same way."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from .errors import STARDSSError
from .weights import check_star_records, content_text


STAR_COLUMN = "star"  # the scored dataset's column of STAR records (docs/method.md, "STAR: a safety score for every prefix of a response", "How scores are stored")
Conversation = list[dict[str, str]]


def dataset_format(column_names: Sequence[str], required: bool = True) -> str | None:
    """`messages` or `prompt_completion`: the TRL dataset formats that say which text is the response. Otherwise
    an error, or None when not `required` (e.g. plain `text` for language modeling)."""
    if "messages" in column_names:
        return "messages"
    if "prompt" in column_names and "completion" in column_names:
        return "prompt_completion"
    if not required:
        return None
    raise STARDSSError(
        f"The dataset has columns {list(column_names)}, so STAR cannot tell which text is the assistant response. "
        "Use a TRL format that separates it: 'messages' (conversational) or 'prompt' + 'completion' "
        "(standard or conversational). Rename both columns, e.g. for Alpaca data (instruction, input, output): "
        "dataset.rename_columns({'instruction': 'prompt', 'output': 'completion'}) after joining a non-empty "
        "`input` into the prompt (`star-dss score` does it with --prompt-column instruction --input-column input "
        "--completion-column output)."
    )


ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages, where: str) -> None:
    """Refuse what STAR cannot read as text (docs/method.md, "What is read as text: content parts and tool calls"): a message without a role, content that is not a
    string or text parts (images), a tool call not in TRL's format."""
    if not isinstance(messages, list):
        raise STARDSSError(
            f"{where} is a {type(messages).__name__}, not a list of messages. Use [{{'role', 'content'}}]."
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise STARDSSError(f"{where}[{i}] is {message!r}; each message needs 'role' and 'content' keys.")
        if message.get("role") is None:
            raise STARDSSError(
                f"{where}[{i}] has no role ({'role None' if 'role' in message else 'no role key'}). Arrow gives every "
                "message every key of the column and fills the missing ones with None, so a message written without "
                f"a role reads this way. Give every message a role: one of {ROLES}."
            )
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise STARDSSError(f"{where}[{i}].tool_calls is a {type(calls).__name__}, not a list of calls.")
            for k, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise STARDSSError(
                        f"{where}[{i}].tool_calls[{k}] is {call!r}; a call is read in TRL's format "
                        '{"type": "function", "function": {"name": ..., "arguments": {...}}}.'
                    )
        content = message.get("content")
        if content is None:
            if message["role"] == "assistant" and calls:
                continue  # a turn that only calls tools: its calls are its text
            raise STARDSSError(
                f"{where}[{i}] ({message['role']!r}) has no content (content None) and calls no tool. Give it its "
                "text (an empty string if it has none)."
            )
        if isinstance(content, list):
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise STARDSSError(
                        f"{where}[{i}].content[{k}] is a {kind!r} part; STAR scores text, and no guard here reads "
                        "images or audio. Remove such parts (or such examples) first; text parts are read joined, "
                        "as the policy's chat template joins them."
                    )
                if not isinstance(part.get("text"), str):
                    raise STARDSSError(f"{where}[{i}].content[{k}] is a text part without a string 'text': {part!r}.")
        elif not isinstance(content, str):
            raise STARDSSError(
                f"{where}[{i}].content is a {type(content).__name__}, not a string or a list of text parts "
                '([{"type": "text", "text": ...}]). STAR scores text.'
            )


def tool_call_text(call: dict) -> str:
    """A tool call as the guard reads it (docs/method.md, "What is read as text: content parts and tool calls"): `{"name": ..., "arguments": {...}}` in JSON, the
    shape Hermes/Qwen-style templates write and TRL's tool-call parsers read back. Arguments given as a JSON string
    (OpenAI's format) are read, so both spellings of one call read the same."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON: the guard reads the string as it is
    return json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)


def message_text(message: dict) -> str:
    """The text STAR reads for one message: its content (text parts joined as the policy's template joins them,
    `weights.content_text`), then each tool call it makes on a line of its own (`tool_call_text`)."""
    calls = [tool_call_text(call) for call in message.get("tool_calls") or []]
    return "\n".join(filter(None, [content_text(message), *calls])) if calls else content_text(message)


def guard_context(messages: Sequence[dict]) -> Conversation:
    """The conversation before a response as the guard reads it: user and assistant messages as text; a tool's
    results as a user message that says so (guard templates know only the user and the assistant, and a result is
    input the response answers, not something the assistant wrote); system messages are not judged."""
    context: Conversation = []
    for message in messages:
        role = message["role"]
        if role in ("user", "assistant"):
            context.append({"role": role, "content": message_text(message)})
        elif role == "tool":
            name = message.get("name")
            result = f"[tool result{': ' + name if name else ''}] {message_text(message)}"
            if context and context[-1].get("tool"):  # results in a row are one turn of input
                context[-1] = {"role": "user", "content": context[-1]["content"] + "\n" + result, "tool": True}
            else:
                context.append({"role": "user", "content": result, "tool": True})
    return [{"role": m["role"], "content": m["content"]} for m in context]


def response_turns(example: dict, fmt: str, index: int) -> list[tuple[int, Conversation, str]]:
    """The assistant turns to score in one example, as (turn, context, response). The response is the turn's text
    with its tool calls (`message_text`); the context is `guard_context` of the messages before it."""
    where = f"Example {index}"
    if fmt == "messages":
        messages, offset, prefix = example["messages"], 0, []
        _check_messages(messages, f"{where}: messages")
        column = "messages"
    else:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            messages, offset, prefix = (
                [{"role": "assistant", "content": completion}],
                0,
                [{"role": "user", "content": prompt}],
            )
        else:
            _check_messages(prompt, f"{where}: prompt")
            _check_messages(completion, f"{where}: completion")
            messages, offset, prefix = completion, 0, list(prompt)
        column = "completion"
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("train", True) is False:
            continue
        response = message_text(message)
        if not response.strip():
            raise STARDSSError(
                f"{where}: {column}[{i + offset}] is an assistant turn with an empty or whitespace-only response, "
                "which has nothing to score. Remove or fill such examples first "
                "(e.g. dataset.filter(lambda ex: ...))."
            )
        turns.append((i, guard_context(prefix + messages[:i]), response))
    if not turns:
        raise STARDSSError(
            f"{where} has no assistant turn to score ({column} roles: {[m['role'] for m in messages]}). "
            "Every example needs at least one assistant response; drop examples without one."
        )
    return turns


def check_star_example(example: dict, fmt: str, index: int) -> None:
    """`weights.check_star_records` on one example of a TRL format: its messages (or completion) read as scoring
    reads them, then its `star` records (issue 25: the column is input, checked before any model step)."""
    if fmt == "messages":
        messages, column = example["messages"], "messages"
    else:
        completion, column = example["completion"], "completion"
        messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    _check_messages(messages, f"Example {index}: {column}")
    responses = [message_text(m) if m["role"] == "assistant" else None for m in messages]
    check_star_records(example[STAR_COLUMN], responses, index, column, [m["role"] for m in messages])


def check_star_dataset(dataset) -> None:
    """`check_star_example` on every example of a scored dataset (messages or prompt/completion), read in Arrow
    batches. Its cost on 100,000 examples: `benchmarks/bench_star_check.py`."""
    fmt = dataset_format(dataset.column_names)
    columns = [STAR_COLUMN, "messages"] if fmt == "messages" else [STAR_COLUMN, "completion"]
    index = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns)):
            check_star_example(dict(zip(columns, values)), fmt, index)
            index += 1


def example_columns(example: dict, fmt: str) -> list[tuple[str, list[dict]]]:
    """Every message of an example, by the column that holds it: `(column, messages)` (a plain-text prompt or
    completion is one user or assistant message)."""
    if fmt == "messages":
        return [("messages", _as_text(example["messages"]))]
    return [
        (column, [{"role": role, "content": value}] if isinstance(value, str) else _as_text(value))
        for column, role, value in (
            ("prompt", "user", example["prompt"]),
            ("completion", "assistant", example["completion"]),
        )
    ]


def _as_text(messages: list[dict]) -> list[dict]:
    """Messages with their content as the text STAR reads (`message_text`), for the audit and the content rule: a
    special-token string inside a text part or a tool call's arguments is found there too."""
    return [{**m, "content": message_text(m)} if isinstance(m, dict) else m for m in messages]


def example_hash(example: dict, fmt: str) -> str:
    fields = ("messages",) if fmt == "messages" else ("prompt", "completion")
    payload = json.dumps([example[name] for name in fields], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
