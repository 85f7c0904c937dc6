"""The `star_dss_*` configuration keys, checked when Axolotl validates the config (before any model is loaded).

Every key defaults to None, so a config without them validates exactly as before; `settings()` turns them into
the trainer's values with `STARDSSConfig`'s defaults (the paper's).
"""

from __future__ import annotations

import difflib
import json
import os

from pydantic import BaseModel, Field, model_validator

PLUGIN_NAME = "star_dss.StarDSSPlugin"

# Axolotl key -> `STARDSSConfig` field: one concept, one name; the prefix keeps Axolotl's flat namespace clear.
FIELDS = {
    "star_dss_shaping": "shaping",
    "star_dss_kl_coef": "kl_coef",
    "star_dss_kl_estimator": "kl_estimator",
    "star_dss_chunk_size": "star_chunk_size",
    "star_dss_lookahead": "star_lookahead",
    "star_dss_guardrail_temperature": "guardrail_temperature",
    "star_dss_guardrail_controversial": "guardrail_controversial",
    "star_dss_precompute_ref": "precompute_ref_log_probs",
    "star_dss_rejection_threshold": "rejection_threshold",
    "star_dss_content_special_tokens": "content_special_tokens",
    "star_dss_full_kl_chunk_size": "full_kl_chunk_size",
}


def star_dss_enabled(cfg) -> bool:
    """On with `star_dss: true`, or when the plugin is listed under `plugins:` (unless `star_dss: false`)."""
    flag = cfg.get("star_dss")
    if flag is not None:
        return bool(flag)
    listed = {name.replace(":", ".") for name in cfg.get("plugins") or []}
    return PLUGIN_NAME in listed


def settings(cfg) -> dict:
    """The trainer-side values (`STARDSSConfig` names) of a config's `star_dss_*` keys, `STARDSSConfig`'s defaults
    filled in."""
    from dataclasses import fields

    from trl_star_dss.config import STARDSSConfig

    wanted = set(FIELDS.values())
    values = {field.name: field.default for field in fields(STARDSSConfig) if field.name in wanted}
    for key, name in FIELDS.items():
        if cfg.get(key) is not None:
            values[name] = cfg.get(key)
    guardrail = cfg.get("star_dss_guardrail")
    values["guardrail"] = [guardrail] if isinstance(guardrail, str) else guardrail
    values["guardrail_family"] = cfg.get("star_dss_guardrail_family")
    values["scores_path"] = cfg.get("star_dss_scores_path")
    return values


# Set by the plugin itself while it prepares data (`data.load_star_datasets`), never by users: accepted, not suggested.
INTERNAL_KEYS = ("star_dss_scores_fingerprint",)


def check_keys(cfg) -> None:
    """The plugin owns the `star_dss_` prefix: a key with it that no field declares is a typo, which pydantic would
    silently drop (`star_dss_chunk_sise: 5` would train with the default M). Axolotl's own keys are not checked."""
    known = [name for name in StarDSSArgs.model_fields if name.startswith("star_dss_")]
    unknown = [key for key in cfg if isinstance(key, str) and key.startswith("star_dss_")
               and key not in known and key not in INTERNAL_KEYS]  # fmt: skip
    if not unknown:
        return
    prefix, guesses, lost = "star_dss_", [], False
    for key in unknown:
        # Compared without the shared prefix, which would make every key look close to every other.
        close = difflib.get_close_matches(key[len(prefix):], [k[len(prefix):] for k in known], n=1)
        guesses.append(f"{key!r} (did you mean {prefix + close[0]!r}?)" if close else repr(key))
        lost = lost or not close
    listing = f" The star_dss_* keys are: {', '.join(known)}." if lost else ""
    raise ValueError(
        f"Unknown STAR-DSS key{'s' if len(unknown) > 1 else ''} {', '.join(guesses)}: the plugin would ignore "
        f"{'them' if len(unknown) > 1 else 'it'} (and use the default). Fix the spelling or remove the key.{listing}"
    )


def _zero3(deepspeed) -> bool:
    if isinstance(deepspeed, dict):
        config = deepspeed
    elif isinstance(deepspeed, str) and os.path.exists(deepspeed):
        with open(deepspeed) as handle:
            config = json.load(handle)
    else:
        return False
    return (config.get("zero_optimization") or {}).get("stage") == 3


class StarDSSArgs(BaseModel):
    """STAR-DSS (arXiv 2505.17196) for supervised finetuning: `star_dss: true` plus a guardrail or scores."""

    star_dss: bool | None = Field(default=None, description="Turn STAR-DSS on (the plugin does nothing otherwise).")
    star_dss_guardrail: str | list[str] | None = Field(
        default=None,
        description="Guard model(s) (hub ids, paths or `module:function` rules) that score the training data during "
        "`axolotl preprocess` / the start of `axolotl train`; several are averaged.",
    )
    star_dss_guardrail_family: str | None = Field(
        default=None,
        description="Force the guard family (one of `trl_star_dss.scoring.families.FAMILIES`, or `generic`); default: "
        "recognised from the guard's chat template, else its name.",
    )
    star_dss_guardrail_controversial: str | None = Field(
        default=None,
        description="Qwen3Guard only: its `Controversial` class counts as `unsafe` (strict, the default) or `safe`.",
    )
    star_dss_scores_path: str | None = Field(
        default=None,
        description="Scores made by `star-dss score --output DIR` (DIR, or DIR/dataset) for the same conversations, "
        "instead of scoring here.",
    )
    star_dss_chunk_size: int | None = Field(default=None, description="M: score after every M response tokens (5).")
    star_dss_lookahead: int | None = Field(
        default=None, description="L: a token weighs by the minimum of its chunk's and the next L chunks' scores (0)."
    )
    star_dss_kl_coef: float | None = Field(default=None, description="lambda: weight of the KL on unsafe spans (0.5).")
    star_dss_kl_estimator: str | None = Field(default=None, description="`k2` (default), `k1`, `k3` or `full`.")
    star_dss_shaping: str | None = Field(
        default=None, description="`star_dss` (default), `deep_token`, `rejection_sampling` or `sft`."
    )
    star_dss_guardrail_temperature: float | None = Field(default=None, description="T in the STAR sigmoid (1.0).")
    star_dss_rejection_threshold: float | None = Field(
        default=None, description="With `star_dss_shaping: rejection_sampling`: drop examples scored below it (0.5)."
    )
    star_dss_content_special_tokens: str | None = Field(
        default=None,
        description="Training examples whose message content holds the policy tokenizer's special-token strings: "
        "`refuse` (default: stop with an error), `drop` (not trained) or `keep` (trained as they are).",
    )
    star_dss_full_kl_chunk_size: int | None = Field(
        default=None, description="Tokens per chunk of the full-vocabulary KL (`star_dss_kl_estimator: full`; 1024)."
    )
    star_dss_precompute_ref: bool | None = Field(
        default=None,
        description="Compute the reference log-probs of the dataset in one pass before training; training then holds "
        "no reference model (token KL estimators only).",
    )

    @model_validator(mode="before")
    @classmethod
    def check_star_dss(cls, data):
        if not isinstance(data, dict) or not star_dss_enabled(data):
            return data
        from trl_star_dss.config import SCORED_SHAPINGS, check_sharding, check_star_settings

        values = settings(data)
        check_star_settings(values, names={name: key for key, name in FIELDS.items()})
        shaping = values["shaping"]
        if shaping in SCORED_SHAPINGS and not values["guardrail"] and not values["scores_path"]:
            raise ValueError(
                f"star_dss_shaping={shaping!r} needs STAR scores, but neither star_dss_guardrail nor "
                "star_dss_scores_path is set. Name a guard (e.g. `star_dss_guardrail: meta-llama/Llama-Guard-3-1B`) "
                "or point star_dss_scores_path at the output of `star-dss score`."
            )
        if values["guardrail"] and values["scores_path"]:
            raise ValueError(
                "star_dss_guardrail and star_dss_scores_path are both set, so it is unclear which scores to use. "
                "Keep one of them."
            )
        if values["scores_path"] and not os.path.exists(values["scores_path"]):
            raise ValueError(
                f"star_dss_scores_path={values['scores_path']!r} does not exist. Point it at the directory written by "
                "`star-dss score --output DIR`."
            )
        if data.get("rl"):
            raise ValueError(
                f"star_dss is for supervised finetuning, but rl={data['rl']!r} is set. Remove `rl:` (STAR-DSS shapes "
                "the SFT loss), or turn star_dss off."
            )
        parallel = {k: data.get(k) for k in ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size")}
        if any((v or 1) > 1 for v in parallel.values()):
            raise ValueError(
                f"star_dss does not support context/sequence/tensor parallelism ({parallel}): the per-token STAR "
                "weights are not split with the sequence. Set these to 1 (data parallel, DeepSpeed or FSDP work)."
            )
        sharded = bool(data.get("fsdp") or data.get("fsdp_config") or _zero3(data.get("deepspeed")))
        check_sharding(values, sharded, has_reference=bool(data.get("adapter")),
                       names={name: key for key, name in FIELDS.items()})  # fmt: skip
        return data
