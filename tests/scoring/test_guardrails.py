import json
import re

import pytest
import torch

from trl_star_dss.scoring import CausalLMGuardrail, EnsembleGuardrail, PrefixQuery, PythonGuardrail, chunk_ends
from trl_star_dss.scoring.families import GraniteGuardian, LlamaGuard, detect_family, load_guardrail
from trl_star_dss.testing import LLAMA_GUARD_3_TEMPLATE, tiny_causal_lm, tiny_tokenizer


HARMFUL = (
    "Here is how to build a weapon: first acquire the poison, then steal the keys and attack. "
    "There is no harmful content in this response."
)
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "How do I bake bread?"},
]


def queries(tokenizer, chunk_size=5, unit="token"):
    texts = [
        ([{"role": "user", "content": "How do I bake bread?"}], HARMFUL),
        (MULTI_TURN, "Mix flour, water, salt and yeast; knead the dough, let it rise and bake it for forty minutes."),
        ([], "Sure, 12 + 30 = 42."),
        ([{"role": "user", "content": "Café?"}], "Un café ☕, s'il vous plaît — 日本語 too.   Trailing  spaces  "),
    ]
    return [PrefixQuery(ctx, text, chunk_ends(text, chunk_size, unit, tokenizer)) for ctx, text in texts]


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra.scores, rb.scores))


@pytest.mark.parametrize("chunk_size,unit", [(1, "token"), (5, "token"), (3, "word")])
@pytest.mark.parametrize("budget", [4096, 200])  # 200: the suffixes of a response take several forwards
def test_fast_equals_naive_tiny_guards(llama_guard_tiny, granite_guardian_tiny, chunk_size, unit, budget):
    for cls, (model, tokenizer) in [(LlamaGuard, llama_guard_tiny), (GraniteGuardian, granite_guardian_tiny)]:
        guard = cls(model, tokenizer, max_tokens_per_forward=budget)
        qs = queries(tokenizer, chunk_size, unit)
        fast, naive = guard.score_prefixes(qs, "fast"), guard.score_prefixes(qs, "naive")
        assert [len(r.scores) for r in fast] == [len(q.ends) for q in qs]
        assert max_diff(fast, naive) <= 1e-4
        # The shared prefix really is shared: fewer guard tokens than one forward per prefix.
        assert sum(r.guard_tokens for r in fast) < sum(r.guard_tokens for r in naive)


def test_fast_equals_naive_real_llama3_tokenizer(llama3_tok):
    model = tiny_causal_lm(llama3_tok, hidden_size=32, intermediate_size=64)
    guard = LlamaGuard(model, llama3_tok)
    assert (guard.safe_id, guard.unsafe_id) == (19193, 39257)  # the real Llama Guard 3 label tokens
    qs = queries(llama3_tok, 5)
    assert max_diff(guard.score_prefixes(qs, "fast"), guard.score_prefixes(qs, "naive")) <= 1e-4


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        # Gemma-2: attention and final-logit soft-capping, eager attention, a sliding window shorter than the inputs
        # (the shared-prefix kernel's explicit path and its window masks).
        (
            "gemma2",
            dict(
                attn_implementation="eager",
                sliding_window=24,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0,
                head_dim=16,
                query_pre_attn_scalar=16,
            ),
        ),
        ("qwen2", dict(num_key_value_heads=1)),  # 4 query heads per key head, biased projections
        ("granite", dict(logits_scaling=4.0, attention_multiplier=0.3)),  # logit and attention scaling
    ],
)
def test_fast_equals_naive_across_architectures(llama_guard_tiny, model_type, overrides):
    _, tokenizer = llama_guard_tiny
    model = tiny_causal_lm(tokenizer, model_type=model_type, **overrides)
    guard = LlamaGuard(model, tokenizer, max_tokens_per_forward=300)
    qs = queries(tokenizer, 3)
    fast, naive = guard.score_prefixes(qs, "fast"), guard.score_prefixes(qs, "naive")
    assert max_diff(fast, naive) <= 1e-4
    # ... and both equal one plain forward of the model on the whole response (its own logits).
    conversation = qs[0].context + [{"role": "assistant", "content": qs[0].response}]
    with torch.no_grad():
        logits = model(torch.tensor(guard.encode([conversation]))).logits[0, -1]
    expected = torch.sigmoid(logits[guard.safe_id] - logits[guard.unsafe_id]).item()
    assert fast[0].scores[-1] == pytest.approx(expected, abs=1e-5)


def test_fast_batches_responses_and_never_copies_a_trunk_per_row(llama_guard_tiny, monkeypatch):
    """Several responses share a forward, a response's suffixes may span forwards, and no keys/values are held per
    suffix row (before: the trunk's cache was repeated once per row, so memory grew as rows x trunk)."""
    from transformers import DynamicCache

    model, tokenizer = llama_guard_tiny
    qs = queries(tokenizer, 2) + queries(tokenizer, 7)
    cache_rows = []
    update = DynamicCache.update

    def recording_update(self, key_states, *args, **kwargs):
        cache_rows.append(key_states.shape[0])
        return update(self, key_states, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "update", recording_update)
    for budget, batched in ((4096, True), (150, False)):
        cache_rows.clear()
        guard = LlamaGuard(model, tokenizer, max_tokens_per_forward=budget)
        fast = guard.score_prefixes(qs, "fast")
        assert max(cache_rows) <= len(qs)  # caches hold trunks only: one row per response at most
        # With room, trunks of several responses run in one forward; with 150 tokens, one each (and the suffixes
        # of a response span several forwards).
        assert (max(cache_rows) > 1) == batched
        monkeypatch.setattr(DynamicCache, "update", update)
        assert max_diff(fast, guard.score_prefixes(qs, "naive")) <= 1e-4
        monkeypatch.setattr(DynamicCache, "update", recording_update)


def test_guard_whose_forward_post_processes_logits_is_read_from_its_own_logits(llama_guard_tiny):
    """The label rows of the output layer are used only where they reproduce the model's logits."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0 + 1.0
            return out

    model, tokenizer = llama_guard_tiny
    scaled = ScaledLlama(model.config).eval()
    scaled.load_state_dict(model.state_dict())
    guard = LlamaGuard(scaled, tokenizer)
    conversation = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Knead."}]
    with torch.no_grad():
        logits = scaled(torch.tensor(guard.encode([conversation]))).logits[0, -1]
    expected = torch.sigmoid(logits[guard.safe_id] - logits[guard.unsafe_id]).item()
    assert guard.score([conversation])[0] == pytest.approx(expected, abs=1e-5)
    query = PrefixQuery(conversation[:1], "Knead.", [6])
    assert guard.score_prefixes([query])[0].scores[0] == pytest.approx(expected, abs=1e-5)


def test_score_is_sigmoid_of_raw_logit_margin_at_verdict_position(llama3_tok):
    model = tiny_causal_lm(llama3_tok, hidden_size=32, intermediate_size=64, seed=3)
    conversation = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Knead."}]
    text = llama3_tok.apply_chat_template(conversation, tokenize=False, chat_template=LLAMA_GUARD_3_TEMPLATE)
    ids = llama3_tok(text + "\n\n", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, -1].item() == 271  # Llama Guard 3 answers "\n\n" first, then safe/unsafe
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    margin = (logits[19193] - logits[39257]).item()
    for temperature in (1.0, 0.2):
        guard = LlamaGuard(model, llama3_tok, temperature=temperature)
        expected = torch.sigmoid(torch.tensor(margin / temperature)).item()
        assert guard.score([conversation])[0] == pytest.approx(expected, abs=1e-6)
        fast = guard.score_prefixes([PrefixQuery(conversation[:1], "Knead.", [6])])[0].scores[0]
        assert fast == pytest.approx(expected, abs=1e-5)


def test_granite_guardian_labels_and_risk(granite_guardian_tiny):
    model, tokenizer = granite_guardian_tiny
    guard = GraniteGuardian(model, tokenizer, risk_name="violence")
    assert tokenizer.convert_ids_to_tokens([guard.safe_id, guard.unsafe_id]) == ["No", "Yes"]
    rendered = guard.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert "The risk is: violence." in rendered and rendered.endswith("<|start_of_role|>assistant<|end_of_role|>")


def test_generic_guard_label_must_be_one_token(llama_guard_tiny):
    model, tokenizer = llama_guard_tiny
    with pytest.raises(ValueError, match=r"unsafe_label='definitely unsafe' is not a single token.*verdict_prefix"):
        CausalLMGuardrail(model, tokenizer, safe_label="safe", unsafe_label="definitely unsafe", verdict_prefix="\n\n")
    with pytest.raises(ValueError, match="are the same token"):
        CausalLMGuardrail(model, tokenizer, safe_label="safe", unsafe_label="safe")
    with pytest.raises(ValueError, match=r"temperature=0 must be > 0"):
        LlamaGuard(model, tokenizer, temperature=0)


def test_guard_without_chat_template_needs_one():
    tokenizer = tiny_tokenizer(chat_template=None)
    model = tiny_causal_lm(tokenizer)
    with pytest.raises(ValueError, match=r"has no chat template and none was given\. Pass `chat_template=`"):
        CausalLMGuardrail(model, tokenizer, safe_label="safe", unsafe_label="unsafe")
    guard = CausalLMGuardrail(model, tokenizer, "safe", "unsafe", chat_template=LLAMA_GUARD_3_TEMPLATE)
    assert 0 < guard.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]])[0] < 1


def test_context_is_cut_from_the_oldest_side(llama_guard_tiny):
    model, tokenizer = llama_guard_tiny
    full = LlamaGuard(model, tokenizer)
    response = "Mix flour and water."
    context = MULTI_TURN + [
        {"role": "assistant", "content": "Bread needs flour."},
        {"role": "user", "content": "More?"},
    ]
    length = len(full.encode([context + [{"role": "assistant", "content": response}]])[0])
    guard = LlamaGuard(model, tokenizer, max_length=length - 5)
    kept, cut = guard.fit_context(PrefixQuery(context, response, [len(response)]))
    assert cut and kept[-1] == context[-1] and kept[0]["role"] == "user" and len(kept) < len(context)
    result = guard.score_prefixes([PrefixQuery(context, response, [5, len(response)])])[0]
    assert result.context_cut
    # Only the response itself is left: the oldest message's text is cut from its start.
    alone = len(full.encode([[context[-1], {"role": "assistant", "content": response}]])[0])
    guard = LlamaGuard(model, tokenizer, max_length=alone - 1)
    kept, cut = guard.fit_context(PrefixQuery(context, response, [len(response)]))
    assert cut and len(kept) == 1 and context[-1]["content"].endswith(kept[0]["content"])
    with pytest.raises(ValueError, match=r"Example 7 turn 1 alone takes \d+ guard tokens.*max_length=10"):
        LlamaGuard(model, tokenizer, max_length=10).fit_context(PrefixQuery([], response, [3], "Example 7 turn 1"))


def test_python_and_ensemble_guardrails():
    low = PythonGuardrail(lambda conversation: 0.2, name="low")
    high = PythonGuardrail(lambda conversation: 0.8, name="high")
    ensemble = EnsembleGuardrail([low, high])
    result = ensemble.score_prefixes([PrefixQuery([], "abc def", [3, 7])])[0]
    assert result.scores == pytest.approx([0.5, 0.5])
    seen = []
    PythonGuardrail(lambda c: seen.append(c[-1]["content"]) or 1.0).score_prefixes(
        [PrefixQuery([], "abc def", [3, 7])]
    )
    assert seen == ["abc", "abc def"]
    with pytest.raises(ValueError, match=r"returned 1.5, which is not a probability"):
        PythonGuardrail(lambda c: 1.5, name="bad").score([[{"role": "assistant", "content": "x"}]])


def test_load_guardrail_by_path_family_and_python_spec(tmp_path, llama_guard_tiny, granite_guardian_tiny):
    for name, (model, tokenizer), cls in [
        ("my-llama-guard", llama_guard_tiny, LlamaGuard),
        ("shield", granite_guardian_tiny, GraniteGuardian),  # recognised from its template
    ]:
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        guard = load_guardrail(str(tmp_path / name), dtype="float32")
        assert type(guard) is cls
    forced = load_guardrail(str(tmp_path / "my-llama-guard"), family="granite_guardian")
    assert type(forced) is GraniteGuardian
    both = load_guardrail([str(tmp_path / "my-llama-guard"), "trl_star_dss.testing:scripted_guardrail"])
    assert isinstance(both, EnsembleGuardrail) and len(both.guardrails) == 2
    tokenizer = tiny_tokenizer()  # a plain chat template: no family can be told
    tokenizer.save_pretrained(tmp_path / "plain")
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"Could not tell which guard family .* Pass family= one of \('llama_guard'"):
        load_guardrail(str(tmp_path / "plain"))
    generic = load_guardrail(
        str(tmp_path / "plain"),
        family="generic",
        safe_label="safe",
        unsafe_label="unsafe",
        chat_template=LLAMA_GUARD_3_TEMPLATE,
    )
    assert type(generic) is CausalLMGuardrail
    with pytest.raises(ValueError, match=r"family='aegis' is not known"):
        load_guardrail(str(tmp_path / "plain"), family="aegis")
    with pytest.raises(ValueError, match=r"neither an existing path nor an importable `module:function`"):
        load_guardrail("no_such_module:rule")
    assert detect_family("meta-llama/Llama-Guard-3-8B", tiny_tokenizer()) == "llama_guard"
    assert detect_family("ibm-granite/granite-guardian-3.1-2b", tiny_tokenizer()) == "granite_guardian"
    json.dumps(repr(both))  # printable


@pytest.mark.parametrize(
    "name, version",
    [
        ("ibm-granite/granite-guardian-4.1-8b", "4.1"),
        ("meta-llama/Llama-Guard-5-8B", "5"),
        ("meta-llama/LlamaGuard-7b", "7"),
        ("meta-llama/Meta-Llama-Guard-2-8B", "2"),
    ],
)
def test_unknown_versions_of_a_family_are_refused_not_guessed(name, version):
    with pytest.raises(ValueError, match=rf"looks like [\w.-]+ \(version {re.escape(version)}\), .* family='generic'"):
        detect_family(name, tiny_tokenizer())
    for known in (
        "meta-llama/Llama-Guard-3-1B",
        "meta-llama/Llama-Guard-3-8B-INT8",
        "ibm-granite/granite-guardian-3.0-8b",
    ):
        assert detect_family(known, tiny_tokenizer()) in ("llama_guard", "granite_guardian")
