"""The Axolotl plugin end to end: `axolotl preprocess` / `axolotl train` runs on a tiny local model (subprocesses,
about 20-40 s each; the slow tier). The in-process tests are in `test_plugin.py`."""

import re

import pytest


pytest.importorskip("axolotl", reason="install Axolotl as the README says (`pip install --no-deps ... axolotl`)")

import torch  # noqa: E402
from axolotl_run import QLORA, _distance, axolotl, logged, train  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


# -- `axolotl train` ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_installed_but_off_changes_nothing(world):
    """The plugin is always loaded (entry point); without `star_dss` the run equals one where it cannot load."""
    hidden = world / "hidden"
    (hidden / "star_dss").mkdir(parents=True)
    (hidden / "star_dss" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    log_off, off, _ = train(world, "off")
    log_hidden, without, _ = train(world, "hidden", pythonpath=str(hidden))
    assert "Plugin loaded successfully: star_dss.StarDSSPlugin" in log_off
    assert "Could not load plugin 'star_dss.StarDSSPlugin'" in log_hidden
    assert all(torch.equal(off[k], without[k]) for k in off)
    prepared = {line for line in log_off.splitlines() if "prepared" in line and "Saving" in line}
    assert "star/weight_mean" not in log_off and prepared == {
        line for line in log_hidden.splitlines() if "prepared" in line and "Saving" in line
    }


@pytest.mark.slow
def test_rejection_sampling_says_what_it_kept_with_label_balancing(world):
    """Rejection sampling reports once what it kept, in `axolotl preprocess` (which drops the examples) and again in
    the `axolotl train` that reuses the prepared data, with the counts in the run's metrics. The run also has
    `balance_labels`, which checks the collator's exact type: rejection sampling trains with Axolotl's own collator,
    which passes that check."""
    settings = dict(
        star_dss=True,
        star_dss_shaping="rejection_sampling",
        balance_labels=True,
        star_dss_guardrail="toy_guards:harm_unsafe",
    )
    said = "rejection sampling kept 16 of 32 examples (threshold 0.5)"  # the 16 harmful answers go
    log = axolotl(world, "preprocess", "balanced", **settings)
    assert re.search(r"STAR scoring: examples 32 \(scored now \d+", log) and log.count(said) == 1
    log, _, steps = train(world, "balanced", **settings)
    assert "STAR scoring" not in log and log.count(said) == 1
    assert len(steps) == 4 and "star/weight_mean" not in steps[0]  # Axolotl's cross-entropy on what was kept
    assert steps[0]["rejection_sampling/kept_examples"] == "16" and steps[0]["rejection_sampling/examples"] == "32"


@pytest.mark.slow
def test_deep_token_without_a_guardrail_trains_and_evaluates_under_eval_names(world):
    """Deep Token reads no scores, so it needs no guardrail and scores nothing; its evaluation metrics carry the
    `eval_` prefix (and its training metrics do not)."""
    log, _, steps = train(
        world, "deep_token", star_dss=True, star_dss_shaping="deep_token", val_set_size=0.25, eval_steps=2
    )
    evaluations = logged(log, "eval_loss")
    assert "STAR scoring" not in log and len(steps) == 4 and len(evaluations) >= 2
    assert all("kl" in s and "eval_kl" not in s for s in steps)
    assert all("eval_kl" in e and "eval_mean_token_accuracy" in e and "kl" not in e for e in evaluations)


@pytest.mark.slow
def test_star_weights_reach_the_loss(world):
    """All-safe scores: exactly the plugin-off run (cross-entropy everywhere). All-unsafe: only the KL to the
    reference, which is zero with zero gradient at the start, so the model stays where it began."""
    initial = load_file(world / "model" / "model.safetensors")
    _, off, _ = train(world, "off")
    # (`all_safe` also checks, while Axolotl loads the data, that no Axolotl function was swapped.)
    _, safe, safe_steps = train(world, "all_safe", star_dss=True, star_dss_guardrail="toy_guards:all_safe")
    _, unsafe, unsafe_steps = train(world, "all_unsafe", star_dss=True, star_dss_guardrail="toy_guards:all_unsafe")
    assert all(torch.allclose(safe[k], off[k], atol=1e-5) for k in off)
    assert [s["star/weight_mean"] for s in safe_steps] == ["1"] * 4
    assert [s["star/kl_share"] for s in unsafe_steps] == ["1"] * 4
    assert _distance(unsafe, initial) < 1e-3 * _distance(off, initial)


@pytest.mark.slow
def test_full_finetune_packed_scored_by_axolotl_preprocess(world):
    settings = dict(sample_packing=True, star_dss=True, star_dss_guardrail="trl_star_dss.testing:scripted_guardrail")
    log = axolotl(world, "preprocess", "full_packed", **settings)
    assert re.search(r"STAR scoring: examples 32 \(scored now \d+", log)
    log, _, steps = train(world, "full_packed", **settings)
    assert "STAR scoring" not in log  # the prepared dataset, weights included, is reused
    assert len(steps) == 4 and all(0 < float(s["star/weight_mean"]) < 1 for s in steps)
    assert float(steps[0]["kl"]) == 0 and float(steps[-1]["kl"]) > 0  # the frozen copy is pi_ref


@pytest.mark.slow
def test_qlora_with_scores_from_star_dss_score_and_precomputed_reference(world):
    from trl_star_dss.tools.cli import main as star_dss

    star_dss(
        [
            "score",
            "--dataset",
            str(world / "data.jsonl"),
            "--guardrail",
            "trl_star_dss.testing:scripted_guardrail",
            "--policy-tokenizer",
            str(world / "model"),
            "--output",
            str(world / "scores"),
            "--no-progress",
        ]
    )
    # The 0.2 name of star_dss_precompute_ref_log_probs: still read, with a warning (one release).
    log, adapter, steps = train(
        world,
        "qlora",
        plugins=["star_dss.StarDSSPlugin"],
        star_dss_precompute_ref=True,
        star_dss_scores_path=str(world / "scores"),
        **QLORA,
    )
    assert "star_dss_precompute_ref is deprecated" in log and "Precomputing reference log-probs" in log
    assert len(steps) == 4 and all(0 < float(s["star/kl_share"]) < 1 for s in steps)
    assert float(steps[-1]["kl"]) > 0 and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
