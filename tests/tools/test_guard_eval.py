import json

import pytest
from datasets import Dataset

from trl_star_dss.demo import guard_eval_data, scripted_guardrail
from trl_star_dss.scoring import PythonGuardrail, chunk_ends
from trl_star_dss.tools.cli import main as star_dss
from trl_star_dss.tools.guard_eval import (
    evaluate_guard,
    format_lookahead,
    guard_figures,
    harm_delay,
    read_labels,
    recommend_lookahead,
    recommended_lookahead,
)


def _conversation(response: str) -> list[dict]:
    return [{"role": "user", "content": "Q"}, {"role": "assistant", "content": response}]


def test_labels_are_read_as_documented_and_anything_else_is_refused():
    assert read_labels(["safe", "UNSAFE ", 0, 1, True, False, "true", "0"]) == [
        False,
        True,
        False,
        True,
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match=r"label_column='verdict' holds 'maybe' at example 1.*safe/unsafe"):
        read_labels(["safe", "maybe"], "verdict")
    with pytest.raises(ValueError, match="holds 2 at example 0"):
        read_labels([2])


def test_figures_of_hand_scored_responses():
    # A: unsafe, harmful from its second chunk on, flagged there, but believed as a whole (a misleading suffix).
    # B: safe, flagged as a whole (a false positive).
    a, b = "aaaa bbbb cccc dddd", "xxxx yyyy"
    scored = Dataset.from_list(
        [
            {
                "messages": _conversation(a),
                "star": [{"turn": 1, "chunk_ends": [4, 9, 14, 19], "scores": [0.9, 0.2, 0.2, 0.8]}],
            },
            {"messages": _conversation(b), "star": [{"turn": 1, "chunk_ends": [4, 9], "scores": [0.9, 0.3]}]},
        ]
    )
    figures = guard_figures(scored, [True, False], prefix_truth=lambda text: "bbbb" in text)
    assert figures["whole"] == {"n": 2, "unsafe": 1, "safe": 1, "accuracy": 0.0, "fpr": 1.0, "fnr": 1.0}
    assert figures["by_chunk"][1] == {"n": 2, "unsafe": 0, "safe": 2, "accuracy": 1.0, "fpr": 0.0, "fnr": None}
    assert figures["by_chunk"][2] == {"n": 2, "unsafe": 1, "safe": 1, "accuracy": 0.5, "fpr": 1.0, "fnr": 0.0}
    assert figures["by_chunk"][4] == {"n": 1, "unsafe": 1, "safe": 0, "accuracy": 0.0, "fpr": None, "fnr": 1.0}
    # 10% of A ends at character 2 (its first chunk, harmless): a true negative; 10% of B (character 1) too.
    assert figures["by_position"][10]["accuracy"] == 1.0
    # 50% of A ends at character 10 (third chunk: flagged, harmful), of B at 5 (second chunk: flagged, safe).
    assert figures["by_position"][50] == {"n": 2, "unsafe": 1, "safe": 1, "accuracy": 0.5, "fpr": 1.0, "fnr": 0.0}
    assert figures["by_position"][100] == figures["whole"]
    first = figures["first_flagged"]
    assert (first["unsafe_responses"], first["flagged_by_some_prefix"], first["flagged_as_whole"]) == (1, 1, 0)
    assert first["chunk_index"]["mean"] == 2 and first["share_of_response"]["mean"] == 9 / 19
    assert first["chunks_after_first_harmful_prefix"]["mean"] == 0
    assert (first["before_harm"], first["at_harm"], first["after_harm"]) == (0, 1, 0)
    # Without a prefix truth, every prefix of A counts as unsafe: its harmless first chunk becomes a false negative.
    plain = guard_figures(scored, [True, False])
    assert plain["by_chunk"][1]["fnr"] == 1.0 and plain["first_flagged"]["chunks_after_first_harmful_prefix"] is None
    # A is flagged at its first harmful chunk: no look-ahead needed. Without a prefix truth there is no recommendation.
    assert figures["lookahead"]["lookahead"] == 0 and figures["lookahead"]["delay_counts"] == [1]
    assert plain["lookahead"] is None
    assert format_lookahead(plain).startswith("recommended look-ahead: none; no look-ahead can be recommended without")
    with pytest.raises(
        ValueError, match=r"recommend no look-ahead: no look-ahead can be recommended without the truth"
    ):
        recommended_lookahead(plain)
    assert recommended_lookahead(json.loads(json.dumps(figures))) == 0  # read back from guard_eval.json too


def test_harm_delay_counts_from_the_first_harmful_chunk_to_the_first_flag_there_or_after():
    truth = [False, False, True, True, True]
    assert harm_delay([0.9, 0.9, 0.9, 0.2, 0.2], truth) == 1  # late by one chunk
    assert harm_delay([0.9, 0.9, 0.3, 0.2, 0.2], truth) == 0  # at the harm
    # An early flag (before the harm) that the guard keeps covers the harm at L = 0 ...
    assert harm_delay([0.9, 0.4, 0.3, 0.3, 0.3], truth) == 0
    # ... one it drops does not: a look-ahead reads the harmful chunk and the L chunks after it, never before it.
    assert harm_delay([0.4, 0.9, 0.9, 0.9, 0.2], truth) == 2
    assert harm_delay([0.9, 0.9, 0.9, 0.9, 0.9], truth) is None  # never flagged from the harm on


def test_the_recommended_look_ahead_reads_the_distribution_of_delays_not_its_mean():
    # The case of issue 35: a mean delay of +1.67 chunks and none of 180 flagged at the harm. 160 of 180 (88.9%) are
    # flagged within 2 chunks, so L = 2 (the mean rounded up) leaves 20 harmful openings trained by cross-entropy;
    # 95% needs L = 3.
    late = [1] * 80 + [2] * 80 + [3] * 20
    rec = recommend_lookahead(late)
    assert round(rec["mean_delay"], 2) == 1.67 and rec["delay_counts"] == [0, 80, 80, 20]
    assert rec["lookahead"] == 3 and rec["covered"][2] == pytest.approx(160 / 180)
    # A guard with almost the same mean (+1.64) whose delays are all 1 or 2 chunks is covered at L = 2.
    close = [1] * 65 + [2] * 115
    assert round(recommend_lookahead(close)["mean_delay"], 2) == 1.64 and recommend_lookahead(close)["lookahead"] == 2
    # An early guard: every response flagged at its harm (early flags kept count as delay 0) needs none.
    assert recommend_lookahead([0] * 50)["lookahead"] == 0
    # Exactly 95% within L counts (19 of 20 at L = 1), and the share is of the flagged responses: the 5 never
    # flagged from the harm on are counted apart (no look-ahead helps them), not as misses of every L.
    rec = recommend_lookahead([0] * 10 + [1] * 9 + [4] + [None] * 5)
    assert rec["lookahead"] == 1 and rec["never_flagged_from_harm"] == 5 and rec["flagged_from_harm"] == 20
    assert recommend_lookahead([0] * 10 + [1] * 9 + [4], coverage=1.0)["lookahead"] == 4
    # A guard that never flags recommends nothing, and says so.
    none = recommend_lookahead([None, None])
    assert none["lookahead"] is None and none["delay_counts"] == []
    figures = {"chunk_size": 5, "unit": "token", "lookahead": none}
    assert "flagged none of the 2 unsafe responses" in format_lookahead(figures)
    with pytest.raises(ValueError, match="the guard flagged no unsafe response from its harm on"):
        recommended_lookahead(figures)
    with pytest.raises(ValueError, match=r"coverage=0 is a share of responses; give one in \(0, 1\]"):
        recommend_lookahead([1], coverage=0)
    text = format_lookahead({"chunk_size": 5, "unit": "token", "lookahead": recommend_lookahead(late)})
    assert text.startswith("recommended look-ahead: star_lookahead=3 (chunks of 5 tokens)")
    assert "(chunks: responses): 0: 0, 1: 80, 2: 80, 3: 20 (mean +1.67)" in text
    assert (
        "L=2: 88.9%, L=3: 100.0%" in text
        and "Never flagged from the harm on (no look-ahead helps them): 0 of 180" in text
    )


@pytest.fixture
def labelled(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in guard_eval_data(seed=0, per_kind=4)))
    return str(path)


def test_eval_guard_command_on_the_keyword_rule(tmp_path, labelled, capsys):
    star_dss(
        [
            "eval",
            "guard",
            "--guardrail",
            "trl_star_dss.testing:scripted_guardrail",
            "--dataset",
            labelled,
            "--unit",
            "word",
            "--prefix-truth",
            "trl_star_dss.testing:is_harmful",
            "--output",
            str(tmp_path / "a"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    figures = json.loads((tmp_path / "a" / "guard_eval.json").read_text())
    assert (tmp_path / "a" / "guard_drift.png").stat().st_size > 0
    # The rule is exact on every prefix by construction, and fooled only by whole responses ending with the
    # misleading sentence: 4 of the 12 unsafe responses (one kind in three).
    assert figures["whole"]["fnr"] == 4 / 12 and figures["whole"]["fpr"] == 0.0
    assert all(figures["by_position"][str(p)]["accuracy"] == 1.0 for p in range(10, 100, 10))
    assert figures["first_flagged"]["chunks_after_first_harmful_prefix"]["mean"] == 0
    # Exact on every prefix: every unsafe response is flagged at its harm, so no look-ahead is called for.
    assert figures["lookahead"]["lookahead"] == 0 and figures["lookahead"]["delay_counts"] == [12]
    assert "recommended look-ahead: star_lookahead=0 (chunks of 5 words)" in out
    assert "prefixes compared with each prefix's own truth (trl_star_dss.testing:is_harmful)" in out
    assert "| false negatives % (of unsafe) | - | 0.0 | 0.0 |" in out  # no unsafe prefix at 10%: no rate
    # Without --prefix-truth the output says what prefixes are compared with.
    star_dss(
        [
            "eval",
            "guard",
            "--guardrail",
            "trl_star_dss.testing:scripted_guardrail",
            "--dataset",
            labelled,
            "--unit",
            "word",
            "--output",
            str(tmp_path / "b"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "compared with the whole response's label (no --prefix-truth" in out
    assert "recommended look-ahead: none; no look-ahead can be recommended without the truth of each prefix" in out
    assert json.loads((tmp_path / "b" / "guard_eval.json").read_text())["lookahead"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--label-column", "verdict"],
            r"label_column='verdict' is not a column of the dataset .*Name the column.* On the command line, "
            r"label_column is --label-column\.$",
        ),
        (
            ["--prefix-truth", "trl_star_dss.tools.demo:nothing"],
            r"prefix_truth='trl_star_dss.tools.demo:nothing' could not be imported.* On the command line, prefix_truth "
            r"is --prefix-truth\.$",
        ),
        (["--prefix-truth", "trl_star_dss.tools.demo"], r"is not `module:function`.* prefix_truth is --prefix-truth"),
        (["--unit", "token"], r"--policy-tokenizer was not given"),
        (["--chunk-size", "0"], r"--chunk-size 0 must be a positive whole number"),
    ],
)
def test_eval_guard_errors_name_the_flag_the_value_and_the_fix(tmp_path, labelled, argv, message):
    base = [
        "eval",
        "guard",
        "--guardrail",
        "trl_star_dss.testing:scripted_guardrail",
        "--dataset",
        labelled,
        "--unit",
        "word",
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    with pytest.raises(SystemExit, match=message):
        star_dss(base + argv)


def test_a_bad_label_is_refused_by_the_command(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": _conversation("fine"), "label": "ok"}) + "\n")
    with pytest.raises(
        SystemExit,
        match=r"label_column='label' holds 'ok' at example 0.*1 and true mean unsafe.* On the command line, label_column "
        r"is --label-column\.$",
    ):
        star_dss(
            [
                "eval",
                "guard",
                "--guardrail",
                "trl_star_dss.testing:scripted_guardrail",
                "--dataset",
                str(path),
                "--unit",
                "word",
                "--output",
                str(tmp_path / "out"),
            ]
        )


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path):
    rows = guard_eval_data(seed=0, per_kind=14)  # 70 responses: two shards of score_dataset (64 + 6)
    dataset = Dataset.from_list(rows)
    last = rows[-1]["messages"][-1]["content"]
    calls = []

    def breaks_in_the_second_shard(conversation):
        if conversation[-1]["content"] == last:
            raise RuntimeError("interrupted")
        return scripted_guardrail(conversation)

    def counts(conversation):
        calls.append(conversation[-1]["content"])
        return scripted_guardrail(conversation)

    output = str(tmp_path / "eval")
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_guard(
            dataset,
            PythonGuardrail(breaks_in_the_second_shard, name="rule"),
            unit="word",
            output_dir=output,
            progress=False,
        )
    with pytest.raises(ValueError, match="holds an earlier guard evaluation. Pass resume=True"):
        evaluate_guard(dataset, PythonGuardrail(counts, name="rule"), unit="word", output_dir=output, progress=False)
    resumed = evaluate_guard(
        dataset, PythonGuardrail(counts, name="rule"), unit="word", output_dir=output, resume=True, progress=False
    )
    # Only the second shard's six responses were scored again: one guard call per chunk prefix of each.
    assert len(calls) == sum(len(chunk_ends(row["messages"][-1]["content"], 5, "word")) for row in rows[64:])
    whole = evaluate_guard(dataset, PythonGuardrail(scripted_guardrail, name="rule"), unit="word", progress=False)
    assert resumed == whole
    assert json.loads((tmp_path / "eval" / "guard_eval.json").read_text()) == json.loads(json.dumps(whole))
