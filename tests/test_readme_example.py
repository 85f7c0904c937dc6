"""The README's offline Python example runs exactly as printed, and the errors a new user meets on the way say what
to do."""

import os
import re
import shutil

import pytest

from trl_star_dss import STARDSSConfig, STARDSSTrainer
from trl_star_dss.testing import tiny_causal_lm, tiny_tokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join("examples", "data", "toy_sample.jsonl")


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", open(os.path.join(ROOT, "README.md")).read(), re.M | re.S)


def test_offline_readme_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    blocks = [block for block in readme_python_blocks() if "use_cpu=True" in block]
    assert len(blocks) == 1, "the README has one offline example (the block with use_cpu=True)"
    # A temporary directory laid out like a clone: the example reads the bundled sample by its relative path.
    (tmp_path / "examples" / "data").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, SAMPLE), tmp_path / SAMPLE)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(blocks[0], "README.md (offline example)", "exec"), namespace)

    assert "flagged examples (min STAR < 0.5): 6" in capsys.readouterr().out  # what its comment says
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 5
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 5 and all("star/weight_mean" in entry and "loss/kl" in entry for entry in logged)
    assert os.path.isdir(tmp_path / "runs" / "star-dss-cpu")  # written in the temp dir, not the repository


def test_real_model_example_says_what_it_needs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    real = [
        block
        for block in readme_python_blocks()
        if "meta-llama/Llama-3.2-1B-Instruct" in block and "STARDSSTrainer(" in block
    ]
    assert len(real) == 1
    before = readme.split(real[0])[0].rsplit("\n\n", 2)[-2]  # the paragraph that introduces it
    assert "the model hub" in before and "GPU" in before and "use_cpu=True" in before


def test_model_object_without_processing_class_names_the_fix(tmp_path):
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    )
    args = STARDSSConfig(output_dir=str(tmp_path), use_cpu=True, shaping="sft", report_to="none")
    with pytest.raises(
        ValueError,
        match=r"processing_class is None and the model \(a LlamaForCausalLM built in code\) "
        r"has no name or path .* processing_class=tokenizer",
    ):
        STARDSSTrainer(tiny_causal_lm(tokenizer), args=args, train_dataset=dataset)
    # The fix works: the same call with the tokenizer builds the trainer.
    STARDSSTrainer(tiny_causal_lm(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
