"""STAR-DSS for TRL and Axolotl (arXiv 2505.17196): safety-shaped finetuning driven by guardrail STAR scores.

Public names are loaded on first use (PEP 562, as TRL's own package does), so `import trl_star_dss` and
`star-dss --help` load neither TRL's trainers nor the optional packages they pull in (bitsandbytes, PEFT).
"""

import importlib


__version__ = "0.3.0"  # the one place the version is stated (pyproject.toml reads it; CHANGELOG.md)

# Each public name and the module that defines it: the training core at the top level, scoring in `scoring`.
_MODULES = {
    "config": ["STARDSSConfig", "STARSettings"],
    "errors": ["STARDSSError"],
    "trainer": ["STARDSSTrainer"],
    "loss_mixin": ["STARLossMixin"],
    "tokenized": ["star_weights_column"],
    "collator": ["DataCollatorForSTAR"],
    "heads": ["OutputHead"],
    "loss": ["deep_token_loss", "full_kl", "star_dss_loss", "token_kl"],
    "weights": ["check_star_records", "token_scores", "token_weights"],
    # scoring's public names are its `__all__` (that package imports nothing heavy; see its docstring)
    "scoring": importlib.import_module(".scoring", __name__).__all__,
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
