"""Running Axolotl on the shared world (`conftest.py`): its config, `axolotl <command>` in a subprocess, the steps a
run logged. Imported by the tests of this folder; Axolotl itself is imported only by the subprocess."""

import ast
import os
import re
import subprocess
import sys

import yaml
from safetensors.torch import load_file

import star_dss
import trl_star_dss


CPU = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
QLORA = {
    "adapter": "qlora",
    "load_in_4bit": True,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
}


def _config(world, name: str, **extra) -> dict:
    return {
        "base_model": str(world / "model"),
        "datasets": [{"path": str(world / "data.jsonl"), "type": "chat_template", "ds_type": "json"}],
        "chat_template": "tokenizer_default",
        "sequence_len": 160,
        "sample_packing": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(world / "runs" / name),
        "dataset_prepared_path": str(world / "prepared"),
        "val_set_size": 0,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        **CPU,
        **extra,
    }


_RUNS: dict = {}


def axolotl(world, command: str, name: str, pythonpath: str | None = None, **extra) -> str:
    """`axolotl <command>` on a config in a subprocess; returns its stdout + stderr."""
    path = world / f"{name}.yml"
    path.write_text(yaml.safe_dump(_config(world, name, **extra)))
    # The subprocess imports the code this test imported (a checkout, not another installed copy), and finds
    # `accelerate`, which `axolotl train` runs from PATH, in this interpreter's environment, activated or not.
    code = [os.path.dirname(os.path.dirname(module.__file__)) for module in (star_dss, trl_star_dss)]
    imports = os.pathsep.join(filter(None, [pythonpath, str(world / "guards"), *code, os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": imports,
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", command, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def train(world, name: str, pythonpath: str | None = None, **extra):
    """`axolotl train`; returns (its log, the saved weights, the logged train steps). Runs once per name."""
    if name not in _RUNS:
        log = axolotl(world, "train", name, pythonpath, **extra)
        file = "adapter_model.safetensors" if extra.get("adapter") else "model.safetensors"
        _RUNS[name] = (log, load_file(world / "runs" / name / file), logged(log))
    return _RUNS[name]


def logged(log: str, kind: str = "loss") -> list[dict]:
    """The Trainer's printed log dicts of training steps (`kind="loss"`) or evaluations (`"eval_loss"`), read as
    literals (never evaluated as code: the log is a subprocess's output)."""
    return [ast.literal_eval(m) for m in re.findall(r"\{'" + kind + r"': .*?\}", log)]


def _distance(a: dict, b: dict) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a) ** 0.5
