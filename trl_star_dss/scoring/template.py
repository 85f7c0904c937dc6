"""Rendering a conversation through a guard's chat template (docs/method.md, "STAR: a safety score for every prefix of a response", 2.1): message content is always
text to the guard (a special-token string inside it never becomes a special token), in the shape the template reads
(a string or a list of text parts), and a rendered input must hold what the guard is asked to judge. Causal-LM and
token-level guards both render this way."""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

from ..errors import STARDSSError
from ..formats import Conversation
from ..special_tokens import first_special_token, special_token_pattern, special_token_strings
from .audit import TemplateMarkers
from .guardrail import Guardrail, PrefixQuery


# A numbered stand-in for a message's content (private-use code points, which no template writes): rendering a
# conversation with stand-ins shows where the template puts each content (`CausalLMGuardrail.content_spans`).
_SLOT = "\ue000{}\ue001"
_SLOT_SPLIT = re.compile("\ue000(\\d+)\ue001")


class TemplatedGuardrail(Guardrail):
    """What every model guard shares: the conversation rendered with the guard's chat template, message content
    always read as text (docs/method.md, "Adversarial data: the threat model is the uploader"), and the oldest context cut to fit the guard. Subclasses read the
    verdict: `CausalLMGuardrail` from the next-token logits of its label tokens, `TokenLevelGuardrail` from a
    per-token classifier."""

    generation_prompt = True  # render the assistant's turn to come (the verdict) after the conversation

    def __init__(
        self,
        model,
        tokenizer,
        chat_template: str | None = None,
        template_kwargs: dict | None = None,
        verdict_prefix: str = "",
        temperature: float = 1.0,
        max_length: int | None = None,
        batch_size: int = 8,
        name: str | None = None,
    ):
        if not temperature > 0:
            raise STARDSSError(f"temperature={temperature} must be > 0 (it divides the logits). Use e.g. 1.0.")
        if chat_template is None and tokenizer.chat_template is None:
            raise STARDSSError(
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
        return {
            "chat_template": self.chat_template,
            "template_kwargs": self.template_kwargs,
            "verdict_prefix": self.verdict_prefix,
            "temperature": self.temperature,
            "max_length": self.max_length,
            "labels": getattr(self, "label_ids", None),
            "safe_labels": getattr(self, "safe_labels", None),
            "controversial": getattr(self, "controversial", None),
        }

    # -- rendering -----------------------------------------------------------------------------------------------

    def _template_name(self) -> str:
        return "the chat_template= given" if self.chat_template is not None else "its tokenizer's chat template"

    def _detect_content_shape(self) -> str:
        """How the template reads a message's content (docs/method.md, "STAR: a safety score for every prefix of a response", issue 24): `"string"` or `"parts"` (a list
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
            raise STARDSSError(
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
        """The guard's token ids of each conversation. Message content is always text (docs/method.md, "Adversarial data: the threat model is the uploader"): a
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
        return [
            (text, *self._content_as_text(conversation, text, ids, [tuple(o) for o in offsets]))
            for conversation, text, ids, offsets in zip(
                conversations, texts, encoded["input_ids"], encoded["offset_mapping"]
            )
        ]

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
            piece = self.tokenizer(
                text[starts[first] : ends[last]],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            out += ids[done:first] + piece["input_ids"]
            out_offsets += offsets[done:first] + [
                (a + starts[first], b + starts[first]) for a, b in piece["offset_mapping"]
            ]
            done = last + 1
        return out + ids[done:], out_offsets + offsets[done:]

    def _refuse_special_content(self, conversation: Conversation, reason: str) -> None:
        hit = first_special_token(conversation, self._special_pattern)
        if hit is not None:
            raise STARDSSError(
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

    def _response_span(self, text: str, conversation: Conversation) -> tuple[int, int, int]:
        """Where the response (the last message) lies in `text`, its rendering: `(start, stop, lead)`, with `lead` the
        characters the template stripped from the response's front."""
        spans = self.content_spans(conversation, text)
        if spans is None:
            raise STARDSSError(
                f"The chat template of guard {self.name!r} does not write the response verbatim, so its tokens cannot "
                "be matched to the prefixes' characters (a token-level guard or a probe reads each prefix at a guard "
                "token). Pass a `chat_template=` that does."
            )
        start, stop = spans[-1]
        return start, stop, conversation[-1]["content"].find(text[start:stop])

    def response_positions(self, text: str, offsets, conversation: Conversation, ends: Sequence[int]) -> list[int]:
        """The guard token at which each prefix `response[:end]` is read, for guards that read every prefix from one
        forward (token-level guards, probes; docs/method.md, "The scoring engine"): the last token that ends at or
        before the cut (a token straddling the cut holds text after it, so it is not inside the prefix); before the
        first whole token, the token before the response. `text` and `offsets` are `encode_with_offsets`'s."""
        start, stop, lead = self._response_span(text, conversation)
        token_ends = [b for _, b in offsets]
        return [bisect.bisect_right(token_ends, start + min(max(end - lead, 0), stop - start)) - 1 for end in ends]

    def response_token_ends(self, text: str, offsets, conversation: Conversation) -> list[int]:
        """The end, as a character offset in the response, of each guard token that lies wholly inside the response
        and ends after its first character: the prefixes a guard token closes."""
        start, stop, lead = self._response_span(text, conversation)
        return sorted({b - start + lead for a, b in offsets if start <= a and b <= stop and b > start})

    def _checked_renders(self, conversations: Sequence[Conversation]) -> list[str]:
        """Each conversation rendered, refused unless the guard input holds what the guard is asked to judge
        (docs/method.md, "STAR: a safety score for every prefix of a response", "What the guard reads"): the last message (the response, or the prefix of it, being
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
            what = "; ".join(
                f"message {i} ({conversation[i]['role']}"
                f"{', the response being scored' if i == len(conversation) - 1 else ''}): "
                f"{_preview(conversation[i]['content'])}"
                for i in missing
            )
            raise STARDSSError(
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
            raise STARDSSError(
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


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _context_length(model, tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 10_000_000:  # transformers' "no limit" sentinel is ~1e30
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
    return int(limit)
