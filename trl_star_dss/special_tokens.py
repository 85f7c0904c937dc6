"""Special-token strings inside message content (docs/method.md, "Adversarial data: the threat model is the uploader"): a chat template turns such a string into a
real special token (a turn boundary, a forged role). Guards keep content as text (`scoring.template`); the trainers
refuse, drop or keep such examples (`content_special_tokens`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import STARDSSError


def special_token_strings(tokenizer) -> list[str]:
    """The strings `tokenizer` turns into special tokens when it parses text: its special added tokens (all 256 of
    Llama 3's, reserved ones included), longest first. Empty for a tokenizer without any."""
    if tokenizer is None:
        return []
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            strings.add(str(token))
    return sorted((s for s in strings if s), key=lambda s: (-len(s), s))


def special_token_pattern(strings: Sequence[str]) -> re.Pattern | None:
    """One regex for all `strings` (longest first, so the longest match wins), or None when there are none."""
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def first_special_token(conversation: Sequence[dict], pattern: re.Pattern | None) -> tuple[int, str] | None:
    """`(message index, string)` of the first special-token string in a conversation's contents, else None."""
    if pattern is None:
        return None
    for i, message in enumerate(conversation):
        match = pattern.search(message["content"]) if isinstance(message.get("content"), str) else None
        if match:
            return i, match.group()
    return None


def content_special_token_rule(
    conversations: Sequence[Sequence[dict]], tokenizer, mode: str, setting: str, where: str = "training data"
) -> list[int]:
    """The policy-side rule (docs/method.md, "Adversarial data: the threat model is the uploader"): the indices of the conversations to train.

    A message content that holds a special-token string of the policy `tokenizer` becomes a real special token
    (a turn boundary, a forged role) when the chat template is rendered and tokenized. `mode` is the user's choice,
    named `setting` in errors: `refuse` (default) raises, `drop` leaves such conversations out, `keep` trains them
    as they are (for data that holds such strings legitimately). `mode` is checked with the other settings
    (`config.check_star_settings`)."""
    if mode == "keep":
        return list(range(len(conversations)))
    pattern = special_token_pattern(special_token_strings(tokenizer))
    kept = []
    for index, conversation in enumerate(conversations):
        hit = first_special_token(conversation, pattern)
        if hit is None:
            kept.append(index)
        elif mode == "refuse":
            turn, string = hit
            raise STARDSSError(
                f"Example {index} of the {where} holds the policy tokenizer's special-token string {string!r} in "
                f"message {turn}; the chat template would turn it into a real special token (a forged turn). Clean "
                f"the data, or set {setting}='drop' to leave such examples out, or {setting}='keep' if the data "
                "holds these strings on purpose."
            )
    return kept
