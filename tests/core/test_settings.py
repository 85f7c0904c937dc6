"""A setting is written once (issue 34): its default, type, choices and check in `STARArguments`; the checks, the
trainer's settings and the Axolotl plugin's keys and cache key are derived from it."""

from dataclasses import field, fields, make_dataclass
from typing import Annotated

import pytest

from trl_star_dss.arguments import (
    CHECKED_FIELDS,
    Setting,
    STARArguments,
    STARSettings,
    check_star_settings,
    checked_fields,
    settings_class,
)
from trl_star_dss.errors import STARDSSError


pytest.importorskip("axolotl")

from star_dss import args as axolotl_args  # noqa: E402
from star_dss import plugin as axolotl_plugin  # noqa: E402


def extended():
    """`STARArguments` with one more setting, declared the way every setting is."""
    return make_dataclass(
        "Extended",
        [
            (
                "star_new_knob",
                Annotated[int, Setting(lambda value: value in (1, 2, 3), "must be 1, 2 or 3.", data=True)],
                field(default=2, metadata={"help": "A new knob of the data preparation."}),
            ),
            (
                "star_loss_knob",
                Annotated[str, Setting()],
                field(default="a", metadata={"help": "x", "choices": ["a", "b"]}),
            ),
        ],
        bases=(STARArguments,),
    )


def test_a_new_setting_reaches_the_checks_the_trainer_and_the_axolotl_keys():
    arguments = extended()
    assert {"star_new_knob", "star_loss_knob"} <= set(checked_fields(arguments))
    with pytest.raises(STARDSSError, match=r"^star_new_knob=7 must be 1, 2 or 3\.$"):
        check_star_settings({"star_new_knob": 7}, settings_type=arguments)
    with pytest.raises(STARDSSError, match=r"^star_dss_loss_knob='c' is not known\. Use one of \('a', 'b'\)\.$"):
        check_star_settings(
            {"star_loss_knob": "c"}, names={"star_loss_knob": "star_dss_loss_knob"}, settings_type=arguments
        )
    check_star_settings({"star_new_knob": 3, "star_loss_knob": "b"}, settings_type=arguments)

    settings = settings_class(arguments).of(arguments(star_new_knob=3))
    assert settings.star_new_knob == 3 and settings.star_loss_knob == "a" and settings.shaping == "star_dss"

    keys = axolotl_args.axolotl_fields(arguments)
    assert keys["star_dss_new_knob"] == "star_new_knob" and keys["star_dss_loss_knob"] == "star_loss_knob"
    model = axolotl_args.input_model(arguments)
    assert {"star_dss_new_knob", "star_dss_loss_knob"} <= set(model.model_fields)
    assert "A new knob" in model.model_fields["star_dss_new_knob"].description
    hashed = axolotl_plugin.hash_fields(arguments)
    assert "star_dss_new_knob" in hashed and "star_dss_loss_knob" not in hashed  # only `Setting(data=True)` is hashed


def test_the_derived_lists_equal_what_was_written_by_hand_before():
    # The lists that were spelled out before these were derived (release 0.2.0).
    assert set(CHECKED_FIELDS) >= {
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
    }
    assert axolotl_plugin.HASH_FIELDS == (
        "star_dss",
        "star_dss_shaping",
        "star_dss_chunk_size",
        "star_dss_lookahead",
        "star_dss_unit",
        "star_dss_guardrail",
        "star_dss_guardrail_temperature",
        "star_dss_guardrail_family",
        "star_dss_guardrail_controversial",
        "star_dss_probe",  # issue 38: probe scores are not exact scores
        "star_dss_probe_sample",
        "star_dss_rejection_threshold",
        "star_dss_content_special_tokens",
        "star_dss_scores_path",
        "star_dss_scores_fingerprint",
    )
    assert [f.name for f in fields(STARSettings)] == [f.name for f in fields(STARArguments)]
