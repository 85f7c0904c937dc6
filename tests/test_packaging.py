"""pyproject.toml accepts the versions the tests run (constraints-cpu.txt) and, for the Hugging Face stack whose
internals the trainer relies on, no other minor version (pyproject.toml says which internals)."""

import os

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK = ("trl", "transformers", "peft", "accelerate", "datasets")


def pins() -> dict[str, Version]:
    with open(os.path.join(ROOT, "constraints-cpu.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {name.lower(): Version(version) for name, version in (line.split("==") for line in lines if line)}


def requirements() -> dict[str, Requirement]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    listed = project["dependencies"] + project["optional-dependencies"].get("deepspeed", [])
    return {requirement.name.lower(): requirement for requirement in map(Requirement, listed)}


def test_every_tested_version_is_accepted():
    pinned, required = pins(), requirements()
    for name in (*STACK, "torch", "deepspeed"):
        assert pinned[name] in required[name].specifier, (name, pinned[name], str(required[name].specifier))


def test_stack_ranges_are_the_tested_minor_versions():
    pinned, required = pins(), requirements()
    for name in STACK:
        pin, specifier = pinned[name], required[name].specifier
        older = Version(f"{pin.major}.{pin.minor - 1}.999") if pin.minor else Version(f"{pin.major - 1}.999")
        newer = Version(f"{pin.major}.{pin.minor + 1}.0")
        assert older not in specifier, f"{name}{specifier} accepts {older}, older than the tested {pin}"
        assert newer not in specifier, f"{name}{specifier} accepts {newer}, newer than the tested {pin}"
