"""`STARArguments`: every STAR-DSS setting, with its default, allowed values and help, stated once. A module that
imports no TRL (unlike `config`, whose `STARDSSConfig` subclasses TRL's `SFTConfig`), so `star-dss --help` reads the
settings' defaults and help without loading TRL; `trl_star_dss.config.STARArguments` is this same class."""

from __future__ import annotations

from dataclasses import dataclass, field

from .choices import CONTENT_SPECIAL_TOKENS, CONTROVERSIAL, KL_ESTIMATORS, SHAPINGS, UNITS


@dataclass
class STARArguments:
    """The STAR-DSS settings, with their defaults, stated once: `STARDSSConfig` is `SFTConfig` plus these, and the
    Axolotl plugin reads the same dataclass (its `star_dss_*` keys and its training-arguments mixin)."""

    shaping: str = field(
        default="star_dss",
        metadata={
            "help": "How the guardrail's scores shape the loss: `star_dss` (CE on safe spans, KL to the reference on "
            "unsafe ones), `deep_token` (Qi et al. 2025, token-wise constrained objective, no scores needed), "
            "`rejection_sampling` (drop responses whose whole-response score is below `rejection_threshold`) or "
            "`sft` (plain cross-entropy).",
            "choices": list(SHAPINGS),
        },
    )
    kl_coef: float = field(
        default=0.5, metadata={"help": "lambda: weight of the KL term on unsafe spans (the paper: 0.5)."}
    )
    kl_estimator: str = field(
        default="k2",
        metadata={
            "help": "KL estimator: `k2` = (log ratio)^2 / 2 (the paper authors' code), `k1`, `k3` from the dataset "
            "token, or `full` = reverse KL over the whole vocabulary (needs a live reference).",
            "choices": list(KL_ESTIMATORS),
        },
    )
    star_chunk_size: int = field(
        default=5, metadata={"help": "M: the response is scored after every M units (the paper: 5 tokens)."}
    )
    star_lookahead: int = field(
        default=0,
        metadata={
            "help": "L: a token's STAR weight is the minimum of its chunk's score and the next L chunks' "
            "(this project's extension for guards that flag harm late, docs/method.md 1.6; 0 = the paper)."
        },
    )
    star_unit: str = field(
        default="token",
        metadata={"help": "Unit of `star_chunk_size`: `token` (policy tokenizer) or `word`.", "choices": list(UNITS)},
    )
    guardrail: list[str] | None = field(
        default=None,
        metadata={
            "help": "Guard model(s) (hub ids, paths or `module:function` rules) that score the dataset at start-up "
            "when it has no `star` column yet; several are averaged. Leave unset for a dataset scored by "
            "`star-dss score`."
        },
    )
    guardrail_temperature: float = field(
        default=1.0, metadata={"help": "T in sigmoid((z_safe - z_unsafe) / T). 0.2 reproduces the authors' code."}
    )
    guardrail_family: str | None = field(
        default=None,
        metadata={
            "help": "Force the guard family (one of `trl_star_dss.scoring.families.FAMILIES`, or `generic`); "
            "default: recognised from the guard's chat template, else its name."
        },
    )
    guardrail_controversial: str | None = field(
        default=None,
        metadata={
            "help": "Qwen3Guard only: how its third class `Controversial` counts, `unsafe` (its strict mode, the "
            "default when unset) or `safe` (loose). Refused for guards without a third class.",
            "choices": [None, *CONTROVERSIAL],
        },
    )
    star_scores_dir: str | None = field(
        default=None,
        metadata={"help": "Where start-up scoring caches its scores (default: `<output_dir>/star_scores`)."},
    )
    rejection_threshold: float = field(
        default=0.5,
        metadata={"help": "With `shaping='rejection_sampling'`: responses scored below this are not trained."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the dataset tokens in one pass before training and keep them "
            "with the dataset: training then holds no reference model (token KL estimators only)."
        },
    )
    star_report: bool = field(
        default=False,
        metadata={
            "help": "At the start of training, write the pictures of `star-dss show` for the training set "
            "(heatmap.html, summary.png) to `<output_dir>/star_report`."
        },
    )
    content_special_tokens: str = field(
        default="refuse",
        metadata={
            "help": "What to do with training examples whose message content holds a special-token string of the "
            "policy tokenizer (e.g. `<|eot_id|>`), which the chat template would turn into a real turn boundary: "
            "`refuse` (stop with an error naming the example), `drop` (do not train them) or `keep` (train them as "
            "they are, for data that holds such strings on purpose). Applies to every shaping.",
            "choices": list(CONTENT_SPECIAL_TOKENS),
        },
    )
    full_kl_chunk_size: int = field(
        default=1024, metadata={"help": "Tokens per chunk of the full-vocabulary KL (`kl_estimator='full'`)."}
    )
