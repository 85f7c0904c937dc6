"""`STARDSSConfig`: `SFTConfig` plus the fields of STAR-DSS. Defaults are the paper's (docs/method.md, "The method")."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from trl import SFTConfig

# `STARArguments`, its checks and what is derived from it live in a module without TRL (`star-dss --help` reads
# it); they are public here too.
from .arguments import (  # noqa: F401
    CHECKED_FIELDS,
    STARArguments,
    STARSettings,
    args_docstring,
    check_star_settings,
    checked_fields,
    data_fields,
    declared,
    settings_class,
)

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
    __doc__ = """
    Configuration class for [`STARDSSTrainer`].

    This class includes only the parameters that are specific to STAR-DSS (`STARArguments`, shared with the Axolotl
    plugin). For a full list of training arguments, please refer to the [`~transformers.TrainingArguments`] and
    [`~trl.SFTConfig`] documentation; docs/training.md says which of them each shaping honours and which it refuses.
    The loss on each trained response token t with STAR weight w_t is `w_t * CE_t + (1 - w_t) * kl_coef * KL_t`
    (`shaping="star_dss"`); the paper's baselines are in the same trainer.

""" + args_docstring()

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
        check_star_settings({f.name: getattr(self, f.name) for f in fields(STARArguments)})
        super().__post_init__()


def check_sharding(values: dict, sharded: bool, has_reference: bool, names: dict | None = None) -> None:
    """DeepSpeed ZeRO-3 and FSDP shard the weights across processes (`sharded`), which two settings cannot work
    with: the full-vocabulary KL (it reads the whole output layer) and a frozen copy of the model as the reference
    (a full finetune with neither `ref_model` nor PEFT, `has_reference=False`). `names` as in `check_star_settings`."""
    name = {f.name: f.name for f in fields(STARArguments)} | (names or {})
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
