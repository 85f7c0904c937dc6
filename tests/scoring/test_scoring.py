import json
import os

import pytest
from datasets import Dataset

from trl_star_dss.formats import response_turns
from trl_star_dss.scoring import PythonGuardrail, STARScorer, chunk_ends, score_dataset
from trl_star_dss.scoring.families import LlamaGuard
from trl_star_dss.testing import EXCULPATORY_SENTENCE, scripted_guardrail
from trl_star_dss.weights import token_scores


HARMFUL = "Sure. Mix the poison into the drink and wait for the guests. " + EXCULPATORY_SENTENCE


def messages(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def toy_dataset(n=10):
    rows = []
    for i in range(n):
        answer = HARMFUL if i % 3 == 0 else f"The answer to question {i} is {i * 7}, as you can check by hand."
        rows.append({"messages": messages(f"Question {i}?", answer)})
    return Dataset.from_list(rows)


class Counting:
    """A scripted guardrail function that counts its calls and can fail after some (an interrupted run)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, conversation):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return scripted_guardrail(conversation)


def test_chunk_ends_token_and_word_units(llama3_tok):
    text = "Mix flour, water, salt and yeast; knead the dough, let it rise and bake it."
    offsets = llama3_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ends = chunk_ends(text, 5, "token", llama3_tok)
    assert ends == [offsets[i][1] for i in range(4, len(offsets), 5)] + ([len(text)] if len(offsets) % 5 else [])
    assert ends[-1] == len(text)
    assert chunk_ends("one two three four five six seven", 3, "word") == [13, 27, 33]
    assert chunk_ends("Hi.", 5, "token", llama3_tok) == [3]  # shorter than M: one chunk, the whole response


def test_token_scores_map_back_exactly_to_policy_chunks(llama3_tok):
    text = "Step one: buy the poison base. Step two: mix it — café ☕ 日本語 — then wait twenty minutes."
    ends = chunk_ends(text, 5, "token", llama3_tok)
    scores = [i / len(ends) for i in range(len(ends))]
    offsets = llama3_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    per_token = token_scores([end for _, end in offsets], ends, scores)
    assert per_token == [scores[i // 5] for i in range(len(offsets))]
    assert token_scores([len(text) + 10], ends, scores) == [scores[-1]]  # an end-of-turn token: the last score


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_chunk_size_must_be_positive(bad):
    with pytest.raises(ValueError, match=rf"chunk_size={bad!r} must be a positive whole number"):
        chunk_ends("a b c", bad, "word")


def test_chunking_argument_errors():
    with pytest.raises(ValueError, match=r"unit='char' is not known"):
        chunk_ends("a b", 5, "char")
    with pytest.raises(ValueError, match=r"unit='token' cuts chunks with the policy tokenizer, but none was given"):
        chunk_ends("a b", 5, "token")


def test_response_turns_for_every_trl_format():
    conversation = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Sure"},
    ]
    turns = response_turns({"messages": conversation}, "messages", 0)
    assert [(turn, response) for turn, _, response in turns] == [(2, "Hello"), (4, "Sure")]
    assert turns[1][1] == conversation[1:4]  # context: earlier turns, without the system message
    assert response_turns({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", 0) == [
        (0, [{"role": "user", "content": "Hi"}], "Hello")
    ]
    conversational = {"prompt": conversation[:2], "completion": [{"role": "assistant", "content": "Hello"}]}
    assert response_turns(conversational, "prompt_completion", 0) == [(0, conversation[1:2], "Hello")]
    skipped = conversation[:3] + [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y", "train": False},
    ]
    assert [t for t, _, _ in response_turns({"messages": skipped}, "messages", 0)] == [2]


def test_bad_examples_are_clear_errors():
    with pytest.raises(ValueError, match=r"Example 4: messages\[1\] is an assistant turn with an empty or whitespace"):
        response_turns({"messages": messages("Hi", "  \n ")}, "messages", 4)
    with pytest.raises(ValueError, match=r"Example 2 has no assistant turn to score \(messages roles: \['user'\]\)"):
        response_turns({"messages": [{"role": "user", "content": "Hi"}]}, "messages", 2)
    with pytest.raises(ValueError, match=r"messages\[1\]\.content\[0\] is a text part without a string 'text'"):
        response_turns(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text"}]}]},
            "messages",
            0,
        )
    with pytest.raises(ValueError, match=r"messages\[1\]\.content is a int, not a string or a list of text parts"):
        response_turns(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]}, "messages", 0
        )
    with pytest.raises(ValueError, match=r"completion is a int, not a list of messages"):
        response_turns({"prompt": [{"role": "user", "content": "Hi"}], "completion": 3}, "prompt_completion", 0)
    with pytest.raises(
        ValueError, match=r"columns \['text'\], so STAR cannot tell which text is the assistant response"
    ):
        score_dataset(Dataset.from_list([{"text": "hello"}]), PythonGuardrail(scripted_guardrail), unit="word")
    # An Alpaca file: the fix renames both the prompt and the response column (it named only `output` before).
    alpaca = Dataset.from_list([{"instruction": "Hi", "input": "", "output": "Hello"}])
    with pytest.raises(ValueError, match=r"rename_columns\(\{'instruction': 'prompt', 'output': 'completion'\}\)"):
        score_dataset(alpaca, PythonGuardrail(scripted_guardrail), unit="word")


def test_scorer_scores_every_chunk_prefix():
    scorer = STARScorer(PythonGuardrail(scripted_guardrail), chunk_size=4, unit="word")
    record = scorer.score_examples([{"messages": messages("Q?", HARMFUL)}], "messages", [0])[0]
    (turn,) = record["star"]
    assert turn["turn"] == 1 and turn["chunk_ends"][-1] == len(HARMFUL)
    # The harm shows in every prefix; only the whole response, with its misleading last sentence, fools the guard.
    assert turn["scores"][:-1] == [0.05] * (len(turn["scores"]) - 1) and turn["scores"][-1] == 0.95
    assert record["units"] == len(HARMFUL.split()) and record["units_below_half"] == len(HARMFUL.split()) - 4


def test_score_dataset_caches_and_reports(tmp_path):
    dataset = toy_dataset()
    guard = Counting()
    scored, summary = score_dataset(
        dataset,
        lambda: PythonGuardrail(guard),
        unit="word",
        chunk_size=4,
        output_dir=str(tmp_path),
        guardrail_id="toy",
        shard_size=3,
        progress=False,
    )
    assert guard.calls > 0 and summary.examples == 10 and summary.scored_now == 10
    assert summary.flagged == 4 and summary.turns == 10 and summary.context_cut == 0
    assert scored.column_names == ["messages", "star"]
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "dataset"))["star"] == scored["star"]
    assert json.load(open(tmp_path / "summary.json"))["flagged"] == 4
    built = []
    again, summary = score_dataset(
        dataset,
        lambda: built.append(1),
        unit="word",
        chunk_size=4,
        output_dir=str(tmp_path),
        guardrail_id="toy",
        shard_size=3,
        progress=False,
    )
    assert built == [] and summary.scored_now == 0  # a finished run does not even build the guardrail
    assert again["star"] == scored["star"]


def test_interrupted_run_resumes_without_redoing_work(tmp_path):
    dataset = toy_dataset()
    kwargs = dict(unit="word", chunk_size=4, guardrail_id="toy", shard_size=3, progress=False)
    reference, _ = score_dataset(dataset, PythonGuardrail(scripted_guardrail), **kwargs)
    first = Counting(fail_after=25)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(dataset, lambda: PythonGuardrail(first), output_dir=str(tmp_path), **kwargs)
    done = sorted(os.listdir(tmp_path / "shards"))
    assert done and all(name.endswith(".jsonl") for name in done)  # only whole shards, no half-written file
    assert not (tmp_path / "dataset").exists()
    second = Counting()
    resumed, summary = score_dataset(dataset, lambda: PythonGuardrail(second), output_dir=str(tmp_path), **kwargs)
    assert summary.scored_now == 10 - 3 * len(done)
    full = Counting()
    score_dataset(dataset, PythonGuardrail(full), **kwargs)
    assert second.calls < full.calls  # finished shards were not scored again
    assert resumed["star"] == reference["star"]


def test_output_dir_refuses_other_settings_and_other_data(tmp_path):
    dataset = toy_dataset()
    kwargs = dict(unit="word", guardrail_id="toy", output_dir=str(tmp_path), progress=False)
    score_dataset(dataset, PythonGuardrail(scripted_guardrail), chunk_size=4, **kwargs)
    with pytest.raises(
        ValueError, match=r"holds STAR scores made with other settings \(\{'chunk_size': \(4, 2\)\}.*--overwrite"
    ):
        score_dataset(dataset, PythonGuardrail(scripted_guardrail), chunk_size=2, **kwargs)
    _, summary = score_dataset(dataset, PythonGuardrail(scripted_guardrail), chunk_size=2, overwrite=True, **kwargs)
    assert summary.scored_now == 10
    changed = Dataset.from_list([{"messages": messages("Other?", "Other answer.")}] + list(dataset)[1:])
    with pytest.raises(ValueError, match=r"holds scores of another dataset: example 0 differs"):
        score_dataset(changed, PythonGuardrail(scripted_guardrail), chunk_size=2, **kwargs)


def test_prompt_completion_dataset_with_model_guard(llama_guard_tiny):
    model, tokenizer = llama_guard_tiny
    dataset = Dataset.from_list(
        [{"prompt": "What is 2+2?", "completion": "It is 4."}, {"prompt": "Q", "completion": HARMFUL}]
    )
    guard = LlamaGuard(model, tokenizer)
    fast, summary = score_dataset(dataset, guard, tokenizer, chunk_size=5, progress=False)
    naive, _ = score_dataset(dataset, guard, tokenizer, chunk_size=5, method="naive", progress=False)
    assert summary.guard_tokens > 0 and summary.chunks == sum(len(r[0]["scores"]) for r in fast["star"])
    for a, b in zip(fast["star"], naive["star"]):
        assert a[0]["chunk_ends"] == b[0]["chunk_ends"]
        assert max(abs(x - y) for x, y in zip(a[0]["scores"], b[0]["scores"])) <= 1e-4


# -- the cache id says what the guard is (issue 33) ------------------------------------------------------------------


def _write_rule(folder, value: float) -> None:
    (folder / "edited_rule.py").write_text(f"def rule(conversation):\n    return {value}\n")


def _import_fresh(monkeypatch, folder):
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("edited_rule", None)
    importlib.invalidate_caches()


def test_an_edited_python_rule_is_not_served_its_old_scores(tmp_path, monkeypatch):
    """A `module:function` rule edited from 0.95 to 0.05: the cache made by the old rule is refused by name."""
    from trl_star_dss.errors import STARDSSError
    from trl_star_dss.scoring.families import deferred_guardrail

    kwargs = dict(unit="word", output_dir=str(tmp_path / "out"), progress=False)
    _write_rule(tmp_path, 0.95)
    _import_fresh(monkeypatch, tmp_path)
    build, first_id = deferred_guardrail("edited_rule:rule")
    scored, summary = score_dataset(toy_dataset(4), build, guardrail_id=first_id, **kwargs)
    assert summary.flagged == 0
    _write_rule(tmp_path, 0.05)
    _import_fresh(monkeypatch, tmp_path)
    build, second_id = deferred_guardrail("edited_rule:rule")
    assert second_id != first_id
    with pytest.raises(
        STARDSSError, match=r"The guard \['edited_rule:rule'\] has changed since those scores were made"
    ):
        score_dataset(toy_dataset(4), build, guardrail_id=second_id, **kwargs)
    # The documented fix: score again.
    _, summary = score_dataset(toy_dataset(4), build, guardrail_id=second_id, overwrite=True, **kwargs)
    assert (summary.scored_now, summary.flagged) == (4, 4)
    # A rule built in code without a name is named by its code too.
    high = PythonGuardrail(lambda c: 0.95)
    low = PythonGuardrail(lambda c: 0.05)
    assert json.loads(high.id)["code"] != json.loads(low.id)["code"]


def test_a_checkpoint_retrained_into_the_same_folder_gets_another_id(tmp_path):
    import shutil

    from trl_star_dss.errors import STARDSSError
    from trl_star_dss.scoring import load_guardrail
    from trl_star_dss.testing import tiny_guard, tiny_tokenizer

    path = tmp_path / "guard"
    for seed in (0, 1):
        model, guard_tokenizer = tiny_guard("llama_guard", seed=seed)
        model.save_pretrained(path)
        guard_tokenizer.save_pretrained(path)
        if seed == 0:
            first = load_guardrail(str(path))
            # A copy of the folder (other modification times) is the same guard.
            shutil.copytree(path, tmp_path / "copy")
            assert (
                json.loads(load_guardrail(str(tmp_path / "copy")).id)["fingerprint"]
                == json.loads(first.id)["fingerprint"]
            )
            score_dataset(toy_dataset(2), first, tiny_tokenizer(), output_dir=str(tmp_path / "out"), progress=False)
    second = load_guardrail(str(path))
    assert json.loads(second.id)["fingerprint"] != json.loads(first.id)["fingerprint"]
    with pytest.raises(
        STARDSSError, match=r"has changed since those scores were made .*its files, hub commit or code"
    ):
        score_dataset(toy_dataset(2), second, tiny_tokenizer(), output_dir=str(tmp_path / "out"), progress=False)


def test_a_hub_guard_is_named_by_its_cached_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from trl_star_dss.scoring.families import guardrail_id

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert json.loads(guardrail_id("org/guard"))["fingerprint"] == [{"revision": None}]  # not downloaded
    ids = []
    for commit in ("a" * 40, "b" * 40):
        repo = tmp_path / "models--org--guard"
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        ids.append(guardrail_id("org/guard"))
    assert [json.loads(i)["fingerprint"] for i in ids] == [[{"revision": "a" * 40}], [{"revision": "b" * 40}]]


def test_a_hub_guard_downloaded_while_scoring_names_its_scores_by_its_commit(tmp_path):
    """The id taken before a hub guard is downloaded has no commit; the guard loaded to score has one: the scores are
    recorded under the loaded guard's id, so the next run (which knows the commit) reads them."""
    unknown = json.dumps({"guardrail": ["org/guard"], "fingerprint": [{"revision": None}]})
    known = json.dumps({"guardrail": ["org/guard"], "fingerprint": [{"revision": "a" * 40}]})

    def build():
        guard = PythonGuardrail(scripted_guardrail, name="org/guard")
        guard.id = known
        return guard

    kwargs = dict(unit="word", output_dir=str(tmp_path), progress=False)
    score_dataset(toy_dataset(3), build, guardrail_id=unknown, **kwargs)
    with open(tmp_path / "star_settings.json") as handle:
        assert json.load(handle)["guardrail"] == known
    _, summary = score_dataset(toy_dataset(3), build, guardrail_id=known, **kwargs)
    assert summary.scored_now == 0


def test_a_cache_of_an_earlier_release_gets_a_migration_message(tmp_path):
    from trl_star_dss.errors import STARDSSError
    from trl_star_dss.scoring.families import deferred_guardrail

    spec = "trl_star_dss.testing:scripted_guardrail"
    build, cache_id = deferred_guardrail(spec)
    kwargs = dict(unit="word", output_dir=str(tmp_path), progress=False)
    score_dataset(toy_dataset(3), build, guardrail_id=cache_id, **kwargs)
    settings_file = tmp_path / "star_settings.json"
    settings = json.loads(settings_file.read_text())
    old = json.loads(settings["guardrail"])
    del old["fingerprint"]  # the id as earlier releases wrote it
    settings["guardrail"] = json.dumps(old)
    settings_file.write_text(json.dumps(settings))
    with pytest.raises(
        STARDSSError, match=r"made by an earlier release.*writing the id above as the `guardrail` entry"
    ):
        score_dataset(toy_dataset(3), build, guardrail_id=cache_id, **kwargs)
