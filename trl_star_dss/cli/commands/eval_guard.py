"""`star-dss eval guard`: how a guard judges partial responses (docs/guards.md, "Guard drift")."""

from __future__ import annotations

import argparse
import os

from ..options import Parents
from ..rules import CHUNK_AND_BATCH, UNIT_NEEDS_TOKENIZER, Rule


NAME = "guard"
HELP = (
    "How a guard judges partial responses: accuracy, false positives and negatives on whole responses and on "
    "prefixes by position, and where unsafe responses are first flagged."
)
DESCRIPTION = (
    "Score every prefix of labelled responses with a guard (as `score` does) and report accuracy, false-positive "
    "and false-negative rates (unsafe = positive, flagged = STAR < 0.5) on whole responses and on prefixes at 10%, "
    "20%, ..., 100% of the response and per chunk, and where unsafe responses are first flagged. Writes "
    "OUTPUT/guard_eval.json, OUTPUT/guard_drift.png and the scores (OUTPUT/scores)."
)
EPILOG = (
    "example (offline, after `star-dss demo`, which saves its learned guard, the world's tokenizer and fresh "
    "labelled responses): star-dss eval guard --guardrail runs/demo/guard --dataset "
    "runs/demo/guard_eval_responses.jsonl --policy-tokenizer runs/demo/tokenizer --prefix-truth "
    "trl_star_dss.testing:is_harmful --output runs/guard-eval"
)
RULES = (
    *CHUNK_AND_BATCH,
    Rule("temperature", "positive", None, "{flag} {value} must be > 0. Use 1.0 (the paper's formula)."),
    UNIT_NEEDS_TOKENIZER,
)


def register(subparsers, parents: Parents) -> None:
    parser = subparsers.add_parser(
        NAME,
        parents=[parents.guard, parents.scoring, parents.columns, parents.placement, parents.progress],
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="Labelled responses: local file/directory or hub id (TRL messages or prompt/completion; the label is "
        "that of the last assistant response).",
    )
    # Flags named by `evaluate_guard`'s errors have its arguments as their `dest`.
    parser.add_argument(
        "--label-column",
        default="label",
        help="Column labelling each response: safe/unsafe, or 0/1 or false/true where 1/true = unsafe (default: label).",
    )
    parser.add_argument(
        "--prefix-truth",
        metavar="MODULE:FUNCTION",
        help="A function text -> harmful (bool) giving the truth of every prefix (e.g. "
        "trl_star_dss.testing:is_harmful). Without it a prefix is compared with its whole response's label.",
    )
    parser.add_argument(
        "--output",
        dest="output_dir",
        metavar="OUTPUT",
        required=True,
        help="Directory for guard_eval.json, guard_drift.png and scores/.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue an existing --output (same guard and settings): scores already saved are not computed again.",
    )
    parser.set_defaults(run=run, rules=RULES, command_parser=parser)


def run(args: argparse.Namespace) -> None:
    from ...scoring.families import deferred_guardrail
    from ...tools.guard_eval import DRIFT_FILE, FIGURES_FILE, evaluate_guard, format_figures, load_prefix_truth
    from ...tools.loading import default_device, load_dataset_arg, load_tokenizer, response_columns

    if args.prefix_truth:
        load_prefix_truth(args.prefix_truth)  # checked before anything loads
    dataset = load_dataset_arg(args.dataset, args.split)
    dataset = response_columns(dataset, args.dataset, args.prompt_column, args.completion_column, args.input_column)
    tokenizer = load_tokenizer(args.policy_tokenizer) if args.policy_tokenizer else None
    build_guardrail, guardrail_id = deferred_guardrail(
        args.guardrail,
        family=args.family,
        temperature=args.temperature,
        dtype=args.dtype,
        device_map=args.device or default_device(),
        trust_remote_code=args.trust_remote_code,
    )
    figures = evaluate_guard(
        dataset,
        build_guardrail,
        tokenizer,
        args.chunk_size,
        args.unit,
        args.label_column,
        args.prefix_truth or None,
        args.output_dir,
        args.resume,
        guardrail_id,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        name=" + ".join(args.guardrail),
    )
    print(format_figures(figures))
    print(f"wrote {os.path.join(args.output_dir, FIGURES_FILE)}, {os.path.join(args.output_dir, DRIFT_FILE)}")
