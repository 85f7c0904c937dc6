"""`STARArguments`: every STAR-DSS setting, with its default, allowed values, help and check, stated once, and what
is derived from it (`check_star_settings`, `STARSettings`, the `Args:` docs of `STARDSSConfig`). A module that
imports no TRL (unlike `config`, whose `STARDSSConfig` subclasses TRL's `SFTConfig`), so `star-dss --help` reads the
settings' defaults and help without loading TRL; `trl_star_dss.config.STARArguments` is this same class."""

from __future__ import annotations

import functools
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Annotated

from .choices import CONTENT_SPECIAL_TOKENS, CONTROVERSIAL, KL_ESTIMATORS, REFERENCE_SHAPINGS, SHAPINGS, UNITS
from .errors import STARDSSError


@dataclass(frozen=True)
class Setting:
    """What a setting's annotation says beyond its type, `Annotated[type, Setting(...)]`: how its value is checked and
    whether it changes the prepared data. With the field's default, `help` and `choices` (its metadata), a setting is
    written once; `check_star_settings`, `STARSettings` and the Axolotl plugin's keys and cache key read it from here.

    In the annotation, not in the field's metadata: TRL's parser (transformers' `HfArgumentParser`) hands a field's
    metadata to `argparse.add_argument` as keyword arguments, which refuses any key of its own.

    Args:
        valid: whether a value is allowed (after the value was found among the field's `choices`, if it has any).
        fix: what the error says after `name=value`: why the value is refused and what to write instead. For a field
            with `choices`, the default is "is not known. Use one of (...)".
        data: the setting changes what the data preparation gives (scores, weights, the examples kept), so the
            Axolotl plugin puts its key in the prepared dataset's cache key.
        checked: `check_star_settings` checks the value (False for free text such as paths and model names).
    """

    valid: Callable[[object], bool] | None = None
    fix: str = ""
    data: bool = False
    checked: bool = True


def _number(at_least=None, above=None, at_most=None) -> Callable[[object], bool]:
    def valid(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (
            (at_least is None or value >= at_least)
            and (above is None or value > above)
            and (at_most is None or value <= at_most)
        )

    return valid


def _count(at_least: int) -> Callable[[object], bool]:
    return lambda value: not isinstance(value, bool) and isinstance(value, int) and value >= at_least


def _boolean(value) -> bool:
    return isinstance(value, bool)


@dataclass
class STARArguments:
    """The STAR-DSS settings, with their defaults, stated once: `STARDSSConfig` is `SFTConfig` plus these, and the
    Axolotl plugin reads the same dataclass (its `star_dss_*` keys and its training-arguments mixin)."""

    shaping: Annotated[str, Setting(data=True)] = field(
        default="star_dss",
        metadata={
            "help": "How the guardrail's scores shape the loss: `star_dss` (CE on safe spans, KL to the reference on "
            "unsafe ones), `deep_token` (Qi et al. 2025, token-wise constrained objective, no scores needed), "
            "`rejection_sampling` (drop responses whose whole-response score is below `rejection_threshold`) or "
            "`sft` (plain cross-entropy).",
            "choices": list(SHAPINGS),
        },
    )
    kl_coef: Annotated[float, Setting(_number(at_least=0), "must be a number >= 0 (the paper uses 0.5).")] = field(
        default=0.5, metadata={"help": "lambda: weight of the KL term on unsafe spans (the paper: 0.5)."}
    )
    kl_estimator: Annotated[str, Setting()] = field(
        default="k2",
        metadata={
            "help": "KL estimator: `k2` = (log ratio)^2 / 2 (the paper authors' code), `k1`, `k3` from the dataset "
            "token, or `full` = reverse KL over the whole vocabulary (needs a live reference).",
            "choices": list(KL_ESTIMATORS),
        },
    )
    star_chunk_size: Annotated[
        int, Setting(_count(at_least=1), "must be a positive whole number (the paper: 5).", data=True)
    ] = field(default=5, metadata={"help": "M: the response is scored after every M units (the paper: 5 tokens)."})
    star_lookahead: Annotated[
        int,
        Setting(
            _count(at_least=0),
            "must be a whole number of chunks >= 0 (0 = the paper's STAR; e.g. 1 to weigh each chunk also by the "
            "next one's score).",
            data=True,
        ),
    ] = field(
        default=0,
        metadata={
            "help": "L: a token's STAR weight is the minimum of its chunk's score and the next L chunks' "
            "(this project's extension for guards that flag harm late, docs/method.md, 'Look-ahead'; 0 = the paper)."
        },
    )
    star_unit: Annotated[str, Setting(data=True)] = field(
        default="token",
        metadata={"help": "Unit of `star_chunk_size`: `token` (policy tokenizer) or `word`.", "choices": list(UNITS)},
    )
    guardrail: Annotated[list[str] | None, Setting(checked=False, data=True)] = field(
        default=None,
        metadata={
            "help": "Guard model(s) (hub ids, paths or `module:function` rules) that score the dataset at start-up "
            "when it has no `star` column yet; several are averaged. Leave unset for a dataset scored by "
            "`star-dss score`."
        },
    )
    guardrail_temperature: Annotated[
        float, Setting(_number(above=0), "must be a number > 0. Use e.g. 1.0.", data=True)
    ] = field(
        default=1.0, metadata={"help": "T in sigmoid((z_safe - z_unsafe) / T). 0.2 reproduces the authors' code."}
    )
    guardrail_family: Annotated[str | None, Setting(checked=False, data=True)] = field(
        default=None,
        metadata={
            "help": "Force the guard family (one of `trl_star_dss.scoring.families.FAMILIES`, or `generic`); "
            "default: recognised from the guard's chat template, else its name."
        },
    )
    guardrail_controversial: Annotated[
        str | None,
        Setting(
            fix="is not known. Use 'unsafe' (Qwen3Guard's strict mode: its Controversial class weighs as unsafe), "
            "'safe' (its loose mode), or leave it unset.",
            data=True,
        ),
    ] = field(
        default=None,
        metadata={
            "help": "Qwen3Guard only: how its third class `Controversial` counts, `unsafe` (its strict mode, the "
            "default when unset) or `safe` (loose). Refused for guards without a third class.",
            "choices": [None, *CONTROVERSIAL],
        },
    )
    star_scores_dir: Annotated[str | None, Setting(checked=False)] = field(
        default=None,
        metadata={"help": "Where start-up scoring caches its scores (default: `<output_dir>/star_scores`)."},
    )
    # A probe instead of the exact engine (docs/method.md, "Probe"; issue 38): one guard forward per response.
    star_probe: Annotated[bool, Setting(_boolean, "must be True or False.", data=True)] = field(
        default=False,
        metadata={
            "help": "Score with a probe on the guard's hidden states (one guard forward per response, any chunk size) "
            "fitted on the guard's exact scores of a sample of the dataset; refused unless it agrees with them on "
            "held-out responses (`star_probe_min_auroc`, `star_probe_max_mae`). Off: exact scoring."
        },
    )
    star_probe_sample: Annotated[
        int,
        Setting(
            _count(at_least=8),
            "must be a whole number of examples >= 8 (half fit the probe, a quarter choose what it reads, a quarter "
            "judge it). Use e.g. 200.",
            data=True,
        ),
    ] = field(
        default=200,
        metadata={"help": "Examples scored exactly to fit the probe (half), choose what it reads and judge it."},
    )
    star_probe_min_auroc: Annotated[
        float, Setting(_number(at_least=0, at_most=1), "must be a number in [0, 1]. Use e.g. 0.95.")
    ] = field(
        default=0.95,
        metadata={"help": "Least AUROC of flagged prefixes (exact STAR < 0.5) the probe must reach on held-out data."},
    )
    star_probe_max_mae: Annotated[
        float, Setting(_number(at_least=0, at_most=1), "must be a number in [0, 1]. Use e.g. 0.1.")
    ] = field(
        default=0.1,
        metadata={"help": "Largest mean absolute error of P(safe) against exact scores allowed on held-out data."},
    )
    star_probe_allow_disagreement: Annotated[bool, Setting(_boolean, "must be True or False.")] = field(
        default=False,
        metadata={"help": "Score with a probe below the floor anyway (its figures are still logged and saved)."},
    )
    rejection_threshold: Annotated[
        float,
        Setting(
            _number(at_least=0, at_most=1),
            "must be a number in [0, 1]: it is compared with STAR scores, which are probabilities (the paper: 0.5).",
            data=True,
        ),
    ] = field(
        default=0.5,
        metadata={"help": "With `shaping='rejection_sampling'`: responses scored below this are not trained."},
    )
    precompute_ref_log_probs: Annotated[bool, Setting(_boolean, "must be True or False.")] = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the dataset tokens in one pass before training and keep them "
            "with the dataset: training then holds no reference model (token KL estimators only)."
        },
    )
    star_report: Annotated[bool, Setting(_boolean, "must be True or False.")] = field(
        default=False,
        metadata={
            "help": "At the start of training, write the pictures of `star-dss show` for the training set "
            "(heatmap.html, summary.png) to `<output_dir>/star_report`."
        },
    )
    content_special_tokens: Annotated[
        str,
        Setting(
            fix=f"is not known. Use one of {CONTENT_SPECIAL_TOKENS}: 'refuse' (the default: stop on content holding the "
            "policy's special-token strings), 'drop' or 'keep'.",
            data=True,
        ),
    ] = field(
        default="refuse",
        metadata={
            "help": "What to do with training examples whose message content holds a special-token string of the "
            "policy tokenizer (e.g. `<|eot_id|>`), which the chat template would turn into a real turn boundary: "
            "`refuse` (stop with an error naming the example), `drop` (do not train them) or `keep` (train them as "
            "they are, for data that holds such strings on purpose). Applies to every shaping.",
            "choices": list(CONTENT_SPECIAL_TOKENS),
        },
    )
    full_kl_chunk_size: Annotated[
        int, Setting(_count(at_least=1), "must be a positive whole number of tokens, e.g. 1024.")
    ] = field(default=1024, metadata={"help": "Tokens per chunk of the full-vocabulary KL (`kl_estimator='full'`)."})


def declared(settings_type: type = STARArguments) -> dict[str, Setting]:
    """Each field of `settings_type` (`STARArguments` or a subclass) and its `Setting` (a bare `Setting()` when its annotation
    has none)."""
    hints = typing.get_type_hints(settings_type, include_extras=True)
    found = {}
    for f in fields(settings_type):
        extras = getattr(hints[f.name], "__metadata__", ())
        found[f.name] = next((extra for extra in extras if isinstance(extra, Setting)), Setting())
    return found


def checked_fields(settings_type: type = STARArguments) -> tuple[str, ...]:
    """The fields `check_star_settings` checks: those whose rule is `checked`."""
    return tuple(name for name, rule in declared(settings_type).items() if rule.checked)


def data_fields(settings_type: type = STARArguments) -> tuple[str, ...]:
    """The fields that change the prepared data (`Setting.data`)."""
    return tuple(name for name, rule in declared(settings_type).items() if rule.data)


# The settings both trainers check (`STARDSSConfig` here, the Axolotl plugin's `star_dss_*` keys).
CHECKED_FIELDS = checked_fields()


def check_star_settings(values: dict, names: dict | None = None, settings_type: type = STARArguments) -> None:
    """Raise a `STARDSSError` naming the setting (as the user wrote it: `names` maps our field names to theirs) for
    the first bad value among `values` (missing keys are not checked): each field's `choices` and `Setting`, then the
    rules between fields."""
    by_name = {f.name: f for f in fields(settings_type)}
    name = {field: field for field in by_name} | (names or {})
    for field_name, rule in declared(settings_type).items():
        if not rule.checked or field_name not in values:
            continue
        value, choices = values[field_name], by_name[field_name].metadata.get("choices")
        if (choices is not None and value not in choices) or (rule.valid is not None and not rule.valid(value)):
            fix = rule.fix or f"is not known. Use one of {tuple(choices)}."
            raise STARDSSError(f"{name[field_name]}={value!r} {fix}", arguments=(field_name,))
    shaping, estimator = values.get("shaping", "star_dss"), values.get("kl_estimator", "k2")
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


@functools.cache
def settings_class(settings_type: type = STARArguments) -> type:
    """A frozen dataclass with the fields of `settings_type` (and their defaults): what the loss reads of its host's
    configuration. `STARSettings` is the one of `STARArguments`; `.of(values)` reads it from any object with these
    attributes (a `STARDSSConfig`, the Axolotl plugin's training arguments) or a dict with these keys."""

    def of(cls, values):
        get = values.get if isinstance(values, dict) else functools.partial(getattr, values)
        return cls(**{f.name: get(f.name) for f in fields(cls)})

    return make_dataclass(
        "STARSettings",
        [(f.name, f.type, field(default=f.default, default_factory=f.default_factory)) for f in fields(settings_type)],
        frozen=True,
        namespace={"of": classmethod(of), "__module__": __name__},
    )


STARSettings = settings_class()


def args_docstring(settings_type: type = STARArguments, indent: int = 4) -> str:
    """An `Args:` section in TRL's style (`GKDConfig`), read from the fields' types, defaults and help."""
    hints = typing.get_type_hints(settings_type)
    pad = " " * indent
    lines = [f"{pad}Args:"]
    for f in fields(settings_type):
        kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        default = "" if f.default is None else f", defaults to `{f.default!r}`"
        lines.append(f"{pad}    {f.name} (`{kind}`, *optional*{default}):")
        lines.extend(
            textwrap.wrap(
                f.metadata.get("help", ""), 116 - indent, initial_indent=pad + " " * 8, subsequent_indent=pad + " " * 8
            )
        )
    return "\n".join(lines) + "\n"
