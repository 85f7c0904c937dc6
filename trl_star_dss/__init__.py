"""STAR-DSS for TRL and Axolotl (arXiv 2505.17196): safety-shaped finetuning driven by guardrail STAR scores."""

from .guardrails import (
    CausalLMGuardrail,
    EnsembleGuardrail,
    GraniteGuardian,
    Guardrail,
    LlamaGuard,
    PrefixQuery,
    PrefixScores,
    PythonGuardrail,
    load_guardrail,
)
from .scoring import STARScorer, ScoringSummary, chunk_ends, score_dataset, token_scores

__version__ = "0.1.0"

__all__ = [
    "CausalLMGuardrail",
    "EnsembleGuardrail",
    "GraniteGuardian",
    "Guardrail",
    "LlamaGuard",
    "PrefixQuery",
    "PrefixScores",
    "PythonGuardrail",
    "STARScorer",
    "ScoringSummary",
    "chunk_ends",
    "load_guardrail",
    "score_dataset",
    "token_scores",
]
