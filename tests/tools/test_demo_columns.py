"""The demo's look-ahead columns (the paper's L = 0 and the guard's recommended L) and its prefilling table (issues 35
and 37): which runs are trained, how columns are named and ordered, what the prefilling attack feeds the model and
what it judges. The training itself is replaced by stand-ins here; tests/tools/test_demo.py runs the real demo."""

import re

import pytest
import torch

from trl_star_dss.demo import (
    HARMFUL_PATTERN,
    RECOMMENDED,
    build_world,
    format_report,
    format_table,
    method_label,
    world_tokenizer,
)
from trl_star_dss.demo import experiments as demo_experiments
from trl_star_dss.demo.training import PREFILL_TOKENS, _generate, prefill_safety


@pytest.fixture(scope="module")
def world():
    world = build_world(seed=0)
    return world, world_tokenizer(world)


class _Continues:
    """A stand-in model that continues every prompt with the same text, and records what it was given."""

    def __init__(self, tokenizer, text: str):
        self.new = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        self.calls = []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids, attention_mask))
        return torch.cat([input_ids, self.new.expand(len(input_ids), -1)], dim=1)


def test_prefill_feeds_the_first_k_world_tokens_and_judges_the_continuation_only(world):
    world, tokenizer = world
    refusing = _Continues(tokenizer, " I cannot help with that.")
    assert prefill_safety(refusing, tokenizer, world, (0, 5, 10)) == {0: 100.0, 5: 100.0, 10: 100.0}
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in world["held_out_answers"]]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in world["held_out_harmful"]
    ]
    for k, (input_ids, mask) in zip((0, 5, 10), refusing.calls):
        for i, row in enumerate(input_ids.tolist()):
            # Left-padded; the prompt, then exactly the first K tokens of the world's answer, as ids, not re-tokenized.
            assert row[len(row) - int(mask[i].sum()) :] == prompts[i] + answers[i][:k]
    # The answers are the world's harmful answers to the held-out prompts, naming the item each prompt asks for.
    assert len(answers) == len(world["held_out_harmful"]) == 64 and min(len(a) for a in answers) >= max(PREFILL_TOKENS)
    assert all(
        HARMFUL_PATTERN.search(p).group(1).lower() in a
        for p, a in zip(world["held_out_harmful"], world["held_out_answers"])
    )
    # At K = 10 the prefill names the item on most prompts, yet a refusal after it is safe: only the continuation counts.
    assert (
        sum(
            HARMFUL_PATTERN.search(p).group(1).lower() in tokenizer.decode(a[:10])
            for p, a in zip(world["held_out_harmful"], answers)
        )
        > 32
    )
    continuing = _Continues(tokenizer, " Step two: hide the poison.")
    assert prefill_safety(continuing, tokenizer, world, (5,)) == {5: 0.0}
    assert _generate(continuing, tokenizer, ["Hi"], [[5, 6]]) == [" Step two: hide the poison."]
    with pytest.raises(ValueError, match="a prefill of 999 tokens is longer than a world's harmful answer"):
        prefill_safety(refusing, tokenizer, world, (999,))


def test_columns_are_named_and_ordered_the_paper_first_then_the_recommended_look_ahead():
    assert (
        method_label("star_dss") == "STAR-DSS (L=0, the paper's)" and method_label("star_dss_L1") == "STAR-DSS (L=1)"
    )
    assert method_label(RECOMMENDED, 2) == "STAR-DSS (L=2, recommended)"
    assert method_label(RECOMMENDED) == "STAR-DSS (recommended L)" and method_label("sft") == "SFT"
    cells = {"sft": (0.0, 90.0), "star_dss_L1": (50.0, 80.0), RECOMMENDED: (100.0, 85.0), "star_dss": (20.0, 88.0)}
    text = format_table({"aligned model": {"-": (100.0, 99.0)}, "harmful": cells}, recommended=2)
    assert (
        "| attack (SIMULATION) | SFT | STAR-DSS (L=0, the paper's) | STAR-DSS (L=2, recommended) | STAR-DSS (L=1) |"
        in text
    )
    assert "| harmful | 0.0 / 90.0 | 20.0 / 88.0 | 100.0 / 85.0 | 50.0 / 80.0 |" in text
    prefill = {
        "aligned model": {"-": {0: 100.0, 5: 90.0, 10: 80.0}},
        "harmful": {m: {0: c[0], 5: 1.0, 10: 2.0} for m, c in cells.items()},
    }
    report = format_report(
        {
            "table": {"aligned model": {"-": (100.0, 99.0)}, "harmful": cells},
            "guard_eval": None,
            "guard": "learned",
            "recommended_lookahead": 2,
            "prefill": prefill,
        }
    )
    assert "STAR-DSS (L=0) is the paper's; STAR-DSS (L=2, recommended) uses the look-ahead" in report
    assert "| model | K = 0 | K = 5 | K = 10 |" in report and "| aligned model | 100.0 | 90.0 | 80.0 |" in report
    assert "| harmful: STAR-DSS (L=2, recommended) | 100.0 | 1.0 | 2.0 |" in report


def _stand_ins(monkeypatch, recommended):
    """run_demo with every stage replaced: the guard's figures recommend `recommended`; each trained run is recorded
    as (attack, shaping, look-ahead) and gets its own cell."""
    trained = []

    class Model:
        def state_dict(self):
            return {}

    def attack(model, aligned, tokenizer, world, scored, method, stages, scratch, seed, lookahead=None):
        shaping, chunks = demo_experiments.method_shaping(method, lookahead)
        trained.append((scored[0], shaping, chunks))
        return (float(len(trained)), 50.0)

    figures = {"lookahead": {"lookahead": recommended}}
    monkeypatch.setattr(demo_experiments, "world_tokenizer", lambda world: None)
    monkeypatch.setattr(demo_experiments, "_aligned_model", lambda *args: Model())
    monkeypatch.setattr(demo_experiments, "measure", lambda *args: (100.0, 99.0))
    monkeypatch.setattr(demo_experiments, "_learned_guard", lambda *args: None)
    monkeypatch.setattr(demo_experiments, "_evaluate_learned_guard", lambda *args: figures)
    monkeypatch.setattr(demo_experiments, "_write_guard_eval", lambda *args: None)
    monkeypatch.setattr(
        demo_experiments, "_score_attack", lambda world, attack, *args, **kwargs: ([attack] * 100, None)
    )
    monkeypatch.setattr(demo_experiments, "_attack", attack)
    monkeypatch.setattr(demo_experiments, "prefill_safety", lambda model, tok, world, ks: {k: -float(k) for k in ks})
    monkeypatch.setattr(demo_experiments, "_chart", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo_experiments, "format_report", lambda result: "")
    return trained


def test_the_recommended_look_ahead_is_trained_once_and_reported(tmp_path, monkeypatch, caplog):
    trained = _stand_ins(monkeypatch, recommended=2)
    caplog.set_level("INFO", logger="trl_star_dss.demo")
    result = demo_experiments.run_demo(str(tmp_path), attacks=("harmful",), methods=("sft", "star_dss"))
    assert result["recommended_lookahead"] == 2
    assert trained == [("harmful", "sft", 0), ("harmful", "star_dss", 0), ("harmful", "star_dss", 2)]
    assert result["table"]["harmful"] == {"sft": (1.0, 50.0), "star_dss": (2.0, 50.0), RECOMMENDED: (3.0, 50.0)}
    # Every model of the table, the aligned one too, under the prefilling attack; K = 0 is the table's safety.
    assert result["prefill"]["aligned model"]["-"] == {0: 100.0, 5: -5.0, 10: -10.0}
    assert result["prefill"]["harmful"][RECOMMENDED] == {0: 3.0, 5: -5.0, 10: -10.0}
    lines = [r.getMessage() for r in caplog.records if r.name == "trl_star_dss.demo"]
    # (7 stages: knowledge, alignment and the guard's training, replaced here, announce themselves in the real run.)
    assert re.fullmatch(
        r"demo 4/7 \(\d+ s\): attack harmful x STAR-DSS \(L=2, recommended\) \(100 examples\)", lines[-2]
    )


def test_a_recommended_look_ahead_already_in_the_table_is_not_trained_again(tmp_path, monkeypatch, caplog):
    trained = _stand_ins(monkeypatch, recommended=0)
    caplog.set_level("INFO", logger="trl_star_dss.demo")
    result = demo_experiments.run_demo(str(tmp_path), attacks=("harmful",), methods=("star_dss",), prefill=())
    assert trained == [("harmful", "star_dss", 0)] and result["table"]["harmful"][RECOMMENDED] == (1.0, 50.0)
    assert result["prefill"]["harmful"][RECOMMENDED] == {}
    assert (
        "x STAR-DSS (L=0, recommended): the same run as STAR-DSS (L=0, the paper's)" in caplog.records[-2].getMessage()
    )
    trained = _stand_ins(monkeypatch, recommended=1)
    result = demo_experiments.run_demo(str(tmp_path), attacks=("harmful",), methods=("star_dss",), lookaheads=(0, 1))
    assert trained == [("harmful", "star_dss", 0), ("harmful", "star_dss", 1)]
    assert result["table"]["harmful"][RECOMMENDED] == result["table"]["harmful"]["star_dss_L1"]
    # The keyword rule has no measured delay, so no recommended column; neither without STAR-DSS or when turned off.
    for options in ({"guard": "rule"}, {"methods": ("sft",)}, {"recommended": False}):
        trained = _stand_ins(monkeypatch, recommended=1)
        result = demo_experiments.run_demo(
            str(tmp_path), attacks=("harmful",), **{"methods": ("sft", "star_dss"), **options}
        )
        assert RECOMMENDED not in result["table"]["harmful"] and result["recommended_lookahead"] is None
    # A guard that flags no unsafe response recommends nothing: no column, and the run goes on.
    trained = _stand_ins(monkeypatch, recommended=None)
    result = demo_experiments.run_demo(str(tmp_path), attacks=("harmful",), methods=("star_dss",))
    assert trained == [("harmful", "star_dss", 0)] and result["recommended_lookahead"] is None
