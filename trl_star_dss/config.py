"""`STARDSSConfig`: `SFTConfig` plus the fields of STAR-DSS. Defaults are the paper's (docs/method.md 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

# `STARArguments` lives in a module without TRL (`star-dss --help` reads it); it is public here too.
from .arguments import STARArguments

# The configuration's constants (`choices.py`, importable from here too).
from .choices import (  # noqa: F401
    CONTENT_SPECIAL_TOKENS,
    CONTROVERSIAL,
    KL_ESTIMATORS,
    REFERENCE_SHAPINGS,
    SCORED_SHAPINGS,
    SHAPINGS,
    UNITS,
)
from .errors import STARDSSError


@dataclass
class STARDSSConfig(STARArguments, SFTConfig):
    r"""
    Configuration of [`STARDSSTrainer`]: every [`~trl.SFTConfig`] field, plus the ones of `STARArguments`.

    The loss on each trained response token t with STAR weight w_t is
    `w_t * CE_t + (1 - w_t) * kl_coef * KL_t` (`shaping="star_dss"`); the paper's baselines are in the same trainer.
    """

    # SFTConfig's field with another default: a conversational dataset trains its responses only, as the paper and
    # Axolotl do (issue 33); training the prompts is the user's explicit choice (False).
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Which tokens of a `messages` dataset are trained. None (this trainer's default; SFTConfig's is "
            "False): the assistant responses only, as in the paper and Axolotl's `train_on_inputs: false`, found as "
            "the STAR weights are (no `{% generation %}` markers needed). True: TRL's assistant masks (a chat "
            "template with `{% generation %}` markers). False: every token, the prompts included, with full "
            "cross-entropy. Prompt/completion data follows `completion_only_loss`, as in TRL."
        },
    )

    def __post_init__(self):
        # Our checks first: they are cheap and name the STAR-DSS field at fault.
        if isinstance(self.guardrail, str):
            self.guardrail = [self.guardrail]
        check_star_settings({name: getattr(self, name) for name in CHECKED_FIELDS})
        super().__post_init__()


# The settings both trainers share (`STARDSSConfig` here, the Axolotl plugin's `star_dss_*` keys).
CHECKED_FIELDS = (
    "shaping",
    "kl_coef",
    "kl_estimator",
    "star_chunk_size",
    "star_lookahead",
    "star_unit",
    "guardrail_temperature",
    "guardrail_controversial",
    "precompute_ref_log_probs",
    "content_special_tokens",
    "rejection_threshold",
    "full_kl_chunk_size",
)


def check_star_settings(values: dict, names: dict | None = None) -> None:
    """Raise a `ValueError` naming the setting (as the user wrote it: `names` maps our field names to theirs)
    for the first bad value among `values` (keys from `CHECKED_FIELDS`; missing keys are not checked)."""
    name = {field: field for field in CHECKED_FIELDS} | (names or {})
    shaping, estimator = values.get("shaping", "star_dss"), values.get("kl_estimator", "k2")
    if shaping not in SHAPINGS:
        raise STARDSSError(f"{name['shaping']}={shaping!r} is not known. Use one of {SHAPINGS}.")
    if estimator not in KL_ESTIMATORS:
        raise STARDSSError(f"{name['kl_estimator']}={estimator!r} is not known. Use one of {KL_ESTIMATORS}.")
    kl_coef = values.get("kl_coef", 0.5)
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise STARDSSError(f"{name['kl_coef']}={kl_coef!r} must be a number >= 0 (the paper uses 0.5).")
    chunk = values.get("star_chunk_size", 5)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise STARDSSError(f"{name['star_chunk_size']}={chunk!r} must be a positive whole number (the paper: 5).")
    lookahead = values.get("star_lookahead", 0)
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise STARDSSError(
            f"{name['star_lookahead']}={lookahead!r} must be a whole number of chunks >= 0 (0 = the "
            "paper's STAR; e.g. 1 to weigh each chunk also by the next one's score)."
        )
    if values.get("star_unit", "token") not in UNITS:
        raise STARDSSError(f"{name['star_unit']}={values['star_unit']!r} is not known. Use one of {UNITS}.")
    temperature = values.get("guardrail_temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise STARDSSError(f"{name['guardrail_temperature']}={temperature!r} must be a number > 0. Use e.g. 1.0.")
    controversial = values.get("guardrail_controversial")
    if controversial is not None and controversial not in CONTROVERSIAL:
        raise STARDSSError(
            f"{name['guardrail_controversial']}={controversial!r} is not known. Use 'unsafe' (Qwen3Guard's strict "
            "mode: its Controversial class weighs as unsafe), 'safe' (its loose mode), or leave it unset."
        )
    mode = values.get("content_special_tokens", "refuse")
    if mode not in CONTENT_SPECIAL_TOKENS:
        raise STARDSSError(
            f"{name['content_special_tokens']}={mode!r} is not known. Use one of {CONTENT_SPECIAL_TOKENS}: 'refuse' "
            "(the default: stop on content holding the policy's special-token strings), 'drop' or 'keep'."
        )
    threshold = values.get("rejection_threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise STARDSSError(
            f"{name['rejection_threshold']}={threshold!r} must be a number in [0, 1]: it is compared with STAR scores, "
            "which are probabilities (the paper: 0.5)."
        )
    kl_chunk = values.get("full_kl_chunk_size", 1024)
    if isinstance(kl_chunk, bool) or not isinstance(kl_chunk, int) or kl_chunk <= 0:
        raise STARDSSError(
            f"{name['full_kl_chunk_size']}={kl_chunk!r} must be a positive whole number of tokens, e.g. 1024."
        )
    precompute = name["precompute_ref_log_probs"]
    if values.get("precompute_ref_log_probs") and estimator == "full":
        raise STARDSSError(
            f"{precompute}=True stores log pi_ref of the dataset tokens only, but {name['kl_estimator']}='full' "
            f"needs the reference's whole distribution at every step. Use {name['kl_estimator']}='k2' (or k1/k3) "
            f"with precomputed log-probs, or {precompute}=False."
        )
    if values.get("precompute_ref_log_probs") and shaping not in REFERENCE_SHAPINGS:
        raise STARDSSError(
            f"{precompute}=True does nothing with {name['shaping']}={shaping!r}, which uses no reference. Set it to "
            f"False, or use {name['shaping']}='star_dss' or 'deep_token'."
        )


def check_sharding(values: dict, sharded: bool, has_reference: bool, names: dict | None = None) -> None:
    """DeepSpeed ZeRO-3 and FSDP shard the weights across processes (`sharded`), which two settings cannot work
    with: the full-vocabulary KL (it reads the whole output layer) and a frozen copy of the model as the reference
    (a full finetune with neither `ref_model` nor PEFT, `has_reference=False`). `names` as in `check_star_settings`."""
    name = {field: field for field in CHECKED_FIELDS} | (names or {})
    shaping = values.get("shaping", "star_dss")
    if not sharded or shaping not in REFERENCE_SHAPINGS:
        return
    if shaping == "star_dss" and values.get("kl_estimator") == "full":
        raise STARDSSError(
            f"{name['kl_estimator']}='full' reads the whole output layer, which DeepSpeed ZeRO-3/FSDP shard across "
            f"processes. Use {name['kl_estimator']}='k2' (with {name['precompute_ref_log_probs']}=True), or train "
            "without sharding (DDP)."
        )
    if not has_reference and not values.get("precompute_ref_log_probs"):
        raise STARDSSError(
            "A full finetune under DeepSpeed ZeRO-3/FSDP would need a sharded frozen copy of the model as the "
            f"reference. Set {name['precompute_ref_log_probs']}=True (no reference is held during training), or use "
            "PEFT (LoRA/QLoRA: the reference is the model with its adapters disabled)."
        )
