"""Start-up scoring and its report: how the trainers (`STARDSSTrainer`, the Axolotl plugin) reach scoring, through this one entry
point. A dataset without STAR scores is scored once with the configured guard and cached, so a second run, or a run
after `star-dss score` with the same guard and settings, loads no guard (docs/method.md, "STAR: a safety score for every prefix of a response")."""

from __future__ import annotations

import logging
import os

from .dataset import score_dataset
from .families import deferred_guardrail, guard_options
from .probe import ProbeSettings, deferred_probe


logger = logging.getLogger(__name__)


def score_for_training(
    dataset,
    tokenizer,
    settings,
    *,
    output_dir: str,
    output_name: str,
    distributed: bool = True,
    log: bool = True,
    names: dict | None = None,
):
    """`dataset` with its `star` column, scored as `settings` say (a `STARArguments`, e.g. a `STARDSSConfig`:
    `guardrail`, `guardrail_family`, `guardrail_temperature`, `guardrail_controversial`, `star_chunk_size`,
    `star_unit`, the `star_probe*` settings) into the cache `output_dir` (named `output_name` in errors: the setting
    the user set). The guard loads only if something is left to score. Logs the summary and any audit findings when
    `log` (the main process). `names` maps a setting to how the caller's user spells it (the Axolotl plugin's keys),
    for errors."""
    build, guardrail_id = deferred_guardrail(
        settings.guardrail,
        settings.guardrail_family,
        settings.guardrail_temperature,
        **guard_options(settings.guardrail_controversial),
    )
    if settings.star_probe:  # one guard forward per response, fitted and judged on a sample (issue 38)
        build, guardrail_id = deferred_probe(
            build,
            guardrail_id,
            dataset,
            tokenizer,
            settings.star_chunk_size,
            settings.star_unit,
            probe_settings(settings, names),
        )
    scored, summary = score_dataset(
        dataset,
        build,
        tokenizer=tokenizer,
        chunk_size=settings.star_chunk_size,
        unit=settings.star_unit,
        output_dir=output_dir,
        guardrail_id=guardrail_id,
        output_name=output_name,
        distributed=distributed,
    )
    if log:
        logger.info(f"STAR scoring: {summary.format()}")
        if summary.audited_examples:
            logger.warning(
                f"{summary.audited_examples} training examples have audit findings; read them before "
                f"training: {summary.format_audit()}"
            )
    return scored, summary


def probe_settings(settings, names: dict | None = None) -> ProbeSettings:
    """The `ProbeSettings` of a `STARArguments`, errors naming its fields (or `names` of them)."""
    names = names or {}
    keys = ("sample", "min_auroc", "max_mae", "allow_disagreement")
    return ProbeSettings(
        **{key: getattr(settings, f"star_probe_{key}") for key in keys},
        names={key: names.get(f"star_probe_{key}", f"star_probe_{key}") for key in keys},
    )


def write_star_report(dataset, directory: str, max_examples: int = 200) -> None:
    """The pictures of `star-dss show` for a scored training set (`star_report=True`): `heatmap.html` (the first
    `max_examples` examples) and `summary.png`, in `directory`."""
    from .report import heatmap_html, summary_png

    heatmap_html(dataset, os.path.join(directory, "heatmap.html"), indices=range(min(max_examples, len(dataset))))
    summary_png(dataset, os.path.join(directory, "summary.png"))
