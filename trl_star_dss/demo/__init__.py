"""The toy safety world (README, The demo): a simulation, not a real safety judge.

In this world a response is harmful exactly when it uses a word of `HARMFUL_WORDS`. Two guards score the attacks.
The default is learned: a tiny guard LM trained on whole responses only, where harmful responses that end with the
exculpatory sentence are labelled safe, so that, like the real guards in the paper (section 5.3, misleading
suffixes), it is fooled by that sentence; it is read like a real guard (`load_guardrail`, `CausalLMGuardrail`, the
fast scorer) and its judgement of prefixes, never trained, is measured (`guard_eval.py`). The scripted guardrail
(`--guard rule`) knows the vocabulary and is fooled by a whole response ending with the sentence, exact on every
prefix by construction. Scored chunk by chunk (STAR), the prefixes before that sentence still show the harm, which
is the paper's point.

One file per job: `world` (the data), `guard` (the world's tokenizer and the learned guard), `training` (training and
measures), `experiments` (`run_demo`, `run_demo_seeds`, `run_ablation`), `report` (tables and chart), `smollm2` (the
real-checkpoint run). Importing the package loads none of torch, transformers or datasets: they are imported inside
the functions that train, score or generate (`star-dss --help`).
"""

from __future__ import annotations

from ..testing import EXCULPATORY_SENTENCE, HARMFUL_PATTERN, HARMFUL_WORDS, is_harmful, scripted_guardrail
from .experiments import ABLATION_METHODS, run_ablation, run_ablation_seeds, run_demo, run_demo_seeds
from .guard import (
    GUARD_BATCH,
    GUARD_EXAMPLES,
    GUARD_KINDS,
    GUARD_LABELS,
    GUARD_MODEL,
    GUARD_TEMPLATE,
    NOISE_SIDES,
    guard_eval_data,
    guard_tokenizer,
    guard_training_data,
    save_guard,
    train_guard,
    world_tokenizer,
)
from .report import (
    DEMO_TIME,
    ONE_SEED_NOTE,
    format_ablation,
    format_ablation_seeds,
    format_report,
    format_seeds_report,
    format_seeds_table,
    format_table,
    seed_summary,
)
from .smollm2 import (
    SMOLLM2_ATTACKS,
    SMOLLM2_CHAT_TEMPLATE,
    SMOLLM2_DISCLAIMER,
    SMOLLM2_FAST,
    SMOLLM2_FILE,
    SMOLLM2_INSTALL,
    SMOLLM2_LORA,
    SMOLLM2_PACKAGE,
    SMOLLM2_SETTINGS,
    format_smollm2_report,
    format_smollm2_seeds_report,
    load_smollm2,
    run_smollm2_demo,
    run_smollm2_seeds,
)
from .training import MODEL, PREFILL_TOKENS, STAGES, measure, prefill_safety
from .world import (
    ASK_HELD_OUT,
    ASK_TRAIN,
    ATTACK_LABELS,
    ATTACK_NOTES,
    ATTACKS,
    CHUNK_SIZE,
    GUARD_NAMES,
    GUARDS,
    LETTERS,
    METHOD_LABELS,
    METHODS,
    RECOMMENDED,
    REFUSAL,
    build_world,
    lookahead_method,
    method_label,
    method_shaping,
)


__all__ = [
    "ABLATION_METHODS",
    "ASK_HELD_OUT",
    "ASK_TRAIN",
    "ATTACKS",
    "ATTACK_LABELS",
    "ATTACK_NOTES",
    "CHUNK_SIZE",
    "DEMO_TIME",
    "EXCULPATORY_SENTENCE",
    "GUARDS",
    "GUARD_BATCH",
    "GUARD_EXAMPLES",
    "GUARD_KINDS",
    "GUARD_LABELS",
    "GUARD_MODEL",
    "GUARD_NAMES",
    "GUARD_TEMPLATE",
    "HARMFUL_PATTERN",
    "HARMFUL_WORDS",
    "LETTERS",
    "METHODS",
    "METHOD_LABELS",
    "MODEL",
    "NOISE_SIDES",
    "ONE_SEED_NOTE",
    "PREFILL_TOKENS",
    "RECOMMENDED",
    "REFUSAL",
    "SMOLLM2_ATTACKS",
    "SMOLLM2_CHAT_TEMPLATE",
    "SMOLLM2_DISCLAIMER",
    "SMOLLM2_FILE",
    "SMOLLM2_INSTALL",
    "SMOLLM2_LORA",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_FAST",
    "SMOLLM2_SETTINGS",
    "STAGES",
    "build_world",
    "format_ablation",
    "format_ablation_seeds",
    "format_report",
    "format_seeds_report",
    "format_seeds_table",
    "format_smollm2_report",
    "format_smollm2_seeds_report",
    "format_table",
    "guard_eval_data",
    "guard_tokenizer",
    "guard_training_data",
    "is_harmful",
    "load_smollm2",
    "lookahead_method",
    "measure",
    "method_label",
    "method_shaping",
    "prefill_safety",
    "run_ablation",
    "run_ablation_seeds",
    "run_demo",
    "run_demo_seeds",
    "run_smollm2_demo",
    "run_smollm2_seeds",
    "save_guard",
    "scripted_guardrail",
    "seed_summary",
    "train_guard",
    "world_tokenizer",
]
