"""DeepSpeed ZeRO-3 and FSDP2 on 2 CPU processes (gloo) give the one-process run, for each way users take the
reference (docs/training.md, "DeepSpeed ZeRO-3 and FSDP"). Each run is `tests/core/distributed_train.py` in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, load_dataset
from safetensors.torch import load_file

from trl_star_dss.scoring import PythonGuardrail, score_dataset
from trl_star_dss.testing import scripted_guardrail, tiny_causal_lm, tiny_tokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "core", "distributed_train.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two tiny Llamas (the policy, and another one as a separate reference) and 8 scored examples, on disk."""
    out = tmp_path_factory.mktemp("engines")
    tokenizer = tiny_tokenizer()
    for name, seed in (("model", 1), ("ref_model", 2)):
        tiny_causal_lm(tokenizer, seed=seed).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    dataset = load_dataset(
        "json", data_files=os.path.join(ROOT, "examples", "data", "toy_sample.jsonl"), split="train"
    )
    scored = score_dataset(dataset, PythonGuardrail(scripted_guardrail), tokenizer, chunk_size=5, progress=False)[0]
    Dataset.from_list([ex for ex in scored if len(ex["messages"]) == 2][:8]).save_to_disk(str(out / "data"))
    return out


def run(work, engine: str, case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Two steps of `case` under `engine`: the result the script wrote and the weights `save_model` saved. The same
    examples in the same order: 2 processes x batch 2 see what 1 process x batch 4 sees."""
    if engine == "one":
        launch = [sys.executable, SCRIPT, str(work), engine, "4", case]
    else:  # `--standalone` takes a free port: other runs on the machine may hold torchrun's default one
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        launch += [SCRIPT, str(work), engine, "2", case]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    directory = work / engine / case
    saved = "adapter_model.safetensors" if case == "lora" else "model.safetensors"
    return json.loads((directory / "result.json").read_text()), load_file(directory / "model" / saved)


@pytest.fixture(scope="module")
def one_process(work):
    """The one-process run of each case, computed once for both engines."""
    results = {}

    def get(case):
        if case not in results:
            results[case] = run(work, "one", case)
        return results[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
@pytest.mark.parametrize("case", ["precompute", "lora", "ref_model"])
def test_sharded_run_equals_one_process(work, one_process, engine, case):
    expected, expected_weights = one_process(case)
    result, weights = run(work, engine, case)
    # Really sharded: two processes, each holding half of the weights.
    assert result["processes"] == 2
    assert result["local_share"] == pytest.approx(0.5, abs=0.02)
    assert expected["processes"] == 1 and expected["local_share"] == 1
    # The precomputed log-probs are cached under a key that samples every weight: the same key as one process's.
    assert result["ref_logps_keys"] == expected["ref_logps_keys"]
    assert len(result["ref_logps_keys"]) == (case == "precompute")
    steps, expected_steps = result["steps"], expected["steps"]
    assert len(steps) == len(expected_steps) == 2
    for step, expected_step in zip(steps, expected_steps):
        for key in ("loss", "loss/ce", "star/weight_mean", "num_tokens"):
            assert step[key] == pytest.approx(expected_step[key], rel=1e-5), key
        assert step["kl"] == pytest.approx(expected_step["kl"], rel=1e-4, abs=1e-9)
    if case == "ref_model":  # another model: the KL to it is there from the first step
        assert steps[0]["kl"] > 1e-3
    else:  # the policy before any update (precomputed, or with its adapters off)
        assert steps[0]["kl"] < 1e-9
    assert sorted(weights) == sorted(expected_weights)
    for key, value in expected_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6)
    # ... and training moved them: LoRA's B matrices start at zero, the full finetunes start at the saved model.
    start = load_file(work / "model" / "model.safetensors")
    moved = [
        (value - (0 if case == "lora" else start[key])).abs().max().item()
        for key, value in weights.items()
        if case != "lora" or "lora_B" in key
    ]
    assert max(moved) > 1e-5
