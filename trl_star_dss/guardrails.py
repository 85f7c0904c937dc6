"""Guardrails: classifier LLMs (or plain Python rules) that say how safe an assistant response is.

Every guardrail answers one question: for a conversation whose last message is an assistant response, what is
P(safe)? For causal-LM guards this is read from the raw next-token logits at the verdict position
(docs/method.md 1.1, paper section 3):

    STAR = sigmoid((z_safe - z_unsafe) / T)

`score_prefixes` asks it for every prefix of a response at once. The naive way runs one full guard forward per
prefix (as the paper authors' code does); `CausalLMGuardrail` also has a shared-prefix way that runs the prompt and
the whole response once and lets each prefix's closing suffix attend only to the response up to its cut.
"""

from __future__ import annotations

import bisect
import importlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .audit import TemplateMarkers, first_special_token, special_token_pattern, special_token_strings

Conversation = list[dict[str, str]]
# A numbered stand-in for a message's content (private-use code points, which no template writes): rendering a
# conversation with stand-ins shows where the template puts each content (`CausalLMGuardrail.content_spans`).
_SLOT = "\ue000{}\ue001"
_SLOT_SPLIT = re.compile("\ue000(\\d+)\ue001")

FAMILIES = ("llama_guard", "granite_guardian")


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
    if method not in ("fast", "naive"):
        raise ValueError(f"Unknown scoring method {method!r}. Use 'fast' (shared prefix) or 'naive'.")


class PythonGuardrail(Guardrail):
    """A guardrail written as a Python function from a conversation to P(safe) in [0, 1].

    For user rules, tests and the demo: it plugs into scoring, caching and pictures like a model guard.
    """

    def __init__(self, fn: Callable[[Conversation], float], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"PythonGuardrail needs a function conversation -> P(safe), got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        scores = []
        for conversation in conversations:
            value = float(self.fn(conversation))
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"Guardrail function {self.name} returned {value}, which is not a probability. "
                    "It must return P(safe) in [0, 1]."
                )
            scores.append(value)
        return scores


class EnsembleGuardrail(Guardrail):
    """The mean of several guardrails' scores (as in the paper authors' code)."""

    def __init__(self, guardrails: Sequence[Guardrail]):
        if len(guardrails) == 0:
            raise ValueError("EnsembleGuardrail needs at least one guardrail.")
        self.guardrails = list(guardrails)
        self.name = "+".join(guard.name for guard in self.guardrails)

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


class CausalLMGuardrail(Guardrail):
    """A causal-LM guard that answers with a label token: the generic guardrail.

    The conversation is rendered with the guard's chat template (or `chat_template`) and `template_kwargs`, then
    `verdict_prefix` is appended; the logits of the next token give z_safe and z_unsafe for the two labels.
    This covers Llama Guard, Granite Guardian, ShieldGemma, Qwen3Guard-Gen and in-house guards.

    Args:
        model: a `transformers` causal LM (already on its device).
        tokenizer: its tokenizer.
        safe_label / unsafe_label: the answer strings; each must be exactly one token after `verdict_prefix`.
        chat_template: a Jinja template overriding the tokenizer's.
        template_kwargs: extra variables for the template (e.g. Granite Guardian's `guardian_config`).
        verdict_prefix: text the guard writes before its label (Llama Guard 3: a blank line).
        temperature: T in sigmoid((z_safe - z_unsafe) / T); 1.0 is the paper's formula, 0.2 reproduces the
            authors' code (sampled at temperature 0.2).
        max_length: the guard's context in tokens; longer inputs lose their oldest context, never the response.
        batch_size: conversations per forward in the naive path.
        max_tokens_per_forward: closing-suffix tokens per batched forward in the shared-prefix path (each row also
            holds a copy of the shared keys and values, so this bounds memory too).
    """

    def __init__(
        self,
        model,
        tokenizer,
        safe_label: str,
        unsafe_label: str,
        chat_template: str | None = None,
        template_kwargs: dict | None = None,
        verdict_prefix: str = "",
        temperature: float = 1.0,
        max_length: int | None = None,
        batch_size: int = 8,
        max_tokens_per_forward: int = 4096,
        name: str | None = None,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (it divides the logit margin). Use e.g. 1.0.")
        if chat_template is None and tokenizer.chat_template is None:
            raise ValueError(
                f"The guard tokenizer of {getattr(model, 'name_or_path', 'this model')!r} has no chat template and "
                "none was given. Pass `chat_template=` (a Jinja template that renders the conversation as the "
                "guard expects), or use a family that ships one (family='llama_guard' or 'granite_guardian')."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_kwargs = dict(template_kwargs or {})
        self.verdict_prefix = verdict_prefix
        self.temperature = float(temperature)
        self.batch_size = batch_size
        self.max_tokens_per_forward = max_tokens_per_forward
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.max_length = max_length or _context_length(model, tokenizer)
        self._special_strings = special_token_strings(tokenizer)
        self._special_pattern = special_token_pattern(self._special_strings)
        self._special_ids = set(tokenizer.convert_tokens_to_ids(self._special_strings))
        self._slots: dict[tuple[str, ...], tuple[list[str], list[int]]] = {}
        self.safe_id = self._label_id(safe_label, "safe_label")
        self.unsafe_id = self._label_id(unsafe_label, "unsafe_label")
        if self.safe_id == self.unsafe_id:
            raise ValueError(
                f"safe_label={safe_label!r} and unsafe_label={unsafe_label!r} are the same token; "
                "give two different answers."
            )

    # -- rendering -----------------------------------------------------------------------------------------------

    def render(self, conversation: Conversation) -> str:
        text = self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
            **self.template_kwargs,
        )
        return text + self.verdict_prefix

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """The guard's token ids of each conversation. Message content is always text (docs/method.md 2.1): a
        special-token string inside it (`<|eot_id|>`, ...) never becomes a special token, while the template's own
        special tokens stay special. Clean content tokenizes exactly as the rendered text always did."""
        texts = [self.render(conversation) for conversation in conversations]
        # The template writes its own special tokens (BOS etc.), so the tokenizer must not add them again.
        if not self.tokenizer.is_fast:
            for conversation in conversations:
                self._refuse_special_content(conversation, "a slow tokenizer gives no character offsets")
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [self._content_as_text(conversation, text, ids, offsets) for conversation, text, ids, offsets
                in zip(conversations, texts, encoded["input_ids"], encoded["offset_mapping"])]  # fmt: skip

    def _content_as_text(self, conversation: Conversation, text: str, ids: list[int], offsets) -> list[int]:
        """`ids` (of `text`, the rendering of `conversation`) with every stretch of tokens that overlaps a message's
        content and holds a special token tokenized again as plain text; the rest, template included, as it was."""
        if not self._special_ids.intersection(ids):
            return ids
        spans = self.content_spans(conversation, text)
        if spans is None:
            self._refuse_special_content(conversation, "the template does not write message content verbatim")
            return ids
        starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
        regions: list[list[int]] = []  # token index ranges [first, last] to tokenize again
        for a, b in spans:
            first, last = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b) - 1
            if first <= last and self._special_ids.intersection(ids[first : last + 1]):
                if regions and first <= regions[-1][1]:
                    regions[-1][1] = max(regions[-1][1], last)
                else:
                    regions.append([first, last])
        out, done = [], 0
        for first, last in regions:
            piece = text[starts[first] : ends[last]]
            out += ids[done:first] + self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            done = last + 1
        return out + ids[done:]

    def _refuse_special_content(self, conversation: Conversation, reason: str) -> None:
        hit = first_special_token(conversation, self._special_pattern)
        if hit is not None:
            raise ValueError(
                f"Message {hit[0]} holds the guard tokenizer's special-token string {hit[1]!r}, and it cannot be kept as "
                f"text for guard {self.name!r} ({reason}), so scoring it could let the content forge the guard's "
                "input. Remove such examples first (the audit lists them), or use a guard with a fast tokenizer "
                "and a template that writes message content verbatim."
            )

    def _slotted(self, roles: tuple[str, ...]) -> tuple[list[str], list[int]]:
        """The template rendered with a numbered stand-in for each message's content, split at the stand-ins:
        the literal pieces around them, and which message each stand-in is (a template may repeat or skip one).
        Kept per role sequence: every prefix of a response shares one."""
        if roles not in self._slots:
            stand_ins = [{"role": role, "content": _SLOT.format(i)} for i, role in enumerate(roles)]
            parts = _SLOT_SPLIT.split(self.render(stand_ins))
            self._slots[roles] = parts[0::2], [int(number) for number in parts[1::2]]
        return self._slots[roles]

    def content_spans(self, conversation: Conversation, text: str) -> list[tuple[int, int]] | None:
        """Where the template wrote each message's content in `text` (the conversation's rendering), as character
        spans, or None when the rendering is not the stand-in rendering with each content put in verbatim (or
        stripped, as templates often do)."""
        literals, slots = self._slotted(tuple(message["role"] for message in conversation))
        if not text.startswith(literals[0]):
            return None
        spans, position = [], len(literals[0])
        for slot, literal in zip(slots, literals[1:]):
            content = conversation[slot]["content"]
            for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                end = position + len(candidate)
                if text.startswith(candidate, position) and text.startswith(literal, end):
                    break
            else:
                return None
            spans.append((position, end))
            position = end + len(literal)
        return spans if position == len(text) else None

    def audit_sources(self) -> tuple[list[str], TemplateMarkers]:
        literals, _ = self._slotted(("user", "assistant"))
        return self._special_strings, TemplateMarkers.from_literals(literals, self._special_strings)

    def _label_id(self, label: str, argument: str) -> int:
        probe = self.render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
        before = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        after = self.tokenizer(probe + label, add_special_tokens=False)["input_ids"]
        if after[: len(before)] != before or len(after) != len(before) + 1:
            pieces = self.tokenizer.convert_ids_to_tokens(after[len(before) - 1 :])
            raise ValueError(
                f"{argument}={label!r} is not a single token of the guard's tokenizer after the verdict prefix "
                f"{self.verdict_prefix!r} (the end of the prompt tokenizes to {pieces}). Use the exact first answer "
                "token of the guard, and put any text the guard writes before it into `verdict_prefix`."
            )
        return after[-1]

    def fit_context(self, query: PrefixQuery) -> tuple[Conversation, bool]:
        """Cut the oldest context until the whole response fits the guard's context; never cut the response."""
        context = list(query.context)
        full = {"role": "assistant", "content": query.response}

        def length(ctx: Conversation) -> int:
            return len(self.encode([ctx + [full]])[0])

        if length(context) <= self.max_length:
            return context, False
        while len(context) > 1 and length(context) > self.max_length:
            context = context[1:]
            while len(context) > 1 and context[0]["role"] != "user":  # keep user/assistant alternation
                context = context[1:]
        if length(context) > self.max_length and context:
            # Keep the end of the oldest message: the part closest to the response.
            text = context[0]["content"]
            lo, hi = 0, len(text)  # smallest cut that fits
            while lo < hi:
                mid = (lo + hi) // 2
                if length([{**context[0], "content": text[mid:]}] + context[1:]) <= self.max_length:
                    hi = mid
                else:
                    lo = mid + 1
            context = [{**context[0], "content": text[lo:]}] + context[1:]
        if length(context) > self.max_length:
            raise ValueError(
                f"{query.label or 'A response'} alone takes {length([])} guard tokens with the template, more than "
                f"the guard's max_length={self.max_length}. Raise `max_length` if the guard supports it, use a "
                "guard with a longer context, or drop the example."
            )
        return context, True

    # -- forwards ------------------------------------------------------------------------------------------------

    def _to_scores(self, logits) -> list[float]:
        import torch

        margin = logits[..., self.safe_id].float() - logits[..., self.unsafe_id].float()
        return torch.sigmoid(margin / self.temperature).tolist()

    def _right_padded(self, sequences: list[list[int]]):
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(sequences), max(map(len, sequences))), pad, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
        return input_ids, torch.tensor([len(sequence) - 1 for sequence in sequences])

    def _scores_at(self, ends, **inputs) -> list[float]:
        """Run the guard on a batch and score row i at position `ends[i]`; only those positions are projected onto
        the vocabulary (the model's own head, so family-specific logit scaling or soft-capping applies)."""
        import torch

        device = self.model.device
        keep = torch.unique(ends)
        with torch.inference_mode():
            logits = self.model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()},
                                logits_to_keep=keep.to(device)).logits  # fmt: skip
        return self._to_scores(logits[torch.arange(len(ends)), torch.searchsorted(keep, ends).to(logits.device)])

    def _forward_sequences(self, sequences: list[list[int]]) -> list[float]:
        """One full forward per sequence (right padded, so positions are the natural ones); score at its end."""
        import torch

        scores: list[float] = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad little
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            input_ids, ends = self._right_padded([sequences[i] for i in batch])
            attention_mask = (torch.arange(input_ids.size(1))[None] <= ends[:, None]).long()
            for i, value in zip(batch, self._scores_at(ends, input_ids=input_ids, attention_mask=attention_mask)):
                scores[i] = value
        return scores

    def _shared_prefix_scores(self, ids: list[list[int]]) -> tuple[list[float], int]:
        """Score every prefix of one response from its guard tokens `ids` (one list per prefix, the last is the whole
        response), sharing the work: the common part once, then only each prefix's own closing suffix.

        Each prefix's tokens are `trunk[:start] + suffix`, where `start` is where they first differ from the whole
        response's tokens: usually the cut, earlier where the tokenizer merges across it. So this is exact by
        construction (docs/method.md 3: where tokenization at a cut differs, the suffix simply starts earlier).
        Returns the scores and the guard tokens run."""
        import torch
        from transformers import DynamicCache

        full = ids[-1]
        starts, suffixes = [], []
        for prefix in ids:
            start, limit = 0, min(len(prefix), len(full)) - 1  # at least one suffix token is read
            while start < limit and prefix[start] == full[start]:
                start += 1
            starts.append(start)
            suffixes.append(prefix[start:])
        trunk = full[: max(starts)]
        if not trunk:  # nothing shared (a template that changes its start with the response): one forward each
            return self._forward_sequences(ids), sum(map(len, ids))
        # The trunk runs once as a plain causal forward (any attention kernel) and its keys/values are kept.
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([trunk], device=self.model.device), past_key_values=cache,
                       use_cache=True, logits_to_keep=1)  # fmt: skip
        rows = max(1, self.max_tokens_per_forward // max(map(len, suffixes)))
        scores = []
        for first in range(0, len(suffixes), rows):
            group = slice(first, first + rows)
            scores += self._forward_suffixes(cache, len(trunk), starts[group], suffixes[group])
        return scores, len(trunk) + sum(map(len, suffixes))

    def _forward_suffixes(self, cache, trunk_length: int, starts: list[int], suffixes: list[list[int]]) -> list[float]:
        """One batched forward of closing suffixes over a copy of the trunk's cache: suffix k (a row, right padded)
        sees the trunk before `starts[k]` and itself causally, at positions `starts[k]`, `starts[k] + 1`, ..."""
        import copy

        import torch

        input_ids, ends = self._right_padded(suffixes)
        rows, width = input_ids.shape
        allowed = torch.zeros((rows, width, trunk_length + width), dtype=torch.bool)
        allowed[:, :, trunk_length:] = torch.ones(width, width, dtype=torch.bool).tril()
        for k, start in enumerate(starts):
            allowed[k, :, :start] = True
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None]
        # A float additive mask: bool 4D masks are silently wrong on some attention backends (docs/method.md 3).
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        group_cache = copy.deepcopy(cache)  # the forward appends to its cache; the trunk's serves every group
        group_cache.batch_repeat_interleave(rows)
        return self._scores_at(ends, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                               past_key_values=group_cache, use_cache=True)  # fmt: skip

    # -- the Guardrail interface ---------------------------------------------------------------------------------

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return self._forward_sequences(self.encode(conversations))

    def score_prefixes(self, queries: Sequence[PrefixQuery], method: str = "fast") -> list[PrefixScores]:
        _check_method(method)
        if method == "fast" and getattr(self.model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            method = "naive"  # flash/flex kernels take no custom 4D mask; the naive path is exact everywhere
        results, encoded = [], []
        for query in queries:
            context, cut = self.fit_context(query)
            ids = self.encode(prefix_conversations(PrefixQuery(context, query.response, query.ends)))
            encoded.append(ids)
            results.append(PrefixScores([0.0] * len(ids), context_cut=cut))
        if method == "naive":
            flat = [(q, k) for q, ids in enumerate(encoded) for k in range(len(ids))]
            values = self._forward_sequences([encoded[q][k] for q, k in flat])
            for (q, k), value in zip(flat, values):
                results[q].scores[k] = value
            for q, ids in enumerate(encoded):
                results[q].guard_tokens = sum(len(x) for x in ids)
            return results
        for q, ids in enumerate(encoded):
            results[q].scores, results[q].guard_tokens = self._shared_prefix_scores(ids)
        return results


def _context_length(model, tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 10_000_000:  # transformers' "no limit" sentinel is ~1e30
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
    return int(limit)


class LlamaGuard(CausalLMGuardrail):
    """Llama Guard 3 (1B, 8B): its own chat template; the answer starts with a blank line, then `safe`/`unsafe`."""

    def __init__(self, model, tokenizer, **kwargs):
        kwargs.setdefault("verdict_prefix", "\n\n")
        super().__init__(model, tokenizer, safe_label="safe", unsafe_label="unsafe", **kwargs)


class GraniteGuardian(CausalLMGuardrail):
    """Granite Guardian 3.x (2B, 5B, 8B): asked "is the assistant message harmful?", it answers `Yes` (risky) or
    `No` (safe), so z_safe = logit(`No`) and z_unsafe = logit(`Yes`). The risk defaults to `harm`."""

    def __init__(self, model, tokenizer, risk_name: str = "harm", **kwargs):
        template_kwargs = {"guardian_config": {"risk_name": risk_name}, **kwargs.pop("template_kwargs", {})}
        super().__init__(model, tokenizer, safe_label="No", unsafe_label="Yes", template_kwargs=template_kwargs, **kwargs)


# The versions each family's rule was written for (docs/method.md 1.1). Other versions read their verdicts elsewhere
# (Llama Guard 1/2/4; Granite Guardian 3.2+ answer in a <score> tag and may think first): never guessed.
KNOWN_VERSIONS = {"llama_guard": ("3",), "granite_guardian": ("3.0", "3.1")}


def detect_family(name_or_path: str, tokenizer) -> str | None:
    """Tell a guard's family from its name, else from its chat template; None when neither says. A name of a
    family's version whose format this project does not read (e.g. `granite-guardian-3.3-8b`, `Llama-Guard-4-12B`)
    is an error, never scored with another version's rule."""
    name = name_or_path.lower().replace("_", "-")
    for family, pattern in (("llama_guard", r"llama-?guard-?(\d+)"), ("granite_guardian", r"granite-guardian-(\d+(?:\.\d+)?)")):
        if family.replace("_", "-") not in name.replace("llamaguard", "llama-guard"):
            continue
        version = re.search(pattern, name)
        if version and version.group(1) not in KNOWN_VERSIONS[family]:
            raise ValueError(
                f"{name_or_path!r} looks like {family} version {version.group(1)}, but the {family!r} family reads "
                f"versions {KNOWN_VERSIONS[family]} only, and other versions give their verdict in another format. "
                "Configure it explicitly: family='generic' with safe_label=, unsafe_label=, verdict_prefix= (and "
                "template_kwargs=) exactly as the guard's model card defines them, or family=... if you know it is "
                "read like a known version."
            )
        return family
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "guardian_config" in template:
        return "granite_guardian"
    if "'safe' or 'unsafe'" in template:
        return "llama_guard"
    return None


def load_guardrail(
    spec: str | Guardrail | Sequence[str | Guardrail],
    family: str | None = None,
    temperature: float = 1.0,
    dtype: str = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> Guardrail:
    """Build a guardrail from a hub id, a local path, a `module:function` Python rule, or several of them.

    Several specs make an `EnsembleGuardrail` (mean score). `family` forces `llama_guard` or `granite_guardian`;
    otherwise it is recognised from the model. Extra `kwargs` go to the guardrail class (for a generic guard:
    `safe_label`, `unsafe_label`, `chat_template`, `template_kwargs`, `verdict_prefix`; pass `family="generic"`).
    """
    if isinstance(spec, Guardrail):
        return spec
    if not isinstance(spec, str):
        guards = [load_guardrail(s, family, temperature, dtype, device_map, trust_remote_code, **kwargs) for s in spec]
        return guards[0] if len(guards) == 1 else EnsembleGuardrail(guards)
    if family is not None and family not in (*FAMILIES, "generic"):
        raise ValueError(f"family={family!r} is not known. Use one of {(*FAMILIES, 'generic')} or leave it unset.")
    if not os.path.exists(spec) and ":" in spec:
        return _python_guardrail(spec)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    family = family or detect_family(spec, tokenizer)
    if family is None and "safe_label" not in kwargs:
        raise ValueError(
            f"Could not tell which guard family {spec!r} is from its name or chat template. Pass "
            "family='llama_guard' or family='granite_guardian', or family='generic' with safe_label=, "
            "unsafe_label= (and verdict_prefix=, template_kwargs= as the guard needs)."
        )
    model = AutoModelForCausalLM.from_pretrained(
        spec,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        attn_implementation=kwargs.pop("attn_implementation", "sdpa"),
    ).eval()
    cls = {"llama_guard": LlamaGuard, "granite_guardian": GraniteGuardian}.get(family, CausalLMGuardrail)
    return cls(model, tokenizer, temperature=temperature, name=spec, **kwargs)


def guardrail_id(spec, family: str | None = None, temperature: float = 1.0, max_length: int | None = None) -> str:
    """What identifies a guard's scores in a scoring cache: the same guard and settings give the same id whether
    `star-dss score`, `STARDSSTrainer` or the Axolotl plugin scores (so none of them scores the data twice)."""
    specs = [spec] if isinstance(spec, str) else [s if isinstance(s, str) else s.name for s in spec]
    return json.dumps({"guardrail": specs, "family": family, "temperature": float(temperature), "max_length": max_length})


def deferred_guardrail(spec, family: str | None = None, temperature: float = 1.0, **kwargs):
    """`(build, guardrail_id)` for `score_dataset`: a function that loads the guard (`load_guardrail`, with
    `kwargs`) only if something is left to score (a fully cached run never loads it), and its cache id."""

    def build() -> Guardrail:
        return load_guardrail(spec, family=family, temperature=temperature, **kwargs)

    return build, guardrail_id(spec, family, temperature, kwargs.get("max_length"))


def _python_guardrail(spec: str) -> Guardrail:
    module_name, _, attribute = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"Guardrail {spec!r} is neither an existing path nor an importable `module:function` ({error}). "
            "Give a hub id or local model path, or `package.module:function` for a Python rule."
        ) from error
    if isinstance(target, Guardrail):
        return target
    if isinstance(target, type) and issubclass(target, Guardrail):
        return target()
    return PythonGuardrail(target, name=spec)

