"""`StarDSSPlugin`: STAR-DSS in Axolotl with one YAML line (`star_dss: true`), on Axolotl 0.21's plugin hooks.

Registered in the `axolotl.plugins` entry-point group, so Axolotl loads it in every run; each hook returns at once
unless the config turns STAR-DSS on (`star_dss_enabled`), so installing the package changes no one else's run.

| hook | what it does here |
|---|---|
| `register` | points `type: chat_template` / `alpaca` datasets at `star_dss.chat_template` / `star_dss.alpaca`; adds the STAR keys to the prepared data's hash (the one patch, below) |
| `get_input_args` | the `star_dss_*` keys (`args.StarDSSArgs`, checked while Axolotl validates the config) |
| dataset `type:` | `star_dss.chat_template` / `star_dss.alpaca`: scores and weights (`data.STARWrapping`) |
| `get_training_args_mixin`, `get_training_args` | the settings, as `STARArguments` fields of the training arguments |
| `get_collator_cls_and_kwargs` | Axolotl's collator with the per-token columns (`collator.py`) |
| `get_trainer_cls` | `STARDSSAxolotlTrainer` |
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from axolotl.integrations.base import BasePlugin

from trl_star_dss.config import REFERENCE_SHAPINGS, SCORED_SHAPINGS, STARArguments, data_fields
from trl_star_dss.errors import STARDSSError

from .args import SCORES_FINGERPRINT, SCORES_PATH, axolotl_fields, check_keys, settings, star_dss_enabled


LOG = logging.getLogger("axolotl.integrations.star_dss")

# Dataset types the plugin wraps, and the type each becomes (a module of this package with a `load`).
WRAPPED_TYPES = {"chat_template": "star_dss.chat_template", "alpaca": "star_dss.alpaca"}


def hash_fields(settings_type: type = STARArguments) -> tuple[str, ...]:
    """Config keys that change the prepared data (the scores, the weights, the examples kept): the switch, the keys of
    the fields whose `Setting` says `data=True`, and the scores the plugin reads."""
    keys = axolotl_fields(settings_type)
    changing = set(data_fields(settings_type))
    return ("star_dss", *(k for k, name in keys.items() if name in changing), SCORES_PATH, SCORES_FINGERPRINT)


HASH_FIELDS = hash_fields()


def add_hash_fields() -> None:
    """Axolotl 0.21 has no hook for the prepared dataset's cache key (`generate_dataset_hash_from_config` in
    `axolotl.utils.data.shared` hashes `sequence_len`, the dataset entries, the tokenizer and the config keys named
    in `DATASET_HASH_CONFIG_EXTRA_FIELDS`): the plugin adds its keys to that tuple, once and for good. Runs without
    STAR-DSS hash as before, since unset keys are left out of the hash."""
    from axolotl.utils.data import shared

    current = shared.DATASET_HASH_CONFIG_EXTRA_FIELDS  # AttributeError if a later Axolotl drops it: on purpose
    shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = current + tuple(k for k in HASH_FIELDS if k not in current)


def point_datasets_at_star_types(cfg) -> None:
    """`type: chat_template` / `alpaca` -> `star_dss.chat_template` / `star_dss.alpaca`, in the raw config, so the
    one-line promise holds: a config keeps its Axolotl dataset types and only adds `star_dss: true`."""
    scored = settings(cfg).shaping in SCORED_SHAPINGS
    for section in ("datasets", "test_datasets"):
        for index, entry in enumerate(cfg.get(section) or []):
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind in WRAPPED_TYPES:
                if kind == "chat_template" and not entry.get("chat_template"):
                    # What Axolotl's dataset schema sets for `type: chat_template` only (the tokenizer's template,
                    # not the config-level `chat_template`): kept, so the tokens do not change.
                    entry["chat_template"] = "tokenizer_default"
                entry["type"] = WRAPPED_TYPES[kind]
            elif scored and isinstance(kind, str) and kind not in WRAPPED_TYPES.values():
                raise STARDSSError(
                    f"{section}[{index}].type={kind!r}: STAR-DSS scores and weights `chat_template` and `alpaca` "
                    "datasets (or `star_dss.chat_template` / `star_dss.alpaca`). Convert the data to messages and use "
                    "`type: chat_template`, or use star_dss_shaping: deep_token / sft, which read no scores."
                )


class StarDSSPlugin(BasePlugin):
    """Scores the training data with a guardrail (or reads `star_dss_scores_path`), attaches per-token STAR weights
    while Axolotl tokenizes, and trains with `STARDSSAxolotlTrainer`."""

    enabled = False  # set by `register`: Axolotl asks for the training-arguments mixin without a config

    def register(self, cfg: dict):
        # The raw config, before validation drops the keys no model declares: misspelled keys are named here
        # (the validator checks them again for configs validated without `register`).
        if not star_dss_enabled(cfg):
            return
        self.enabled = True
        check_keys(cfg)
        point_datasets_at_star_types(cfg)
        add_hash_fields()

    def get_input_args(self) -> str:
        return "star_dss.args.StarDSSArgs"

    def get_training_args_mixin(self) -> str | None:
        # Axolotl merges it into its training arguments at the first import of `axolotl.core.training_args`
        # (inside the trainer build, after `register`); only for a run with STAR-DSS on.
        return "trl_star_dss.config.STARArguments" if self.enabled else None

    def get_training_args(self, cfg) -> dict | None:
        if not star_dss_enabled(cfg):
            return None
        return asdict(settings(cfg))

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        # None (not `(None, None)`) when off: the first non-None answer wins in Axolotl.
        if not star_dss_enabled(cfg) or settings(cfg).shaping not in REFERENCE_SHAPINGS:
            return None  # Axolotl's own collator: rejection sampling and SFT read no per-token columns
        from .collator import collator_for

        return collator_for(cfg, is_eval), {}

    def get_trainer_cls(self, cfg):
        if not star_dss_enabled(cfg):
            return None
        from .trainer import STARDSSAxolotlTrainer

        return STARDSSAxolotlTrainer
