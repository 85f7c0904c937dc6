import os
import subprocess
import sys

import pytest
import yaml

from trl_star_dss.testing import tiny_causal_lm, tiny_tokenizer
from trl_star_dss.tools.cli import main as star_dss


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["llama3.2-1b-qlora.yaml", "llama3.2-1b-full.yaml"])
def test_train_example_runs_its_config_on_a_tiny_local_model(tmp_path, config):
    """The real-model configs, with only the model, data and CPU settings overridden on the command line."""
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    star_dss(
        [
            "score",
            "--guardrail",
            "trl_star_dss.testing:scripted_guardrail",
            "--policy-tokenizer",
            str(tmp_path / "model"),
            "--dataset",
            os.path.join(ROOT, "examples", "data", "toy_sample.jsonl"),
            "--output",
            str(tmp_path / "scored"),
            "--no-progress",
        ]
    )
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "train_star_dss.py"),
        "--config",
        os.path.join(ROOT, "examples", "configs", config),
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--dataset_name",
        str(tmp_path / "scored" / "dataset"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--bf16",
        "false",
        "--dtype",
        "float32",
        "--use_cpu",
        "true",
        "--gradient_checkpointing",
        "false",
        "--report_to",
        "none",
        "--assistant_only_loss",
        "true",
    ]
    run = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "star/weight_mean" in run.stdout + run.stderr
    assert os.listdir(tmp_path / "out")  # the model (or adapter) was saved


def test_accelerate_configs_parse():
    for name in ("ddp.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"):
        config = yaml.safe_load(open(os.path.join(ROOT, "examples", "accelerate", name)))
        assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
