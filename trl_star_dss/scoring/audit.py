"""The audit of scored data: what in a message's content could steer a guard or the policy (docs/method.md, "Adversarial data: the threat model is the uploader").

The uploader of the data may be the attacker. Three kinds of finding, each with its character span in the content:

- `special_token`: a special-token string of the guard's or the policy's tokenizer (e.g. `<|eot_id|>`). The guard
  never reads it as a special token (`CausalLMGuardrail.encode` keeps content as text); the trainers refuse it by
  default (`content_special_tokens`), since the policy's chat template would turn it into a real turn boundary.
- `invisible`: zero-width, bidirectional-override, tag and C0/C1 control characters (newline and tab excepted),
  which hide text from a human reviewer.
- `template_imitation`: text that copies the guard template's own structure: its `<TAG>` markers, four words in a
  row of its instructions, or a role label (`Agent:`) at the start of a line. Tokenization cannot stop a guard from
  reading such text as instructions, so it is flagged, never silently passed.

The markers are derived from the guard's rendered template, not listed by hand per family.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..special_tokens import special_token_pattern, special_token_strings


AUDIT_KINDS = ("special_token", "invisible", "template_imitation")
# Bumped whenever a rule below changes what is found, so an output directory never mixes two audits.
AUDIT_VERSION = 1

# Zero-width and joiners, bidirectional embeddings/overrides/isolates, word joiner and invisible operators, BOM,
# soft hyphen, Unicode tag characters (used to smuggle hidden ASCII), and C0/C1 controls other than tab and newline.
_INVISIBLE = re.compile(
    "[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f"
    "\x00-\x08\x0b-\x1f\x7f-\x9f]+"
)
_TAG = re.compile(r"<[^<>\n]{3,60}>")
_WORD = re.compile(r"\w+")
_NGRAM = 4  # words in a row copied from the guard's instructions


@dataclass
class TemplateMarkers:
    """What imitates a guard template: its `<TAG>` markers, its instructions' word 4-grams, its role labels."""

    tags: set[str] = field(default_factory=set)
    ngrams: set[tuple[str, ...]] = field(default_factory=set)
    role_labels: set[str] = field(default_factory=set)

    @classmethod
    def from_literals(cls, literals: Iterable[str], specials: Iterable[str] = ()) -> TemplateMarkers:
        """From the literal pieces of a rendered template (the text between message contents). A piece's last line
        before a content slot is a role label (`Agent: `)."""
        markers, specials, literals = cls(), set(specials), list(literals)
        for number, piece in enumerate(literals):
            for special in specials:  # special tokens are their own kind of finding
                piece = piece.replace(special, "\n")
            label = piece.rsplit("\n", 1)[-1].strip()
            if number < len(literals) - 1 and 0 < len(label) <= 30:  # the text just before a content slot
                markers.role_labels.add(label)
            markers.tags.update(tag.lower() for tag in _TAG.findall(piece))
            words = _WORD.findall(piece.lower())
            markers.ngrams.update(tuple(words[i : i + _NGRAM]) for i in range(len(words) - _NGRAM + 1))
        return markers

    def update(self, other: TemplateMarkers) -> None:
        self.tags |= other.tags
        self.ngrams |= other.ngrams
        self.role_labels |= other.role_labels

    def digest(self) -> str:
        payload = json.dumps([sorted(self.tags), sorted(self.ngrams), sorted(self.role_labels)])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Auditor:
    """Finds the audit's three kinds in message contents. `special_tokens` maps each string to whose tokenizer it
    belongs to (`guard`, `policy` or `guard+policy`); `markers` come from the guard's template."""

    def __init__(self, special_tokens: dict[str, str] | None = None, markers: TemplateMarkers | None = None):
        self.special_tokens = dict(special_tokens or {})
        self.markers = markers or TemplateMarkers()
        self._special = special_token_pattern(sorted(self.special_tokens, key=lambda s: (-len(s), s)))
        self._tags = (
            re.compile("|".join(map(re.escape, sorted(self.markers.tags, key=len, reverse=True))), re.I)
            if self.markers.tags
            else None
        )
        labels = sorted(self.markers.role_labels, key=len, reverse=True)
        self._labels = re.compile(r"(?m)^[ \t]*(?:" + "|".join(map(re.escape, labels)) + ")") if labels else None

    @classmethod
    def for_guardrail(cls, guardrail, policy_tokenizer=None) -> Auditor:
        """The audit for a guardrail (its `audit_sources()`) and the policy tokenizer the data will train."""
        guard_specials, markers = guardrail.audit_sources()
        owners: dict[str, str] = dict.fromkeys(guard_specials, "guard")
        for special in special_token_strings(policy_tokenizer):
            owners[special] = "guard+policy" if special in owners else "policy"
        return cls(owners, markers)

    def settings(self) -> dict:
        """What decides the findings: two audits with other settings are never mixed in one output directory."""
        specials = json.dumps(sorted(self.special_tokens.items()))
        return {
            "version": AUDIT_VERSION,
            "special_tokens": hashlib.sha256(specials.encode()).hexdigest()[:16],
            "markers": self.markers.digest(),
        }

    def find(self, text: str) -> list[tuple[str, int, int, str]]:
        """`(kind, start, end, detail)` of every finding in one message's content, in order."""
        found = []
        if self._special is not None:
            found += [
                ("special_token", m.start(), m.end(), self.special_tokens[m.group()])
                for m in self._special.finditer(text)
            ]
        found += [
            ("invisible", m.start(), m.end(), " ".join(f"U+{ord(c):04X}" for c in m.group()))
            for m in _INVISIBLE.finditer(text)
        ]
        if self._tags is not None:
            found += [("template_imitation", m.start(), m.end(), "tag") for m in self._tags.finditer(text)]
        if self._labels is not None:
            found += [("template_imitation", m.start(), m.end(), "role label") for m in self._labels.finditer(text)]
        if self.markers.ngrams:  # a copied passage is one finding, not one per 4 words
            words, copied = list(_WORD.finditer(text)), []
            for i in range(len(words) - _NGRAM + 1):
                if tuple(w.group().lower() for w in words[i : i + _NGRAM]) in self.markers.ngrams:
                    start, end = words[i].start(), words[i + _NGRAM - 1].end()
                    if copied and start <= copied[-1][1]:
                        copied[-1][1] = end
                    else:
                        copied.append([start, end])
            found += [("template_imitation", start, end, "instructions") for start, end in copied]
        return sorted(found, key=lambda f: (f[1], f[2]))

    def audit_messages(self, index: int, column: str, messages: Sequence[dict]) -> list[dict]:
        """The findings of one example's messages (one column), as the records of `audit.jsonl`."""
        records = []
        for turn, message in enumerate(messages):
            content = message["content"]
            for kind, start, end, detail in self.find(content):
                records.append(
                    {
                        "index": index,
                        "column": column,
                        "turn": turn,
                        "kind": kind,
                        "span": [start, end],
                        "text": content[start:end],
                        "detail": detail,
                    }
                )
        return records


def count_findings(records: Iterable[dict]) -> dict[str, int]:
    """Findings per kind (every kind present, 0 when none)."""
    counts = dict.fromkeys(AUDIT_KINDS, 0)
    for record in records:
        counts[record["kind"]] += 1
    return counts
