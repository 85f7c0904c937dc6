"""The `star` column is input (issue 25): one check of its records before any model step, in the TRL trainer, the
Axolotl plugin and `star-dss show`; and one cache id for a guard's scores on every path."""

import copy
import json
import math

import pytest
from datasets import Dataset

from trl_star_dss.config import STARDSSConfig
from trl_star_dss.scoring import PythonGuardrail, score_dataset
from trl_star_dss.testing import scripted_guardrail, tiny_causal_lm, tiny_tokenizer
from trl_star_dss.trainer import STARDSSTrainer
from trl_star_dss.weights import check_star_records


RESPONSE = "Mix flour, water, salt and yeast, then bake it."


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scored(tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"How do I bake bread {i}?"},
                {"role": "assistant", "content": RESPONSE},
            ]
        }
        for i in range(4)
    ]
    return score_dataset(
        Dataset.from_list(rows),
        PythonGuardrail(scripted_guardrail),
        tokenizer,
        chunk_size=3,
        progress=False,
        audit=False,
    )[0]


def _args(tmp_path, **overrides):
    return STARDSSConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        assistant_only_loss=True,
        **overrides,
    )


def _broken(scored, change):
    """`scored` with example 2's record changed by `change(record)`."""
    column = copy.deepcopy(list(scored["star"]))
    change(column[2][0])
    return scored.remove_columns("star").add_column("star", column)


def _set(key, value):
    return lambda record: record.__setitem__(key, value)


# Each bad record the issue reports (and a few more), and what the error says about it.
BAD = {
    "score 1.5": (lambda r: r["scores"].__setitem__(0, 1.5), r"scores\[0\] = 1\.5 is not a probability in \[0, 1\]"),
    "score -0.1": (lambda r: r["scores"].__setitem__(0, -0.1), r"scores\[0\] = -0\.1 is not a probability"),
    "NaN score": (lambda r: r["scores"].__setitem__(1, math.nan), r"scores\[1\] = nan is not a probability"),
    "infinite score": (lambda r: r["scores"].__setitem__(1, math.inf), r"scores\[1\] = inf is not a probability"),
    "end past the response": (
        lambda r: r["chunk_ends"].__setitem__(-1, len(RESPONSE) + 50),
        rf"chunk_ends\[-1\] = {len(RESPONSE) + 50} is past the end of the response "
        rf"\({len(RESPONSE)} characters\)",
    ),
    "ends out of order": (lambda r: r["chunk_ends"].reverse(), r"chunk_ends are not strictly increasing"),
    "end repeated": (lambda r: r["chunk_ends"].__setitem__(1, r["chunk_ends"][0]), r"not strictly increasing"),
    "end zero": (lambda r: r["chunk_ends"].__setitem__(0, 0), r"chunk_ends\[0\] = 0 is not a positive whole number"),
    "end fractional": (lambda r: r["chunk_ends"].__setitem__(0, 2.5), r"chunk_ends\[0\] = 2\.5 is not a positive"),
    "more ends than scores": (
        lambda r: r["chunk_ends"].append(len(RESPONSE) + 1),
        r"has \d+ chunk_ends but \d+ scores",
    ),
    "more scores than ends": (lambda r: r["scores"].append(0.5), r"has \d+ chunk_ends but \d+ scores"),
    "no ends": (lambda r: (r["chunk_ends"].clear(), r["scores"].clear()), r"has no chunk_ends"),
    "turn is the user": (_set("turn", 0), r"turn 0 is messages\[0\], a 'user' message, not an assistant response"),
    "turn past the messages": (_set("turn", 7), r"turn 7 is not a message \(the example has 2 in messages\)"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_trl_trainer_refuses_a_bad_star_record_before_any_model_step(tmp_path, tokenizer, scored, name):
    change, message = BAD[name]
    with pytest.raises(ValueError, match=rf"Example 2: the `star` record of turn .*{message}"):
        STARDSSTrainer(
            tiny_causal_lm(tokenizer),
            args=_args(tmp_path),
            train_dataset=_broken(scored, change),
            processing_class=tokenizer,
        )


def test_rejection_sampling_checks_the_records_too(tmp_path, tokenizer, scored):
    with pytest.raises(ValueError, match=r"Example 2: .*scores\[1\] = nan is not a probability"):
        STARDSSTrainer(
            tiny_causal_lm(tokenizer),
            args=_args(tmp_path, shaping="rejection_sampling"),
            train_dataset=_broken(scored, lambda r: r["scores"].__setitem__(1, math.nan)),
            processing_class=tokenizer,
        )


def test_good_records_pass_and_structural_errors_are_named():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    responses = [None, "Hello"]
    check_star_records([{"turn": 1, "chunk_ends": [3, 5], "scores": [0.0, 1]}], responses, 0)
    with pytest.raises(ValueError, match=r"Example 5: the `star` value is None, not a list of records"):
        check_star_records(None, responses, 5)
    with pytest.raises(ValueError, match=r"Example 5: the `star` record 0 is 3, not a dict"):
        check_star_records([3], responses, 5)
    with pytest.raises(ValueError, match=r"Example 5: the `star` record 0 has no 'scores'"):
        check_star_records([{"turn": 1, "chunk_ends": [5]}], responses, 5)
    with pytest.raises(ValueError, match=r"Example 5: the `star` record of turn 1: two records for turn 1"):
        check_star_records([{"turn": 1, "chunk_ends": [5], "scores": [1.0]}] * 2, responses, 5)
    # Values Arrow would not store in one column, but a list of dicts (Axolotl's look-up, hand-made records) can hold.
    with pytest.raises(ValueError, match=r"of turn 1: scores\[0\] = '0\.5' is not a probability in \[0, 1\]"):
        check_star_records([{"turn": 1, "chunk_ends": [5], "scores": ["0.5"]}], responses, 5)
    with pytest.raises(ValueError, match=r"of turn True: turn True is not a whole number"):
        check_star_records([{"turn": True, "chunk_ends": [5], "scores": [1.0]}], responses, 5)
    with pytest.raises(ValueError, match=r"of turn 0: turn 0 is messages\[0\], a 'user' message, not an assistant"):
        check_star_records(
            [{"turn": 0, "chunk_ends": [2], "scores": [1.0]}], responses, 5, roles=["user", "assistant"]
        )
    assert messages  # the responses above are these messages' texts


# -- one cache id ----------------------------------------------------------------------------------------------------


def test_readme_score_from_python_then_start_up_scoring_runs_no_guard_forward(tmp_path, tokenizer, monkeypatch):
    """The README's "Score a dataset" Python block (a guard loaded from its path), then `STARDSSTrainer` with
    `guardrail=[path]` and `star_scores_dir=` the same directory: the scores are reused, no guard is loaded or run."""
    import trl_star_dss.scoring.families as families
    from trl_star_dss import load_guardrail
    from trl_star_dss.testing import tiny_guard

    model, guard_tokenizer = tiny_guard("llama_guard")
    path = str(tmp_path / "guard")
    model.save_pretrained(path)
    guard_tokenizer.save_pretrained(path)
    dataset = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": RESPONSE}]}
            for i in range(4)
        ]
    )

    # README, "Score a dataset" (the Python block)
    guard = load_guardrail(path)
    scored, summary = score_dataset(dataset, guard, tokenizer, chunk_size=5, output_dir=str(tmp_path / "scored"))
    assert summary.scored_now == 4

    def no_guard(*args, **kwargs):
        raise AssertionError("start-up scoring loaded the guard: it did not reuse the README block's scores")

    monkeypatch.setattr(families, "load_guardrail", no_guard)
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer),
        args=_args(tmp_path / "run", guardrail=[path], star_scores_dir=str(tmp_path / "scored")),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.train_dataset is not None


def test_cache_of_other_settings_names_the_setting_the_user_set(tmp_path, tokenizer, scored):
    dataset = scored.remove_columns("star")
    score_dataset(
        dataset,
        PythonGuardrail(scripted_guardrail, name="rule"),
        tokenizer,
        output_dir=str(tmp_path / "d"),
        progress=False,
    )
    with pytest.raises(ValueError, match=r"star_scores_dir='.*d' holds STAR scores made with other settings") as error:
        STARDSSTrainer(
            tiny_causal_lm(tokenizer),
            args=_args(
                tmp_path / "run",
                guardrail=["trl_star_dss.testing:scripted_guardrail"],
                star_scores_dir=str(tmp_path / "d"),
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    assert "output_dir=" not in str(error.value)


def test_guard_objects_carry_the_id_every_path_uses(tmp_path):
    from trl_star_dss.scoring.families import deferred_guardrail, load_guardrail

    spec = "trl_star_dss.testing:scripted_guardrail"
    assert load_guardrail(spec).id == deferred_guardrail(spec)[1] == deferred_guardrail([spec])[1]
    assert load_guardrail(spec, temperature=0.2).id == deferred_guardrail([spec], temperature=0.2)[1]
    assert load_guardrail([spec, spec]).id == deferred_guardrail([spec, spec])[1]
    assert load_guardrail(spec).id != load_guardrail(spec, temperature=0.2).id
    # A guard built in code: its name and settings; another function, another id.
    assert PythonGuardrail(scripted_guardrail).id != PythonGuardrail(lambda c: 1.0).id
    assert json.loads(PythonGuardrail(scripted_guardrail, name="rule").id)["guardrail"] == ["rule"]
