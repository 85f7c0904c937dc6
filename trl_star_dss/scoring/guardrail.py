"""The guardrail interface (docs/method.md, "STAR: a safety score for every prefix of a response"): every guard answers one question, for a conversation whose last
message is an assistant response, what is P(safe)? `score_prefixes` asks it for every prefix of a response at once
(STAR). Python rules and ensembles of guards are guardrails too; the causal-LM guards are in `causal_lm.py`, the
token-level ones in `token_level.py`, the named families in `families.py`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..choices import CONTROVERSIAL, SCORING_METHODS
from ..errors import STARDSSError
from ..formats import Conversation
from .audit import TemplateMarkers
from .fingerprint import code_fingerprint


@dataclass
class PrefixQuery:
    """The prefixes of one assistant response to score: `response[:end]` for each end in `ends`.

    `context` is the conversation before the response (it may be empty); `label` names the example in errors.
    """

    context: Conversation
    response: str
    ends: list[int]
    label: str = ""


@dataclass
class PrefixScores:
    """P(safe) of each prefix, whether the guard's context had to be cut, and the guard tokens it cost."""

    scores: list[float]
    context_cut: bool = False
    guard_tokens: int = 0


def prefix_conversations(query: PrefixQuery) -> list[Conversation]:
    return [query.context + [{"role": "assistant", "content": query.response[:end]}] for end in query.ends]


class Guardrail:
    """The interface every guardrail implements: `score` one conversation per result; `score_prefixes` many
    prefixes of one response per result. Subclasses implement `score`; the default `score_prefixes` is the naive
    per-prefix query."""

    name: str = "guardrail"
    _id: str | None = None

    @property
    def id(self) -> str:
        """What names this guard's scores in a scoring cache (issue 25). `load_guardrail` gives a guard the id of
        its spec and settings (`families.guardrail_id`), the one `star-dss score` and both trainers' start-up
        scoring use, so any of them reuses the others' scores. A guard built in code is named by its class, its
        name and the settings that change its scores (`score_settings`); set `guard.id` yourself when its name does
        not identify its weights (a guard trained in code)."""
        if self._id is not None:
            return self._id
        return json.dumps(
            {"guardrail": [self.name], "class": type(self).__name__, **self.score_settings()},
            sort_keys=True,
            default=str,
        )

    @id.setter
    def id(self, value: str) -> None:
        self._id = value

    def score_settings(self) -> dict:
        """The settings of this guard that change its scores, for its default `id`."""
        return {}

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        raise NotImplementedError

    def score_prefixes(self, queries: Sequence[PrefixQuery], method: str = "fast") -> list[PrefixScores]:
        _check_method(method)
        return [PrefixScores(self.score(prefix_conversations(query))) for query in queries]

    def audit_sources(self) -> tuple[list[str], TemplateMarkers]:
        """What the audit looks for on this guard's behalf: the special-token strings of its tokenizer and the
        markers of its template (`audit.Auditor`). A Python rule reads plain text: nothing."""
        return [], TemplateMarkers()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _check_method(method: str) -> None:
    if method not in SCORING_METHODS:
        raise STARDSSError(f"Unknown scoring method {method!r}. Use 'fast' (shared prefix) or 'naive'.")


class PythonGuardrail(Guardrail):
    """A guardrail written as a Python function from a conversation to P(safe) in [0, 1].

    For user rules, tests and the demo: it plugs into scoring, caching and pictures like a model guard.
    """

    def __init__(self, fn: Callable[[Conversation], float], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"PythonGuardrail needs a function conversation -> P(safe), got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self._given_name = name is not None

    def score_settings(self) -> dict:
        # A `name` given is the rule's identity (a run resumed with a fixed copy of the rule keeps its scores);
        # without one, the function's module joins its qualified name, and its code (issue 33: an edited rule under
        # the same name scores anew).
        if self._given_name:
            return {}
        return {
            "function": f"{getattr(self.fn, '__module__', '')}:{getattr(self.fn, '__qualname__', repr(self.fn))}",
            "code": code_fingerprint(self.fn),
        }

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        scores = []
        for conversation in conversations:
            value = float(self.fn(conversation))
            if not 0.0 <= value <= 1.0:
                raise STARDSSError(
                    f"Guardrail function {self.name} returned {value}, which is not a probability. "
                    "It must return P(safe) in [0, 1]."
                )
            scores.append(value)
        return scores


class EnsembleGuardrail(Guardrail):
    """The mean of several guardrails' scores (as in the paper authors' code)."""

    def __init__(self, guardrails: Sequence[Guardrail]):
        if len(guardrails) == 0:
            raise STARDSSError("EnsembleGuardrail needs at least one guardrail.")
        self.guardrails = list(guardrails)
        self.name = "+".join(guard.name for guard in self.guardrails)

    def score_settings(self) -> dict:
        return {"members": [guard.id for guard in self.guardrails]}

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        per_guard = [guard.score(conversations) for guard in self.guardrails]
        return [sum(values) / len(values) for values in zip(*per_guard)]

    def audit_sources(self) -> tuple[list[str], TemplateMarkers]:
        specials, markers = set(), TemplateMarkers()
        for guard in self.guardrails:
            guard_specials, guard_markers = guard.audit_sources()
            specials.update(guard_specials)
            markers.update(guard_markers)
        return sorted(specials), markers

    def score_prefixes(self, queries: Sequence[PrefixQuery], method: str = "fast") -> list[PrefixScores]:
        per_guard = [guard.score_prefixes(queries, method) for guard in self.guardrails]
        results = []
        for parts in zip(*per_guard):
            scores = [sum(values) / len(values) for values in zip(*(part.scores for part in parts))]
            results.append(
                PrefixScores(
                    scores,
                    context_cut=any(part.context_cut for part in parts),
                    guard_tokens=sum(part.guard_tokens for part in parts),
                )
            )
        return results


def check_controversial(controversial: str) -> str:
    if controversial not in CONTROVERSIAL:
        raise STARDSSError(
            f"controversial={controversial!r} is not known. Use 'unsafe' (Qwen3Guard's strict mode: controversial "
            "content weighs as unsafe, the default) or 'safe' (its loose mode)."
        )
    return controversial
