"""The Axolotl tests' shared world: a tiny Llama, 32 chat examples of the demo world and the guard rules the configs
name, on disk once per module."""

import json

import pytest

from trl_star_dss.demo import build_world
from trl_star_dss.testing import tiny_causal_lm, tiny_tokenizer


GUARDS = '''
def all_safe(conversation):
    no_axolotl_function_swapped()
    return 1.0


def no_axolotl_function_swapped():
    """Called while Axolotl prepares the data (the guard scores inside its dataset loading): no attribute of an
    Axolotl module may be a function or class of this project (a swapped Axolotl function)."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "axolotl":
            continue
        for attribute, value in vars(module).items():
            if getattr(value, "__module__", "").split(".")[0] in ("star_dss", "trl_star_dss"):
                raise AssertionError(f"{name}.{attribute} is {value!r}, not Axolotl's own")


def all_unsafe(conversation):
    return 0.0


def harm_unsafe(conversation):  # the harmful vocabulary, whatever the response claims about itself
    from trl_star_dss.testing import is_harmful

    return 0.05 if is_harmful(conversation[-1]["content"]) else 0.95
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, 32 chat examples of the demo world (16 with the misleading suffix, 16 refusals) and two
    guard rules, on disk."""
    root = tmp_path_factory.mktemp("axolotl")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = build_world(0)["attacks"]["misleading_suffix"][:16] + build_world(0)["aligned"][:16]
    with open(root / "data.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({"messages": row["messages"]}) + "\n")
    (root / "guards").mkdir()
    (root / "guards" / "toy_guards.py").write_text(GUARDS)
    return root
