"""Where a response is cut into chunks: after every M units (tokens of the policy tokenizer, or whitespace words),
as character offsets (docs/method.md, "STAR: a safety score for every prefix of a response"). Exact scoring
(`dataset`) and the probe (`probe`) both cut here."""

from __future__ import annotations

import re

from ..choices import UNITS
from ..errors import STARDSSError


def chunk_ends(response: str, chunk_size: int = 5, unit: str = "token", tokenizer=None) -> list[int]:
    """Character offsets in `response` where each chunk of `chunk_size` units ends; the last is `len(response)`.

    `unit="token"` counts tokens of the policy `tokenizer` (the paper's M = 5); `unit="word"` counts whitespace
    separated words, as the paper authors' code does.
    """
    check_chunking(chunk_size, unit, tokenizer)
    ends = unit_ends(response, unit, tokenizer)[chunk_size - 1 :: chunk_size] + [len(response)]
    # Byte-level tokenizers can give several tokens the same end (one character split in bytes): keep each once.
    return sorted({end for end in ends if end > 0})


def unit_ends(response: str, unit: str, tokenizer=None) -> list[int]:
    """Where each unit (policy token or whitespace word) of `response` ends, as character offsets."""
    if unit == "word":
        return [match.end() for match in re.finditer(r"\S+", response)]
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [end for _, end in offsets]


def check_chunking(chunk_size, unit: str, tokenizer) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise STARDSSError(
            f"chunk_size={chunk_size!r} must be a positive whole number of {unit}s per chunk. "
            "The paper uses 5; 1 scores after every unit."
        )
    if unit not in UNITS:
        raise STARDSSError(f"unit={unit!r} is not known. Use 'token' (policy tokenizer tokens) or 'word'.")
    if unit == "token" and tokenizer is None:
        raise STARDSSError(
            "unit='token' cuts chunks with the policy tokenizer, but none was given. Pass the tokenizer of the "
            "model you will finetune (`--policy-tokenizer`), or use unit='word'."
        )
