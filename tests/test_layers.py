"""The package's layers (docs/method.md, "How the package is cut"): the training core knows no guard, scoring knows no tool, and `import
trl_star_dss` loads neither the tools nor the heavy optional packages. Walks every import statement of the package,
module level and inside functions, so a lazy import cannot hide a dependency."""

import ast
import os
import subprocess
import sys

import trl_star_dss


PACKAGE = os.path.dirname(trl_star_dss.__file__)
CORE = {
    "arguments",
    "choices",
    "config",
    "errors",
    "loss",
    "heads",
    "weights",
    "formats",
    "special_tokens",
    "collator",
    "reference",
    "storage",
    "trainer",
    "contract",
    "loss_mixin",
    "tokenized",
}
TOOLS = {"tools", "cli", "demo"}  # the command line, what it drives, and the toy world
# The one way the core reaches scoring: the trainer's start-up scoring and report (`scoring.startup`).
ENTRY = ("trainer", "scoring.startup")


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith("__init__") else relative


def _imports(path: str) -> set[str]:
    """Modules of this package that `path` imports, as dotted names relative to the package."""
    name = _module_name(path)
    package = name.split(".")[:-1] if not path.endswith("__init__.py") else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("trl_star_dss"):
                target = node.module[len("trl_star_dss") :].lstrip(".")
            else:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}".lstrip(".") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                a.name[len("trl_star_dss") :].lstrip(".") for a in node.names if a.name.startswith("trl_star_dss")
            )
    return {target for target in found if target in MODULES}


def _package_files():
    for root, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                yield os.path.join(root, file)


MODULES = {_module_name(path) for path in _package_files()}


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in _package_files()}


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return "core" if top in CORE else "tools" if top in TOOLS else "scoring" if top == "scoring" else "other"


def test_the_core_imports_no_guard_and_no_tool():
    graph = _graph()
    for module, targets in graph.items():
        if _layer(module) != "core":
            continue
        for target in targets:
            if (module, target) == ENTRY:
                continue
            assert _layer(target) in ("core", "other") or target == "", f"{module} imports {target}"
            # and nothing it imports reaches scoring or the tools by another way
            seen, todo = set(), [target]
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.add(current)
                assert _layer(current) != "tools", f"{module} reaches the tool {current} through {target}"
                if _layer(current) == "scoring" and (module, current) != ENTRY:
                    raise AssertionError(f"{module} reaches scoring ({current}) through {target}")
                todo.extend(graph.get(current, ()))


def test_scoring_imports_no_tool():
    for module, targets in _graph().items():
        if _layer(module) == "scoring":
            assert not [t for t in targets if _layer(t) == "tools"], f"{module} imports a tool: {targets}"


HEAVY = ("bitsandbytes", "peft", "matplotlib", "lm_eval", "axolotl")


_LOADED = "; import sys; print(sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in {!r}}}))"


def _loaded_after(code: str) -> list[str]:
    code += _LOADED.format(HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1], result.stderr


def test_import_loads_no_tool_and_no_optional_package():
    loaded, _ = _loaded_after(
        "import trl_star_dss, sys; assert not [m for m in sys.modules if m.startswith(('trl_star_dss.tools', "
        "'trl_star_dss.demo'))]"
    )
    assert loaded == "[]"


def test_the_demo_package_and_its_old_name_import_light():
    """`trl_star_dss.demo` (and `trl_star_dss.tools.demo`, its name for one release) load no torch, transformers,
    datasets or trl at import: they are loaded by the functions that train, score or generate."""
    code = (
        "import sys, trl_star_dss.demo, trl_star_dss.tools.demo as old; assert old.run_demo is trl_star_dss.demo.run_demo; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets', 'trl'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# What `star-dss --help` must not wait for either: each takes seconds to load (the commands import them in `run`).
HEAVY_FOR_HELP = (*HEAVY, "torch", "transformers", "trl", "datasets", "accelerate")


def test_every_help_prints_only_help():
    """`star-dss ... --help` loads no heavy package (bitsandbytes printed a kernels warning on CPU), nor the demo
    (its module is imported when `star-dss demo` runs)."""
    for command in ([], ["score"], ["show"], ["demo"], ["eval", "safety"], ["eval", "guard"], ["eval", "capability"]):
        code = (
            f"from trl_star_dss.cli import main\ntry:\n    main({[*command, '--help']!r})\nexcept SystemExit: pass\n"
            "import sys; print('demo', [m for m in sys.modules if m.startswith(('trl_star_dss.demo', 'trl_star_dss.tools.demo'))])"
        )
        result = subprocess.run(
            [sys.executable, "-c", code + _LOADED.format(HEAVY_FOR_HELP)], capture_output=True, text=True
        )
        assert result.returncode == 0 and result.stderr == "", (command, result.stderr)
        assert result.stdout.strip().splitlines()[-2:] == ["demo []", "[]"], (command, result.stdout[-300:])


def test_the_axolotl_plugin_reads_the_loss_from_its_own_module():
    # The loss mixin and its settings live apart from the SFTTrainer subclass (issue 36), so the plugin never imports
    # `trl_star_dss.trainer` (TRL's SFTTrainer and everything it pulls in) for them.
    plugin = os.path.join(os.path.dirname(PACKAGE), "axolotl_plugin", "star_dss")
    for file in sorted(os.listdir(plugin)):
        if file.endswith(".py"):
            tree = ast.parse(open(os.path.join(plugin, file), encoding="utf-8").read())
            modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert "trl_star_dss.trainer" not in modules, file
    code = "import sys, trl_star_dss.loss_mixin; print('trl_star_dss.trainer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
