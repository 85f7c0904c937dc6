"""Guardrails: classifier LLMs (or plain Python rules) that say how safe an assistant response is. The named
families (Llama Guard, Granite Guardian, ...) and `load_guardrail` are in `families.py`.

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
import contextlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import CONTROVERSIAL
from .audit import TemplateMarkers, first_special_token, special_token_pattern, special_token_strings

Conversation = list[dict[str, str]]
# A numbered stand-in for a message's content (private-use code points, which no template writes): rendering a
# conversation with stand-ins shows where the template puts each content (`CausalLMGuardrail.content_spans`).
_SLOT = "\ue000{}\ue001"
_SLOT_SPLIT = re.compile("\ue000(\\d+)\ue001")


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
        return json.dumps({"guardrail": [self.name], "class": type(self).__name__, **self.score_settings()},
                          sort_keys=True, default=str)  # fmt: skip

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
        self._given_name = name is not None

    def score_settings(self) -> dict:
        # A `name` given is the rule's identity (a run resumed with a fixed copy of the rule keeps its scores);
        # without one, the function's module joins its qualified name.
        if self._given_name:
            return {}
        return {"function": f"{getattr(self.fn, '__module__', '')}:{getattr(self.fn, '__qualname__', repr(self.fn))}"}

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


class TemplatedGuardrail(Guardrail):
    """What every model guard shares: the conversation rendered with the guard's chat template, message content
    always read as text (docs/method.md 2.1), and the oldest context cut to fit the guard. Subclasses read the
    verdict: `CausalLMGuardrail` from the next-token logits of its label tokens, `TokenLevelGuardrail` from a
    per-token classifier."""

    generation_prompt = True  # render the assistant's turn to come (the verdict) after the conversation

    def __init__(self, model, tokenizer, chat_template: str | None = None, template_kwargs: dict | None = None,
                 verdict_prefix: str = "", temperature: float = 1.0, max_length: int | None = None,
                 batch_size: int = 8, name: str | None = None):  # fmt: skip
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (it divides the logits). Use e.g. 1.0.")
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
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.max_length = max_length or _context_length(model, tokenizer)
        self._special_strings = special_token_strings(tokenizer)
        self._special_pattern = special_token_pattern(self._special_strings)
        self._special_ids = set(tokenizer.convert_tokens_to_ids(self._special_strings))
        self._slots: dict[tuple[str, ...], tuple[list[str], list[int]]] = {}
        self.content_shape = self._detect_content_shape()

    def score_settings(self) -> dict:
        return {"chat_template": self.chat_template, "template_kwargs": self.template_kwargs,
                "verdict_prefix": self.verdict_prefix, "temperature": self.temperature, "max_length": self.max_length,
                "labels": getattr(self, "label_ids", None), "safe_labels": getattr(self, "safe_labels", None),
                "controversial": getattr(self, "controversial", None)}  # fmt: skip

    # -- rendering -----------------------------------------------------------------------------------------------

    def _template_name(self) -> str:
        return "the chat_template= given" if self.chat_template is not None else "its tokenizer's chat template"

    def _detect_content_shape(self) -> str:
        """How the template reads a message's content (docs/method.md 1.1, issue 24): `"string"` or `"parts"` (a list
        of `{"type": "text", "text": ...}`, as Llama Guard 3 1B's and Llama Guard 4's templates read it). A user and an
        assistant stand-in are rendered both ways, once per guard; the shape whose rendering holds more of them wins
        (a string on a tie: a template that prints a list whole also shows its text, but as a list's repr)."""
        stand_ins = [{"role": "user", "content": _SLOT.format(0)}, {"role": "assistant", "content": _SLOT.format(1)}]
        found = {}
        for shape in ("string", "parts"):
            try:
                text = self._apply_template(stand_ins, shape)
            except Exception:  # noqa: BLE001 -- a template may reject a shape outright (`content.strip()` on a list, `+` on a str)
                found[shape] = 0
                continue
            found[shape] = sum(_SLOT.format(i) in text for i in range(2))
        if max(found.values()) == 0:
            raise ValueError(
                f"The chat template of guard {self.name!r} ({self._template_name()}) writes no message content into "
                "the guard input, neither given as a string nor as a list of text parts, so the guard would judge "
                "nothing. Pass a `chat_template=` that writes the conversation (`message['content']`)."
            )
        return "parts" if found["parts"] > found["string"] else "string"

    def _apply_template(self, conversation: Conversation, shape: str) -> str:
        if shape == "parts":
            conversation = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in conversation]
        return self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=self.generation_prompt,
            **self.template_kwargs,
        )

    def render(self, conversation: Conversation) -> str:
        """The guard input as text: the conversation through the guard's template, each content passed in the shape
        the template reads (`content_shape`), then the verdict prefix."""
        for i, message in enumerate(conversation):
            if not isinstance(message.get("content"), str):
                raise TypeError(
                    f"Message {i} ({message.get('role')!r}) of the conversation given to guard {self.name!r} has "
                    f"content of type {type(message.get('content')).__name__}; a guard reads text. Give each message's "
                    "content as a string (the guard passes it on in the shape its template reads)."
                )
        return self._apply_template(conversation, self.content_shape) + self.verdict_prefix

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """The guard's token ids of each conversation. Message content is always text (docs/method.md 2.1): a
        special-token string inside it (`<|eot_id|>`, ...) never becomes a special token, while the template's own
        special tokens stay special. Clean content tokenizes exactly as the rendered text always did."""
        texts = self._checked_renders(conversations)
        # The template writes its own special tokens (BOS etc.), so the tokenizer must not add them again.
        if not self.tokenizer.is_fast:
            for conversation in conversations:
                self._refuse_special_content(conversation, "a slow tokenizer gives no character offsets")
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [ids for _, ids, _ in self.encode_with_offsets(conversations)]

    def encode_with_offsets(self, conversations: Sequence[Conversation]) -> list[tuple[str, list[int], list]]:
        """`encode` with the rendered text and each token's character span in it (a fast tokenizer only)."""
        texts = self._checked_renders(conversations)
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(text, *self._content_as_text(conversation, text, ids, [tuple(o) for o in offsets]))
                for conversation, text, ids, offsets
                in zip(conversations, texts, encoded["input_ids"], encoded["offset_mapping"])]  # fmt: skip

    def _content_as_text(self, conversation: Conversation, text: str, ids: list[int], offsets) -> tuple[list, list]:
        """`ids` and `offsets` (of `text`, the rendering of `conversation`) with every stretch of tokens that
        overlaps a message's content and holds a special token tokenized again as plain text; the rest, template
        included, as it was."""
        if not self._special_ids.intersection(ids):
            return ids, offsets
        spans = self.content_spans(conversation, text)
        if spans is None:
            self._refuse_special_content(conversation, "the template does not write message content verbatim")
            return ids, offsets
        starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
        regions: list[list[int]] = []  # token index ranges [first, last] to tokenize again
        for a, b in spans:
            first, last = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b) - 1
            if first <= last and self._special_ids.intersection(ids[first : last + 1]):
                if regions and first <= regions[-1][1]:
                    regions[-1][1] = max(regions[-1][1], last)
                else:
                    regions.append([first, last])
        out, out_offsets, done = [], [], 0
        for first, last in regions:
            piece = self.tokenizer(text[starts[first] : ends[last]], add_special_tokens=False,
                                   split_special_tokens=True, return_offsets_mapping=True)  # fmt: skip
            out += ids[done:first] + piece["input_ids"]
            out_offsets += offsets[done:first] + [(a + starts[first], b + starts[first]) for a, b in piece["offset_mapping"]]
            done = last + 1
        return out + ids[done:], out_offsets + offsets[done:]

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

    def _checked_renders(self, conversations: Sequence[Conversation]) -> list[str]:
        """Each conversation rendered, refused unless the guard input holds what the guard is asked to judge
        (docs/method.md 1.1, "What the guard reads"): the last message (the response, or the prefix of it, being
        scored) and every message whose content the template writes for this sequence of roles (its stand-in
        rendering shows which: ShieldGemma and WildGuard read only the last user turn and the response, by design).
        A content counts as present where the template writes it verbatim or stripped (Llama Guard 3 writes
        `content | trim`) at the places the stand-in rendering puts it; for a template that transforms content in
        another way, where its stripped text occurs anywhere in the input."""
        texts = []
        for conversation in conversations:
            text = self.render(conversation)
            if conversation:
                self._check_content(conversation, text)
            texts.append(text)
        return texts

    def _check_content(self, conversation: Conversation, text: str) -> None:
        _, slots = self._slotted(tuple(message["role"] for message in conversation))
        wanted = sorted(set(slots) | {len(conversation) - 1})
        missing = [i for i in wanted if i not in slots]  # the template never writes the scored message
        if not missing and self.content_spans(conversation, text) is None:
            missing = [i for i in wanted if conversation[i]["content"].strip() not in text]
        if missing:
            what = "; ".join(f"message {i} ({conversation[i]['role']}"
                             f"{', the response being scored' if i == len(conversation) - 1 else ''}): "
                             f"{_preview(conversation[i]['content'])}" for i in missing)  # fmt: skip
            raise ValueError(
                f"The input of guard {self.name!r}, rendered with {self._template_name()} (content passed as "
                f"{'a list of text parts' if self.content_shape == 'parts' else 'a string'}), does not contain what it "
                f"is asked to judge: {what}. Scoring it would give the same score whatever the response says. Use "
                "the guard's own template, or pass a `chat_template=` that writes every message's content (and the "
                "response last)."
            )

    def audit_sources(self) -> tuple[list[str], TemplateMarkers]:
        literals, _ = self._slotted(("user", "assistant"))
        return self._special_strings, TemplateMarkers.from_literals(literals, self._special_strings)

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

    def _right_padded(self, sequences: list[list[int]]):
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(sequences), max(map(len, sequences))), pad, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
        return input_ids, torch.tensor([len(sequence) - 1 for sequence in sequences])

class CausalLMGuardrail(TemplatedGuardrail):
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
        max_tokens_per_forward: tokens per forward in the shared-prefix path, for the trunks and for the closing
            suffixes of a batch of responses (trunks are held once, never copied per row), so it bounds memory too.
        other_labels: more answer classes, label -> whether it counts as safe (Qwen3Guard-Gen's `Controversial`).
            With more than two classes STAR = P(safe classes) = softmax(z / T) summed over the safe labels
            (docs/method.md 1.1); with two it is sigmoid((z_safe - z_unsafe) / T), the same number.
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
        other_labels: dict[str, bool] | None = None,
    ):
        super().__init__(model, tokenizer, chat_template, template_kwargs, verdict_prefix, temperature, max_length,
                         batch_size, name)  # fmt: skip
        self.max_tokens_per_forward = max_tokens_per_forward
        self.safe_id = self._label_id(safe_label, "safe_label")
        self.unsafe_id = self._label_id(unsafe_label, "unsafe_label")
        others = dict(other_labels or {})
        self.label_ids = [self.safe_id, self.unsafe_id] + [self._label_id(x, "other_labels") for x in others]
        self.safe_labels = [True, False, *(bool(safe) for safe in others.values())]
        if len(set(self.label_ids)) != len(self.label_ids):
            raise ValueError(
                f"The labels {[safe_label, unsafe_label, *others]} are the same token (some of them); give each class its own "
                "first answer token."
            )

    def _label_id(self, label: str, argument: str) -> int:
        probe = self.render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
        token = one_token_after(self.tokenizer, probe, label)
        if token is None:
            before = len(self.tokenizer(probe, add_special_tokens=False)["input_ids"])
            after = self.tokenizer(probe + label, add_special_tokens=False)["input_ids"]
            pieces = self.tokenizer.convert_ids_to_tokens(after[before - 1 :])
            raise ValueError(
                f"{argument}={label!r} is not a single token of the guard's tokenizer after the verdict prefix "
                f"{self.verdict_prefix!r} (the end of the prompt tokenizes to {pieces}). Use the exact first answer "
                "token of the guard, and put any text the guard writes before it into `verdict_prefix`."
            )
        return token

    # -- forwards ------------------------------------------------------------------------------------------------

    def _label_head(self):
        """The output layer's rows of the labels, with the post-processing the model's forward applies (bias,
        scale, soft-cap: all per vocabulary entry, so these rows give exactly the labels' logits). A guard is scored at one
        position per prefix, and projecting that position onto the whole vocabulary (128k entries for Llama Guard)
        would cost more than the rest of a closing suffix on small guards. Used only when `output_head_matches`
        confirms the head reproduces the model's own logits; otherwise the model's own logits are read (None)."""
        if not hasattr(self, "_head"):
            from .heads import OutputHead, output_head, output_head_matches

            self._head = None
            if output_head_matches(self.model)[0]:
                head, ids = output_head(self.model), self.label_ids
                bias = None if head.bias is None else head.bias[ids]
                self._head = OutputHead(head.weight[ids], bias, head.logit_scale, head.softcap)
        return self._head

    def _scores_at(self, ends, shared_prefix=None, **inputs) -> list[float]:
        """Run the guard on a batch and score row i at position `ends[i]`: P(safe labels) from the labels' logits.
        With `shared_prefix`, the rows are closing suffixes over trunks (`shared_prefix_attention`)."""
        import torch

        from .heads import text_backbone
        from .shared_prefix import shared_prefix_attention

        device = self.model.device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()} | {"use_cache": False}
        rows, ends = torch.arange(len(ends)), ends.to(device)
        head = self._label_head()
        attention = shared_prefix_attention(self.model, shared_prefix) if shared_prefix else contextlib.nullcontext()
        with torch.inference_mode(), attention:
            if head is not None:
                hidden = text_backbone(self.model)(**inputs).last_hidden_state
                logits = head.logits(hidden[rows, ends])
            else:  # only the scored positions are projected (the model's own head)
                keep = torch.unique(ends)
                logits = self.model(**inputs, logits_to_keep=keep).logits[rows, torch.searchsorted(keep, ends)]
                logits = logits[:, self.label_ids].float()
        if len(self.label_ids) == 2:  # the paper's formula (docs/method.md 1.1)
            return torch.sigmoid((logits[:, 0] - logits[:, 1]) / self.temperature).tolist()
        probabilities = torch.softmax(logits / self.temperature, -1)
        return probabilities[:, torch.tensor(self.safe_labels, device=logits.device)].sum(-1).tolist()

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

    def _shared_prefix_scores(self, encoded: list[list[list[int]]]) -> list[tuple[list[float], int]]:
        """Score every prefix of several responses, sharing the work: per response, the common part (its trunk)
        once, then only each prefix's own closing suffix; several responses per forward, up to
        `max_tokens_per_forward` (docs/method.md 3). `encoded[q]` holds response q's guard tokens, one list per
        prefix, the last being the whole response. Returns, per response, its scores and the guard tokens run."""
        plans = [_split_prefixes(ids) for ids in encoded]
        results: list = [None] * len(plans)
        budget, limit = self.max_tokens_per_forward, _shared_prefix_limit(self.model)
        batch: list[int] = []
        for q, (trunk, starts, suffixes) in enumerate(plans):
            # Nothing shared (a template that changes its start with the response), or an input longer than the rows
            # read exactly: one forward per prefix.
            if not trunk or max(map(len, encoded[q])) > limit:
                results[q] = self._forward_sequences(encoded[q]), sum(map(len, encoded[q]))
                continue
            # Responses join a batch while their padded trunks and their suffix rows each fit the budget.
            widest = max(len(plans[b][0]) for b in batch + [q])
            rows = sum(_row_tokens(plans[b][2]) for b in batch + [q])
            if batch and ((len(batch) + 1) * widest > budget or rows > budget):
                self._shared_prefix_batch(batch, plans, results)
                batch = []
            batch.append(q)
        if batch:
            self._shared_prefix_batch(batch, plans, results)
        return results

    def _shared_prefix_batch(self, batch: list[int], plans, results: list) -> None:
        """Run the trunks of `batch` in one causal forward and keep their keys and values once; then the closing
        suffixes of all of them as rows, each attending to its trunk before its cut through `shared_prefix_attention`
        (no row holds a copy of a trunk)."""
        import torch
        from transformers import DynamicCache

        from .shared_prefix import SharedPrefix

        device = self.model.device
        trunks = [plans[q][0] for q in batch]
        input_ids, ends = self._right_padded(trunks)
        cache = DynamicCache()  # full layers: a sliding window is applied by the rows' masks, never by eviction
        with torch.inference_mode():
            self.model(input_ids=input_ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1,
                       attention_mask=(torch.arange(input_ids.size(1))[None] <= ends[:, None]).long().to(device))  # fmt: skip
        rows = [(e, start, suffix) for e, q in enumerate(batch) for start, suffix in zip(*plans[q][1:])]
        scores: list[float] = []
        first = 0
        while first < len(rows):
            end, width = first + 1, len(rows[first][2])
            while end < len(rows) and (end + 1 - first) * max(width, len(rows[end][2])) <= self.max_tokens_per_forward:
                width = max(width, len(rows[end][2]))
                end += 1
            group = rows[first:end]
            input_ids, row_ends = self._right_padded([suffix for _, _, suffix in group])
            starts = torch.tensor([start for _, start, _ in group], device=device)
            examples = [e for e, _, _ in group]
            spans = [(e, first_row, first_row + examples.count(e)) for first_row, e in enumerate(examples)
                     if first_row == 0 or examples[first_row - 1] != e]  # fmt: skip
            shared = SharedPrefix(cache, spans, starts, input_ids.size(1))
            positions = starts[:, None] + torch.arange(input_ids.size(1), device=device)
            scores += self._scores_at(row_ends, shared, input_ids=input_ids, position_ids=positions)
            first = end
        for e, q in enumerate(batch):
            trunk, _, suffixes = plans[q]
            results[q] = scores[: len(suffixes)], len(trunk) + sum(map(len, suffixes))
            scores = scores[len(suffixes) :]

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
        for result, (scores, guard_tokens) in zip(results, self._shared_prefix_scores(encoded)):
            result.scores, result.guard_tokens = scores, guard_tokens
        return results


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def one_token_after(tokenizer, text: str, label: str) -> int | None:
    """The token id `label` adds when `text + label` tokenizes as `text`'s tokens and exactly one more; else None."""
    before = tokenizer(text, add_special_tokens=False)["input_ids"]
    after = tokenizer(text + label, add_special_tokens=False)["input_ids"]
    return after[-1] if after[: len(before)] == before and len(after) == len(before) + 1 else None


def _split_prefixes(ids: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Split one response's prefix encodings (the last is the whole response) into a shared trunk and, per prefix,
    `(start, suffix)` with `prefix == trunk[:start] + suffix`: `start` is where the prefix first differs from the whole
    response's tokens, usually the cut, earlier where the tokenizer merges across it. So sharing is exact by
    construction (docs/method.md 3: where tokenization at a cut differs, the suffix simply starts earlier)."""
    full = ids[-1]
    starts, suffixes = [], []
    for prefix in ids:
        start, limit = 0, min(len(prefix), len(full)) - 1  # at least one suffix token is read
        while start < limit and prefix[start] == full[start]:
            start += 1
        starts.append(start)
        suffixes.append(prefix[start:])
    return full[: max(starts)], starts, suffixes


def _shared_prefix_limit(model) -> float:
    """The longest input whose closing-suffix rows attend exactly as `model` does. Llama 4's chunked-attention layers
    (`attention_chunk_size`) and the attention temperature of its layers without rotary embeddings (1 until position
    `floor_scale - 1`) depend on absolute positions the rows do not see (transformers' `Llama4TextAttention` and
    `create_chunked_causal_mask`); both are 8192 in Llama 4's defaults, so they change nothing below that."""
    config = model.config.get_text_config()
    limit = float("inf")
    if "chunked_attention" in (getattr(config, "layer_types", None) or []):
        limit = min(limit, config.attention_chunk_size)
    if getattr(config, "attn_temperature_tuning", False) and not all(getattr(config, "no_rope_layers", None) or [1]):
        limit = min(limit, config.floor_scale - 1)
    return limit


def _row_tokens(suffixes: list[list[int]]) -> int:
    return len(suffixes) * max(map(len, suffixes))


def _context_length(model, tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 10_000_000:  # transformers' "no limit" sentinel is ~1e30
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
    return int(limit)


# Qwen3Guard's risk classes, in the order of its risk-level logits: `label_map` in QwenLM/Qwen3Guard
# `eval/eval_stream.py` (commit 6a52eca), the same map the remote code exposes as `response_risk_level_map`.
QWEN3GUARD_CLASSES = ("Safe", "Unsafe", "Controversial")


def check_controversial(controversial: str) -> str:
    if controversial not in CONTROVERSIAL:
        raise ValueError(
            f"controversial={controversial!r} is not known. Use 'unsafe' (Qwen3Guard's strict mode: controversial "
            "content weighs as unsafe, the default) or 'safe' (its loose mode)."
        )
    return controversial


class TokenLevelGuardrail(TemplatedGuardrail):
    """A guard that classifies every token of a response as it streams (Qwen3Guard-Stream 0.6B/4B/8B), read in
    one forward per response (docs/method.md 3).

    The conversation with the whole response is rendered with the guard's template (Qwen3's, thinking off) and run
    once; the model returns `risk_level_logits` `[batch, tokens, 3]` over Safe / Unsafe / Controversial at every
    position. The STAR of the prefix that ends at character `c` of the response is P(safe classes) =
    softmax(z / T) read at the last guard token that lies wholly inside `response[:c]`; for `c` before the first
    whole token, at the token before the response. `controversial` says whether the third class counts as safe.

    Interface verified against QwenLM/Qwen3Guard (commit 6a52eca): README's `AutoModel.from_pretrained(...,
    trust_remote_code=True)` and `eval/eval_stream.py`, which runs one forward with a 4-D boolean causal mask and
    reads `outputs.risk_level_logits.view(-1, 3)` from the first response token on. Its own verdict on a whole
    response (unsafe when two consecutive tokens are) is a decision rule over these per-token classes; STAR keeps
    the probability of each prefix instead.
    """

    generation_prompt = False  # the response is the last message; nothing is generated

    def __init__(self, model, tokenizer, controversial: str = "unsafe", chat_template: str | None = None,
                 template_kwargs: dict | None = None, temperature: float = 1.0, max_length: int | None = None,
                 name: str | None = None):  # fmt: skip
        template_kwargs = {"enable_thinking": False, **(template_kwargs or {})}
        super().__init__(model, tokenizer, chat_template, template_kwargs, "", temperature, max_length, 1, name)
        self.controversial = check_controversial(controversial)
        classes = getattr(model, "response_risk_level_map", None) or dict(enumerate(QWEN3GUARD_CLASSES))
        if [classes[i] for i in sorted(classes)] != list(QWEN3GUARD_CLASSES):
            raise ValueError(
                f"The token-level guard {self.name!r} names its risk classes {classes}, not Qwen3Guard-Stream's "
                f"{dict(enumerate(QWEN3GUARD_CLASSES))}, so which logit is safe is not known here. Map its classes "
                "to these indices, or report the guard."
            )
        if not tokenizer.is_fast:
            raise ValueError(
                f"The token-level guard {self.name!r} needs a fast tokenizer: it maps the policy's chunk ends to guard "
                "tokens by their character offsets."
            )
        self._safe_classes = [0, 2] if controversial == "safe" else [0]

    def _positions(self, text: str, offsets, conversation: Conversation, ends: Sequence[int]) -> list[int]:
        """The guard token at which each prefix `response[:end]` is read (the response is the last message)."""
        spans = self.content_spans(conversation, text)
        if spans is None:
            raise ValueError(
                f"The chat template of token-level guard {self.name!r} does not write the response verbatim, so its "
                "tokens cannot be matched to the prefixes' characters. Pass a `chat_template=` that does."
            )
        start, stop = spans[-1]
        response = conversation[-1]["content"]
        lead = response.find(text[start:stop])  # what the template stripped from the front
        token_ends = [b for _, b in offsets]
        # The last token that ends at or before the cut; a token straddling the cut is not inside the prefix.
        return [bisect.bisect_right(token_ends, start + min(max(end - lead, 0), stop - start)) - 1 for end in ends]

    def _risk_scores(self, ids: list[int], positions: list[int]) -> list[float]:
        import torch

        input_ids = torch.tensor([ids], device=self.model.device)
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=self.model.device).tril()[None, None]
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=causal).risk_level_logits[0, positions].float()
        return torch.softmax(logits / self.temperature, -1)[:, self._safe_classes].sum(-1).tolist()

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return self._score_whole(conversations)[0]

    def _score_whole(self, conversations: Sequence[Conversation]) -> tuple[list[float], int]:
        """Each conversation read at its last response token, one forward each; and the guard tokens run."""
        scores, tokens = [], 0
        for conversation, (text, ids, offsets) in zip(conversations, self.encode_with_offsets(conversations)):
            end = len(conversation[-1]["content"])
            scores += self._risk_scores(ids, self._positions(text, offsets, conversation, [end]))
            tokens += len(ids)
        return scores, tokens

    def score_prefixes(self, queries: Sequence[PrefixQuery], method: str = "fast") -> list[PrefixScores]:
        """`fast`: one forward per response, every prefix read from it. `naive`: one forward per prefix, each read
        at the prefix's own last response token (the same numbers, by causality, where the guard tokenizes the
        prefix as the start of the whole response)."""
        _check_method(method)
        results = []
        for query in queries:
            context, cut = self.fit_context(query)
            if method == "naive":
                scores, tokens = self._score_whole(prefix_conversations(PrefixQuery(context, query.response, query.ends)))
            else:
                conversation = context + [{"role": "assistant", "content": query.response}]
                [(text, ids, offsets)] = self.encode_with_offsets([conversation])
                scores = self._risk_scores(ids, self._positions(text, offsets, conversation, query.ends))
                tokens = len(ids)
            results.append(PrefixScores(scores, context_cut=cut, guard_tokens=tokens))
        return results
