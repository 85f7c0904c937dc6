"""Offline STAR scoring (docs/method.md, "STAR: a safety score for every prefix of a response", 3): guardrails, the guard families, the audit of scored data, and
`score_dataset`. The training core never imports this package except through `scoring.startup`.

torch, transformers, datasets, accelerate and matplotlib are imported inside the functions that use them, in every
module of this package: each takes seconds to load, and `star-dss --help` (which reads `FAMILIES` from here) must not
wait for them. Every other import is at the top of its module."""

from .audit import Auditor
from .causal_lm import CausalLMGuardrail
from .dataset import ScoringSummary, STARScorer, chunk_ends, score_dataset, scored_dataset_path
from .families import (
    FAMILIES,
    GraniteGuardian,
    GraniteGuardian33,
    LlamaGuard,
    LlamaGuard4,
    Qwen3GuardGen,
    ShieldGemma,
    WildGuard,
    detect_family,
    guardrail_id,
    load_guardrail,
)
from .guardrail import EnsembleGuardrail, Guardrail, PrefixQuery, PrefixScores, PythonGuardrail
from .probe import ProbeGuardrail, ProbeSettings, fit_probe
from .template import TemplatedGuardrail
from .token_level import TokenLevelGuardrail


__all__ = [
    "FAMILIES",
    "Auditor",
    "CausalLMGuardrail",
    "EnsembleGuardrail",
    "GraniteGuardian",
    "GraniteGuardian33",
    "Guardrail",
    "LlamaGuard",
    "LlamaGuard4",
    "PrefixQuery",
    "PrefixScores",
    "ProbeGuardrail",
    "ProbeSettings",
    "PythonGuardrail",
    "Qwen3GuardGen",
    "STARScorer",
    "ScoringSummary",
    "ShieldGemma",
    "TemplatedGuardrail",
    "TokenLevelGuardrail",
    "WildGuard",
    "chunk_ends",
    "detect_family",
    "fit_probe",
    "guardrail_id",
    "load_guardrail",
    "score_dataset",
    "scored_dataset_path",
]
