"""`star-dss score`: score each response of a dataset with a guardrail, prefix by prefix (STAR), for training."""

from __future__ import annotations

import argparse
import os

from ...choices import SCORING_METHODS
from ..options import Parents, setting
from ..rules import CHUNK_AND_BATCH, UNIT_NEEDS_TOKENIZER, Rule, positive


NAME = "score"
HELP = "Score a dataset's responses with a guardrail (STAR), cached."
DESCRIPTION = "Score each response of a dataset with a guardrail, prefix by prefix (STAR), for training."
EXAMPLES = """\
examples:
  # offline, from a clone of the repository: the bundled sample, judged by the toy world's keyword rule
  # (a keyword rule: it also flags the sample's refusal, which names the poison it refuses)
  star-dss score --guardrail trl_star_dss.testing:scripted_guardrail --dataset examples/data/toy_sample.jsonl \\
      --unit word --output runs/toy-sample
  # a real guard, chunks of 5 tokens of the model you will finetune
  star-dss score --guardrail meta-llama/Llama-Guard-3-1B --policy-tokenizer meta-llama/Llama-3.2-1B-Instruct \\
      --dataset data.jsonl --output runs/scored
  # Alpaca columns (instruction, input, output)
  star-dss score ... --prompt-column instruction --input-column input --completion-column output

then: star-dss show --dataset runs/toy-sample --output runs/toy-sample/pictures
"""
PROBE_FIX = "Add --probe, or leave it out for exact scoring."
# Checked before the dataset or a guard loads (rules.py); scoring's own checks name its Python arguments.
RULES = (
    *CHUNK_AND_BATCH,
    positive("shard_size", "Use e.g. 64 (the default)."),
    positive("max_length", "Leave --max-length out to use the guard's own context."),
    Rule(
        "temperature",
        "positive",
        None,
        "{flag} {value} must be > 0. Use 1.0 (the paper's formula) or 0.2 (the authors' code).",
    ),
    UNIT_NEEDS_TOKENIZER,
    # The probe's settings mean nothing without it.
    *(
        Rule(dest, "requires", "star_probe", f"{{flag}} sets the probe, but --probe was not given. {PROBE_FIX}")
        for dest in (
            "star_probe_sample",
            "star_probe_min_auroc",
            "star_probe_max_mae",
            "star_probe_allow_disagreement",
        )
    ),
)


def register(subparsers, parents: Parents) -> None:
    parser = subparsers.add_parser(
        NAME,
        parents=[parents.guard, parents.scoring, parents.columns, parents.placement, parents.progress],
        help=HELP,
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="Local file/directory or hub id (TRL messages or "
        "prompt/completion format; other columns: --prompt-column, --completion-column).",
    )
    parser.add_argument(
        "--output",
        dest="output_dir",  # `score_dataset`'s argument: its errors name it
        metavar="OUTPUT",
        required=True,
        help="Directory for the scores, the cache and the scored dataset.",
    )
    parser.add_argument("--controversial", **setting("guardrail_controversial"))
    parser.add_argument(
        "--method",
        choices=SCORING_METHODS,
        default=SCORING_METHODS[0],
        help="Shared-prefix (fast) or one forward per prefix (naive); same scores.",
    )
    parser.add_argument("--max-length", type=int, help="Guard context in tokens (default: the guard's).")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=64,
        help="Examples per saved shard: the unit of resume and of work split between processes (default 64).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Delete scores in --output made with other settings and score again."
    )
    parser.add_argument(
        "--no-audit",
        action="store_true",
        help="Skip the audit of message contents (special-token strings, invisible characters, imitation of the "
        "guard's template; written to OUTPUT/audit.jsonl by default).",
    )
    # A probe instead of the exact engine (docs/method.md, "Probe"; issue 38): the `star_probe*` settings. Their `dest`
    # is the setting, so the library's errors (which name it) are told as these flags.
    probe = parser.add_argument_group("probe (one guard forward per response; refused where it disagrees)")
    probe.add_argument(
        "--probe",
        dest="star_probe",
        **setting(
            "star_probe",
            help="Score with a probe on the guard's hidden states, fitted on its exact scores of a sample of the "
            "dataset (one guard forward per response, any chunk size); refused unless it agrees with exact scores on "
            "held-out responses. The figures are printed and saved in OUTPUT/probe.json.",
        ),
    )
    for flag in ("sample", "min_auroc", "max_mae"):  # None when not given: the setting's default then applies
        name = f"star_probe_{flag}"
        probe.add_argument(f"--probe-{flag.replace('_', '-')}", dest=name, **setting(name, default=None))
    probe.add_argument(
        "--probe-allow-disagreement", dest="star_probe_allow_disagreement", **setting("star_probe_allow_disagreement")
    )
    parser.set_defaults(run=run, rules=RULES, command_parser=parser)


def run(args: argparse.Namespace) -> None:
    from ...scoring import score_dataset, scored_dataset_path
    from ...scoring.families import deferred_guardrail
    from ...tools.loading import default_device, load_dataset_arg, load_tokenizer, response_columns

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
        **({"max_length": args.max_length} if args.max_length else {}),
        **({"controversial": args.controversial} if args.controversial else {}),
    )
    if args.star_probe:
        from ...scoring.probe import ProbeSettings, deferred_probe

        given = {k: getattr(args, f"star_probe_{k}") for k in ("sample", "min_auroc", "max_mae", "allow_disagreement")}
        build_guardrail, guardrail_id = deferred_probe(
            build_guardrail,
            guardrail_id,
            dataset,
            tokenizer,
            args.chunk_size,
            args.unit,
            ProbeSettings(**{k: v for k, v in given.items() if v is not None}),
        )
    _, summary = score_dataset(
        dataset,
        build_guardrail,
        tokenizer=tokenizer,
        chunk_size=args.chunk_size,
        unit=args.unit,
        output_dir=args.output_dir,
        method=args.method,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        guardrail_id=guardrail_id,  # the id `load_guardrail` gives the same spec from Python (issue 25)
        progress=not args.no_progress,
        audit=not args.no_audit,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.format())
        print(f"scored dataset: {scored_dataset_path(args.output_dir)} (datasets.load_from_disk)")
