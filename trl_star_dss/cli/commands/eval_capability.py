"""`star-dss eval capability`: MMLU, ARC-Challenge, GSM8K (or local tasks) through lm-evaluation-harness."""

from __future__ import annotations

import argparse
import json
import os

from ...errors import STARDSSError
from ..options import Parents
from ..rules import positive


NAME = "capability"
HELP = (
    "MMLU, ARC-Challenge, GSM8K (or local tasks) through lm-evaluation-harness (`pip install 'trl-star-dss[eval]'`)."
)
RULES = (
    positive("batch_size", "Use e.g. 8 (the default)."),
    positive("limit", "Use e.g. 20 for a quick look, or leave --limit out for every example."),
)


def register(subparsers, parents: Parents) -> None:
    parser = subparsers.add_parser(NAME, parents=[parents.model, parents.placement], help=HELP)
    parser.add_argument("--tasks", nargs="+", default=["mmlu", "arc_challenge", "gsm8k"], help="lm-eval tasks.")
    parser.add_argument("--include-path", help="Directory of extra lm-eval task YAMLs (local tasks).")
    parser.add_argument("--output", required=True, help="JSON file for the results (never overwritten).")
    parser.add_argument("--batch-size", type=int, default=8, help="Examples per lm-eval batch (default 8).")
    parser.add_argument("--limit", type=int, help="Examples per task (for a quick look).")
    parser.add_argument("--num-fewshot", type=int, help="Few-shot examples (default: the task's).")
    parser.set_defaults(run=run, rules=RULES, command_parser=parser)


def run(args: argparse.Namespace) -> None:
    import torch

    from ...storage import write_text_atomic
    from ...tools.evaluation import evaluate_capability

    if os.path.exists(args.output):
        raise STARDSSError(f"--output {args.output!r} exists; it is never overwritten. Choose another file.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # lm-eval places the model itself
    results = evaluate_capability(
        args.model,
        args.tasks,
        args.adapter,
        args.include_path,
        args.batch_size,
        device,
        args.dtype,
        args.limit,
        args.num_fewshot,
    )
    write_text_atomic(args.output, json.dumps(results, indent=2, default=str))
    for task, metrics in results.items():
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
        print(f"{task}: {shown}")
    print(f"results: {args.output}")
