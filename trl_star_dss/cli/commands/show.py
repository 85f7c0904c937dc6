"""`star-dss show`: pictures of a scored dataset (a token heat map, STAR trajectories, a dataset summary)."""

from __future__ import annotations

import argparse
import os

from ...errors import STARDSSError
from ..options import Parents
from ..rules import positive


NAME = "show"
HELP = "Pictures of a scored dataset: token heat map (HTML), STAR trajectories and a dataset summary (PNG)."
DESCRIPTION = f"{HELP} Example: star-dss show --dataset runs/toy-sample --output runs/toy-sample/pictures"
RULES = (positive("max_examples", "Use e.g. 200 (the default)."),)


def register(subparsers, parents: Parents) -> None:
    parser = subparsers.add_parser(NAME, help=HELP, description=DESCRIPTION)
    parser.add_argument(
        "--dataset", required=True, help="A `star-dss score --output` directory, its `dataset/`, or a scored file."
    )
    parser.add_argument("--output", required=True, help="Directory for heatmap.html, trajectories.png, summary.png.")
    parser.add_argument("--policy-tokenizer", help="Colour policy tokens (default: words).")
    parser.add_argument(
        "--examples",
        type=int,
        nargs="+",
        help="Examples for the trajectories (default: the first five flagged, else the first five).",
    )
    parser.add_argument("--max-examples", type=int, default=200, help="Examples in the heat map (default 200).")
    parser.add_argument("--split", default="train", help="Dataset split for files and hub ids (default: train).")
    parser.set_defaults(run=run, rules=RULES, command_parser=parser)


def run(args: argparse.Namespace) -> None:
    from ...formats import STAR_COLUMN, check_star_dataset
    from ...scoring import scored_dataset_path
    from ...scoring.report import first_flagged, heatmap_html, summary_png, trajectory_png
    from ...tools.loading import load_dataset_arg, load_tokenizer

    path = args.dataset
    if os.path.isdir(scored_dataset_path(path)):  # a `star-dss score --output` directory
        path = scored_dataset_path(path)
    dataset = load_dataset_arg(path, args.split)
    if STAR_COLUMN not in dataset.column_names:
        raise STARDSSError(
            f"--dataset {args.dataset!r} has no `{STAR_COLUMN}` column. Score it first with `star-dss score`."
        )
    check_star_dataset(dataset)  # the column is input (issue 25): a bad record is named, not drawn
    tokenizer = load_tokenizer(args.policy_tokenizer) if args.policy_tokenizer else None
    for index in args.examples or []:
        if not 0 <= index < len(dataset):
            raise STARDSSError(
                f"--examples {index} is out of range: the dataset has {len(dataset)} examples (0 to "
                f"{len(dataset) - 1})."
            )
    chosen = args.examples or first_flagged(dataset)
    units = heatmap_html(
        dataset,
        os.path.join(args.output, "heatmap.html"),
        tokenizer,
        range(min(args.max_examples, len(dataset))),
        title=f"STAR scores of {args.dataset}",
    )
    trajectory_png(dataset, os.path.join(args.output, "trajectories.png"), chosen)
    summary = summary_png(dataset, os.path.join(args.output, "summary.png"))
    print(
        f"responses {summary['responses']} | flagged {summary['flagged']} | words under KL "
        f"{100 * summary['share_under_kl']:.1f}% | heat map units {units}"
    )
    print(f"wrote {args.output}/heatmap.html, trajectories.png (examples {chosen}), summary.png")
