"""The host's options that STAR-DSS cannot honour, refused by name when the trainer is built (docs/training.md,
"SFTConfig options and PEFT methods under each shaping").

Under `star_dss` and `deep_token` the loss is this project's (`STARLossMixin.star_loss`), never `SFTTrainer`'s
`compute_loss`; every option that acts only there would be dropped without a word. The shapings that train the
host's own cross-entropy (`sft`, `rejection_sampling`) leave them to the host. Each refusal says what the option does,
why this shaping cannot keep it, and what to do instead. Pure checks over plain values, so the TRL trainer and the
Axolotl plugin ask the same questions.
"""

from __future__ import annotations

from .choices import REFERENCE_SHAPINGS
from .errors import STARDSSError


# PEFT's prefix tuning learns keys and values for every layer instead of adapter weights (a `peft.PeftType` value).
PREFIX_METHODS = ("PREFIX_TUNING",)


def _own_loss(option: str) -> str:
    return f'this shaping trains its own loss (docs/method.md, "The loss"), not SFTTrainer\'s cross-entropy, where {option} acts'


def check_loss_options(
    shaping: str,
    loss_type: str = "nll",
    label_smoothing_factor: float = 0.0,
    neftune_noise_alpha: float | None = None,
    compute_loss_func=None,
) -> None:
    """Refuse, for the shapings that train their own loss (`star_dss`, `deep_token`), the host options that act in
    the host's cross-entropy."""
    if shaping not in REFERENCE_SHAPINGS:
        return
    if loss_type != "nll":
        raise STARDSSError(
            f"loss_type={loss_type!r} is refused with shaping={shaping!r}: {_own_loss('DFT reweighting')}, "
            "and the paper's loss was not studied with it. Use loss_type='nll', or shaping='sft' / "
            "'rejection_sampling' to train with DFT."
        )
    if label_smoothing_factor:
        raise STARDSSError(
            f"label_smoothing_factor={label_smoothing_factor!r} is refused with shaping={shaping!r}: "
            f"{_own_loss('label smoothing')}. Set label_smoothing_factor=0.0, or use shaping='sft' / "
            "'rejection_sampling' to train with it."
        )
    if neftune_noise_alpha is not None:
        # Measured (issue 36): with alpha=5 the logged KL is 0.016 at step 1, before any update, because the policy's
        # forward is noised and the reference's is not (with LoRA both are noised, each with other noise).
        raise STARDSSError(
            f"neftune_noise_alpha={neftune_noise_alpha!r} is refused with shaping={shaping!r}: NEFTune adds noise to "
            "the policy's embeddings, so the term that keeps it close to the reference would also penalise the "
            "noise (a KL above 0 before any update). Remove neftune_noise_alpha, or use shaping='sft' / "
            "'rejection_sampling' to train with it."
        )
    if compute_loss_func is not None:
        raise STARDSSError(
            f"compute_loss_func={getattr(compute_loss_func, '__name__', compute_loss_func)!r} is refused with "
            f"shaping={shaping!r}: {_own_loss('compute_loss_func')}. Leave compute_loss_func unset, or use "
            "shaping='sft' / 'rejection_sampling'."
        )


def check_context_parallel(shaping: str, parallelism_config) -> None:
    """Context and sequence parallelism (accelerate's `ParallelismConfig`) split each sequence across processes."""
    enabled = parallelism_config is not None and (
        getattr(parallelism_config, "cp_enabled", False) or getattr(parallelism_config, "sp_enabled", False)
    )
    if shaping in REFERENCE_SHAPINGS and enabled:
        raise STARDSSError(
            f"Context or sequence parallelism (parallelism_config with cp_size or sp_size > 1) is refused with "
            f"shaping={shaping!r}: it splits each sequence across processes and passes `shift_labels`, while the "
            "per-token STAR weights, reference log-probs and Deep Token's positions stay whole. Train with data "
            "parallelism, DeepSpeed ZeRO or FSDP instead (cp_size=1 and sp_size=1)."
        )


def check_peft_method(shaping: str, peft_type: str | None) -> None:
    """PEFT methods. Adapters on the weights (LoRA, DoRA, IA3, LoHa, LoKr, OFT, ...) are disabled to read the
    reference; the virtual tokens of prompt tuning and p-tuning come before the sequence in the policy's forward and
    `star_loss` reads the label positions after them. Prefix tuning is refused under every shaping: with this stack
    (transformers 5.23, PEFT 0.21) its forward fails in attention, TRL's own `SFTTrainer` included."""
    if peft_type in PREFIX_METHODS:
        raise STARDSSError(
            f"peft_config of type {peft_type} (prefix tuning) is refused with shaping={shaping!r}: with "
            "transformers 5 and PEFT 0.21 its forward fails in attention (the attention mask is 4 tokens shorter than "
            "the keys with num_virtual_tokens=4), under TRL's SFTTrainer too. Use prompt tuning or p-tuning "
            "(PromptTuningConfig, PromptEncoderConfig), or an adapter method such as LoRA."
        )
