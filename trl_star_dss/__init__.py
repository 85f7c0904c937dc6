"""STAR-DSS for TRL and Axolotl (arXiv 2505.17196): safety-shaped finetuning driven by guardrail STAR scores."""

from .families import GraniteGuardian, LlamaGuard, load_guardrail
from .guardrails import CausalLMGuardrail, EnsembleGuardrail, Guardrail, PrefixQuery, PrefixScores, PythonGuardrail
from .audit import Auditor
from .collator import DataCollatorForSTAR
from .config import STARDSSConfig
from .heads import OutputHead
from .loss import deep_token_loss, full_kl, star_dss_loss
from .scoring import STARScorer, ScoringSummary, chunk_ends, score_dataset
from .trainer import STARDSSTrainer, STARLossMixin, STARSettings
from .weights import token_scores, token_weights

__version__ = "0.1.0"

__all__ = [
    "Auditor",
    "CausalLMGuardrail",
    "DataCollatorForSTAR",
    "EnsembleGuardrail",
    "GraniteGuardian",
    "Guardrail",
    "LlamaGuard",
    "OutputHead",
    "PrefixQuery",
    "PrefixScores",
    "PythonGuardrail",
    "STARDSSConfig",
    "STARDSSTrainer",
    "STARLossMixin",
    "STARSettings",
    "STARScorer",
    "ScoringSummary",
    "chunk_ends",
    "deep_token_loss",
    "full_kl",
    "load_guardrail",
    "score_dataset",
    "star_dss_loss",
    "token_scores",
    "token_weights",
]
