"""The `star_dss_*` configuration keys, checked when Axolotl validates the config (before any model is loaded).

One rule maps them to the settings: `star_dss_<field>` for each field of `trl_star_dss.config.STARArguments` (the
dataclass `STARDSSConfig` is made of), the field's own `star_` prefix dropped (`star_chunk_size` ->
`star_dss_chunk_size`). The defaults are the dataclass's; every key here defaults to None ("unset"), so a config
without them validates exactly as before.
"""

from __future__ import annotations

import difflib
import json
import os
import typing
import warnings
from dataclasses import asdict, fields

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, create_model, model_validator

from trl_star_dss.config import SCORED_SHAPINGS, STARArguments, check_sharding, check_star_settings
from trl_star_dss.errors import STARDSSError


PLUGIN_NAME = "star_dss.StarDSSPlugin"
PREFIX = "star_dss_"


def key(field: str) -> str:
    """The Axolotl key of a `STARArguments` field: the one rule."""
    return PREFIX + field.removeprefix("star_")


# `star_report` draws pictures with the project's tools, which the plugin does not load (use `star-dss show`).
NOT_IN_AXOLOTL = ("star_report",)


def axolotl_fields(settings_type: type = STARArguments) -> dict[str, str]:
    """Key -> field, for every field of `settings_type` (`STARArguments`, or a subclass) that Axolotl takes."""
    return {key(f.name): f.name for f in fields(settings_type) if f.name not in NOT_IN_AXOLOTL}


FIELDS = axolotl_fields()
NAMES = {name: k for k, name in FIELDS.items()}  # field -> key, for errors that name what the user wrote
# Keys of the plugin alone (no `STARDSSConfig` field: TRL users pass a dataset that has its `star` column).
SCORES_PATH = "star_dss_scores_path"
# Set by the plugin's validator from `star_dss_scores_path`, or from what the guard is (so the prepared data's hash
# follows the scores), never by users: declared, not suggested.
SCORES_FINGERPRINT = "star_dss_scores_fingerprint"
# Keys of release 0.2 whose names the rule changed: accepted, with a warning, until the next release.
RENAMED = {"star_dss_precompute_ref": key("precompute_ref_log_probs")}


# The boolean fields: read by `read_bool` wherever the raw config is read (issue 33).
# Read from the resolved annotations: a field's raw `type` is the annotation's text (`Annotated[bool, Setting(...)]`).
BOOL_FIELDS = {name for name, hint in typing.get_type_hints(STARArguments).items() if hint is bool}


def read_bool(value, key: str) -> bool:
    """A boolean key as the validated config reads it: pydantic's `bool`, the rule Axolotl's schema applies to every
    key (`"false"`, `"no"`, `"0"`, `"off"` read False; `"true"`, `"yes"`, `"1"`, `"on"` True). `register` and the
    validator's own checks see the raw YAML, where a quoted `"false"` is a string (and `bool("false")` True): read
    this way, they agree with the config Axolotl trains by. Any other value is refused."""
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise STARDSSError(
            f"{key}={value!r} is not a boolean. Write true or false (without quotes in YAML)."
        ) from None


def star_dss_enabled(cfg) -> bool:
    """On with `star_dss: true`, or when the plugin is listed under `plugins:` (unless `star_dss: false`)."""
    flag = cfg.get("star_dss")
    if flag is not None:
        return read_bool(flag, "star_dss")
    listed = {name.replace(":", ".") for name in cfg.get("plugins") or []}
    return PLUGIN_NAME in listed


def settings(cfg) -> STARArguments:
    """The `STARArguments` of a config: its `star_dss_*` keys, the dataclass's defaults for the unset ones."""
    values = {name: cfg.get(k) for k, name in FIELDS.items() if cfg.get(k) is not None}
    for name in BOOL_FIELDS & values.keys():
        values[name] = read_bool(values[name], NAMES[name])
    if isinstance(values.get("guardrail"), str):
        values["guardrail"] = [values["guardrail"]]
    return STARArguments(**values)


def migrate_renamed(cfg) -> None:
    """Old key -> its new name, in place, with a warning (one release)."""
    for old, new in RENAMED.items():
        if cfg.get(old) is None:
            continue
        if cfg.get(new) is not None:
            raise STARDSSError(f"{old} (the old name of {new}) and {new} are both set. Keep {new} only.")
        warnings.warn(
            f"{old} is deprecated (renamed {new}, `star_dss_` + the STARDSSConfig field); it is accepted "
            "until the next release. Rename it in your config.",
            FutureWarning,
            stacklevel=2,
        )
        cfg[new] = cfg.pop(old)


def check_keys(cfg) -> None:
    """The plugin owns the `star_dss_` prefix: a key with it that no field declares is a typo, which pydantic would
    silently drop (`star_dss_chunk_sise: 5` would train with the default M). Axolotl's own keys are not checked."""
    known = [*FIELDS, SCORES_PATH]
    unknown = [
        k
        for k in cfg
        if isinstance(k, str)
        and k.startswith(PREFIX)
        and k not in known
        and k not in RENAMED
        and k != SCORES_FINGERPRINT
    ]
    if not unknown:
        return
    guesses, lost = [], False
    for k in unknown:
        # Compared without the shared prefix, which would make every key look close to every other.
        close = difflib.get_close_matches(k[len(PREFIX) :], [name[len(PREFIX) :] for name in known], n=1)
        guesses.append(f"{k!r} (did you mean {PREFIX + close[0]!r}?)" if close else repr(k))
        lost = lost or not close
    listing = f" The star_dss_* keys are: {', '.join(known)}." if lost else ""
    raise STARDSSError(
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


def scores_fingerprint(path: str) -> str:
    from datasets import load_from_disk

    from trl_star_dss.scoring import scored_dataset_path

    return load_from_disk(scored_dataset_path(path) if os.path.isdir(scored_dataset_path(path)) else path)._fingerprint


def _check(data):
    if not isinstance(data, dict) or not star_dss_enabled(data):
        return data
    data = dict(data)
    migrate_renamed(data)
    check_keys(data)
    values = asdict(settings(data))
    check_star_settings(values, names=NAMES)
    shaping, scores_path = values["shaping"], data.get(SCORES_PATH)
    if shaping in SCORED_SHAPINGS and not values["guardrail"] and not scores_path:
        raise STARDSSError(
            f"star_dss_shaping={shaping!r} needs STAR scores, but neither star_dss_guardrail nor "
            "star_dss_scores_path is set. Name a guard (e.g. `star_dss_guardrail: meta-llama/Llama-Guard-3-1B`) "
            "or point star_dss_scores_path at the output of `star-dss score`."
        )
    if values["guardrail"] and scores_path:
        raise STARDSSError(
            "star_dss_guardrail and star_dss_scores_path are both set, so it is unclear which scores "
            "to use. Keep one of them."
        )
    if scores_path and not os.path.exists(scores_path):
        raise STARDSSError(
            f"star_dss_scores_path={scores_path!r} does not exist. Point it at the directory written "
            "by `star-dss score --output DIR`."
        )
    if data.get("rl"):
        raise STARDSSError(
            f"star_dss is for supervised finetuning, but rl={data['rl']!r} is set. Remove `rl:` "
            "(STAR-DSS shapes the SFT loss), or turn star_dss off."
        )
    parallel = {k: data.get(k) for k in ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size")}
    if any((v or 1) > 1 for v in parallel.values()):
        raise STARDSSError(
            f"star_dss does not support context/sequence/tensor parallelism ({parallel}): the per-token STAR "
            "weights are not split with the sequence. Set these to 1 (data parallel, DeepSpeed or FSDP work)."
        )
    if data.get("balance_labels") and not data.get("sample_packing") and shaping in ("star_dss", "deep_token"):
        # Axolotl's padded label balancing accepts its own collator classes only (`type(collator) in (...)`), and
        # this shaping needs the plugin's collator (a subclass) to carry the per-token weights.
        raise STARDSSError(
            f"balance_labels=True without sample_packing does not work with star_dss_shaping="
            f"{shaping!r}. Turn on sample_packing (label-balanced packing works), or remove "
            "balance_labels."
        )
    if data.get("pretraining_dataset") or data.get("reward_model") or data.get("process_reward_model"):
        raise STARDSSError(
            "star_dss trains supervised chat or instruction datasets (`datasets:`), not "
            "pretraining_dataset or reward models. Remove those keys, or turn star_dss off."
        )
    sharded = bool(data.get("fsdp") or data.get("fsdp_config") or _zero3(data.get("deepspeed")))
    check_sharding(values, sharded, has_reference=bool(data.get("adapter")), names=NAMES)
    if scores_path:
        data[SCORES_FINGERPRINT] = scores_fingerprint(scores_path)
    elif values["guardrail"] and shaping in SCORED_SHAPINGS:
        # What the guard is (its files, hub commit or code; issue 33) joins the prepared data's hash, so a guard
        # changed under the same name prepares (and scores) the data again instead of reusing the old weights.
        data[SCORES_FINGERPRINT] = guard_fingerprint(values)
    return data


def guard_fingerprint(values: dict) -> str:
    from trl_star_dss.scoring.families import guard_options, guardrail_id

    return guardrail_id(
        values["guardrail"],
        values["guardrail_family"],
        values["guardrail_temperature"],
        **guard_options(values["guardrail_controversial"]),
    )


def _pydantic_type(annotation):
    # A list field takes one value too (`star_dss_guardrail: meta-llama/Llama-Guard-3-1B`).
    if list[str] in typing.get_args(annotation):
        return str | list[str] | None
    return annotation | None


class _Checked(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def check_star_dss(cls, data):
        return _check(data)


def input_model(settings_type: type = STARArguments) -> type[BaseModel]:
    """The pydantic model Axolotl merges into its config schema: a `star_dss_*` key (by the rule above) for each field
    of `settings_type`, with the field's type and help, plus the plugin's own keys."""
    # The bare types: a field's `Setting` is for our checks, not pydantic's.
    hints = typing.get_type_hints(settings_type)
    helps = {f.name: f.metadata.get("help", "") for f in fields(settings_type)}
    model = create_model(
        "StarDSSArgs",
        __base__=_Checked,
        __doc__="STAR-DSS (arXiv 2505.17196) for supervised finetuning: `star_dss: true` plus a guardrail or scores.",
        star_dss=(
            bool | None,
            Field(default=None, description="Turn STAR-DSS on (the plugin does nothing otherwise)."),
        ),
        **{
            k: (_pydantic_type(hints[name]), Field(default=None, description=f"`{name}`: {helps[name]}"))
            for k, name in axolotl_fields(settings_type).items()
        },
        **{
            SCORES_PATH: (
                str | None,
                Field(
                    default=None,
                    description="Scores made by `star-dss score --output DIR` (DIR, or "
                    "DIR/dataset) for the same conversations, instead of scoring here.",
                ),
            ),
            SCORES_FINGERPRINT: (str | None, Field(default=None)),
        },
    )
    model.__module__ = __name__
    return model


StarDSSArgs = input_model()
