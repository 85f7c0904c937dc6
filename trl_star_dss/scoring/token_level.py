"""Token-level guards (Qwen3Guard-Stream): one forward per response gives a verdict at every token, so STAR at
any chunk size costs one forward (docs/method.md, "The scoring engine")."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import STARDSSError
from ..formats import Conversation
from .guardrail import PrefixQuery, PrefixScores, _check_method, check_controversial, prefix_conversations
from .template import TemplatedGuardrail


# Qwen3Guard's risk classes, in the order of its risk-level logits: `label_map` in QwenLM/Qwen3Guard
# `eval/eval_stream.py` (commit 6a52eca), the same map the remote code exposes as `response_risk_level_map`.
QWEN3GUARD_CLASSES = ("Safe", "Unsafe", "Controversial")


class TokenLevelGuardrail(TemplatedGuardrail):
    """A guard that classifies every token of a response as it streams (Qwen3Guard-Stream 0.6B/4B/8B), read in
    one forward per response (docs/method.md, "The scoring engine").

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

    def __init__(
        self,
        model,
        tokenizer,
        controversial: str = "unsafe",
        chat_template: str | None = None,
        template_kwargs: dict | None = None,
        temperature: float = 1.0,
        max_length: int | None = None,
        name: str | None = None,
    ):
        template_kwargs = {"enable_thinking": False, **(template_kwargs or {})}
        super().__init__(model, tokenizer, chat_template, template_kwargs, "", temperature, max_length, 1, name)
        self.controversial = check_controversial(controversial)
        classes = getattr(model, "response_risk_level_map", None) or dict(enumerate(QWEN3GUARD_CLASSES))
        if [classes[i] for i in sorted(classes)] != list(QWEN3GUARD_CLASSES):
            raise STARDSSError(
                f"The token-level guard {self.name!r} names its risk classes {classes}, not Qwen3Guard-Stream's "
                f"{dict(enumerate(QWEN3GUARD_CLASSES))}, so which logit is safe is not known here. Map its classes "
                "to these indices, or report the guard."
            )
        if not tokenizer.is_fast:
            raise STARDSSError(
                f"The token-level guard {self.name!r} needs a fast tokenizer: it maps the policy's chunk ends to guard "
                "tokens by their character offsets."
            )
        self._safe_classes = [0, 2] if controversial == "safe" else [0]

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
            scores += self._risk_scores(ids, self.response_positions(text, offsets, conversation, [end]))
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
                scores, tokens = self._score_whole(
                    prefix_conversations(PrefixQuery(context, query.response, query.ends))
                )
            else:
                conversation = context + [{"role": "assistant", "content": query.response}]
                [(text, ids, offsets)] = self.encode_with_offsets([conversation])
                scores = self._risk_scores(ids, self.response_positions(text, offsets, conversation, query.ends))
                tokens = len(ids)
            results.append(PrefixScores(scores, context_cut=cut, guard_tokens=tokens))
        return results
