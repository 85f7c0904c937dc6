"""Start-up scoring and its report: how the trainers (`STARDSSTrainer`, the Axolotl plugin) reach scoring, through this one entry
point. A dataset without STAR scores is scored once with the configured guard and cached, so a second run, or a run
after `star-dss score` with the same guard and settings, loads no guard (docs/method.md 1.1)."""

from __future__ import annotations

import logging
import os

from .dataset import score_dataset
from .families import deferred_guardrail, guard_options


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
):
    """`dataset` with its `star` column, scored as `settings` say (a `STARArguments`, e.g. a `STARDSSConfig`:
    `guardrail`, `guardrail_family`, `guardrail_temperature`, `guardrail_controversial`, `star_chunk_size`,
    `star_unit`) into the cache `output_dir` (named `output_name` in errors: the setting the user set). The guard
    loads only if something is left to score. Logs the summary and any audit findings when `log` (the main
    process)."""
    build, guardrail_id = deferred_guardrail(
        settings.guardrail,
        settings.guardrail_family,
        settings.guardrail_temperature,
        **guard_options(settings.guardrail_controversial),
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


def write_star_report(dataset, directory: str, max_examples: int = 200) -> None:
    """The pictures of `star-dss show` for a scored training set (`star_report=True`): `heatmap.html` (the first
    `max_examples` examples) and `summary.png`, in `directory`."""
    from .report import heatmap_html, summary_png

    heatmap_html(dataset, os.path.join(directory, "heatmap.html"), indices=range(min(max_examples, len(dataset))))
    summary_png(dataset, os.path.join(directory, "summary.png"))
