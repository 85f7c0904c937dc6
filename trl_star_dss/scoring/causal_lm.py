"""Guardrails: classifier LLMs (or plain Python rules) that say how safe an assistant response is. The named
families (Llama Guard, Granite Guardian, ...) and `load_guardrail` are in `families.py`.

Every guardrail answers one question: for a conversation whose last message is an assistant response, what is
P(safe)? For causal-LM guards this is read from the raw next-token logits at the verdict position
(docs/method.md, "STAR: a safety score for every prefix of a response", paper section 3):

    STAR = sigmoid((z_safe - z_unsafe) / T)

`score_prefixes` asks it for every prefix of a response at once. The naive way runs one full guard forward per
prefix (as the paper authors' code does); `CausalLMGuardrail` also has a shared-prefix way that runs the prompt and
the whole response once and lets each prefix's closing suffix attend only to the response up to its cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from ..errors import STARDSSError
from ..formats import Conversation
from .guardrail import PrefixQuery, PrefixScores, _check_method, prefix_conversations
from .template import TemplatedGuardrail


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
            (docs/method.md, "STAR: a safety score for every prefix of a response"); with two it is sigmoid((z_safe - z_unsafe) / T), the same number.
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
        super().__init__(
            model, tokenizer, chat_template, template_kwargs, verdict_prefix, temperature, max_length, batch_size, name
        )
        self.max_tokens_per_forward = max_tokens_per_forward
        self.safe_id = self._label_id(safe_label, "safe_label")
        self.unsafe_id = self._label_id(unsafe_label, "unsafe_label")
        others = dict(other_labels or {})
        self.label_ids = [self.safe_id, self.unsafe_id] + [self._label_id(x, "other_labels") for x in others]
        self.safe_labels = [True, False, *(bool(safe) for safe in others.values())]
        if len(set(self.label_ids)) != len(self.label_ids):
            raise STARDSSError(
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
            raise STARDSSError(
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
            from ..heads import OutputHead, output_head, output_head_matches

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

        from ..heads import text_backbone
        from .shared_prefix import shared_prefix_attention

        device = self.model.device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()} | {"use_cache": False}
        rows, ends = torch.arange(len(ends)), ends.to(device)
        head = self._label_head()
        attention = shared_prefix_attention(self.model, shared_prefix) if shared_prefix else contextlib.nullcontext({})
        with torch.inference_mode(), attention as trunks:
            inputs |= trunks
            if head is not None:
                hidden = text_backbone(self.model)(**inputs).last_hidden_state
                logits = head.logits(hidden[rows, ends])
            else:  # only the scored positions are projected (the model's own head)
                keep = torch.unique(ends)
                logits = self.model(**inputs, logits_to_keep=keep).logits[rows, torch.searchsorted(keep, ends)]
                logits = logits[:, self.label_ids].float()
        if (
            len(self.label_ids) == 2
        ):  # the paper's formula (docs/method.md, "STAR: a safety score for every prefix of a response")
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
        `max_tokens_per_forward` (docs/method.md, "The scoring engine"). `encoded[q]` holds response q's guard tokens, one list per
        prefix, the last being the whole response. Returns, per response, its scores and the guard tokens run."""
        plans = [_split_prefixes(ids) for ids in encoded]
        results: list = [None] * len(plans)
        budget, limit = self.max_tokens_per_forward, _shared_prefix_limit(self.model)
        batch: list[int] = []
        for q, (trunk, _starts, _suffixes) in enumerate(plans):
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
            self.model(
                input_ids=input_ids.to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                attention_mask=(torch.arange(input_ids.size(1))[None] <= ends[:, None]).long().to(device),
            )
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
            spans = [
                (e, first_row, first_row + examples.count(e))
                for first_row, e in enumerate(examples)
                if first_row == 0 or examples[first_row - 1] != e
            ]
            shared = SharedPrefix(cache, spans, starts, input_ids.size(1))
            positions = starts[:, None] + torch.arange(input_ids.size(1), device=device)
            scores += self._scores_at(row_ends, shared, input_ids=input_ids, position_ids=positions)
            first = end
        for q in batch:
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


def one_token_after(tokenizer, text: str, label: str) -> int | None:
    """The token id `label` adds when `text + label` tokenizes as `text`'s tokens and exactly one more; else None."""
    before = tokenizer(text, add_special_tokens=False)["input_ids"]
    after = tokenizer(text + label, add_special_tokens=False)["input_ids"]
    return after[-1] if after[: len(before)] == before and len(after) == len(before) + 1 else None


def _split_prefixes(ids: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Split one response's prefix encodings (the last is the whole response) into a shared trunk and, per prefix,
    `(start, suffix)` with `prefix == trunk[:start] + suffix`: `start` is where the prefix first differs from the whole
    response's tokens, usually the cut, earlier where the tokenizer merges across it. So sharing is exact by
    construction (docs/method.md, "The scoring engine": where tokenization at a cut differs, the suffix simply starts earlier)."""
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
