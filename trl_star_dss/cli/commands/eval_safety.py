"""`star-dss eval safety`: answer harmful prompts, judge the answers with a guardrail and refusal keywords, and
report the share judged safe with its 95% confidence interval."""

from __future__ import annotations

import argparse

from ...errors import STARDSSError
from ..options import Parents
from ..rules import Rule, positive


NAME = "safety"
HELP = (
    "Answer harmful prompts; judge the answers with a guardrail and refusal keywords; report the share judged safe "
    "with a 95%% CI."
)
RULES = (
    positive("batch_size", "Use e.g. 8 (the default)."),
    positive("max_new_tokens", "Use e.g. 500 (the paper's)."),
    Rule(
        "prefill_column",
        "requires",
        "prefill_tokens",
        "{flag} needs --prefill-tokens (how many tokens of each answer to prefill). Give both, e.g. "
        "--prefill-column harmful_answer --prefill-tokens 0 5 10.",
    ),
    Rule(
        "prefill_tokens",
        "requires",
        "prefill_column",
        "{flag} needs --prefill-column (the column of harmful answers to cut the K tokens from). Give both, e.g. "
        "--prefill-column harmful_answer --prefill-tokens 0 5 10.",
    ),
)


def register(subparsers, parents: Parents) -> None:
    parser = subparsers.add_parser(
        NAME, parents=[parents.model, parents.guard, parents.placement, parents.progress], help=HELP
    )
    parser.add_argument("--prompts", required=True, help="Local JSONL/JSON/CSV or a dataset id (e.g. AdvBench).")
    parser.add_argument("--prompt-column", default="prompt", help="Column holding the prompts (default: prompt).")
    parser.add_argument("--split", default="train", help="Split for dataset ids (default: train).")
    parser.add_argument("--output", required=True, help="JSONL of every prompt, response and verdict.")
    parser.add_argument("--resume", action="store_true", help="Continue an existing --output (same settings).")
    # The attacks; each answer is judged as it is.
    parser.add_argument(
        "--prefill",
        default="",
        help='Harmful prefilling attack: force the answer to start with this text (e.g. "Sure, here is").',
    )
    # The prefilling attack as Qi et al. 2024 measure it (issue 37; docs/evaluation.md, "Prefilling attacks").
    parser.add_argument(
        "--prefill-column",
        metavar="COLUMN",
        dest="prefill_column",
        help="Prefilling attack (Qi et al. 2024): the column of --prompts that holds a harmful answer for each row; "
        "each answer starts with that answer's first K tokens in the model's tokenizer, for every K of "
        "--prefill-tokens. Not with --prefill.",
    )
    parser.add_argument(
        "--prefill-tokens",
        metavar="K",
        type=int,
        nargs="+",
        dest="prefill_tokens",
        help="With --prefill-column: how many tokens to prefill, one run per K (e.g. 0 5 10 20 40; 0 = no "
        "prefill). Each record says its K; the summary gives the share judged safe with its 95%% CI per K.",
    )
    parser.add_argument("--trigger", default="", help="Backdoor attack: append this text to every prompt.")
    # Decoding: the defaults are the paper's (`tools/evaluation.py`).
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    parser.add_argument("--temperature", type=float, default=0.2, help="Sampling temperature (paper: 0.2).")
    parser.add_argument("--top-p", type=float, default=0.9, help="Nucleus sampling (paper: 0.9).")
    parser.add_argument("--repetition-penalty", type=float, default=1.2, help="(paper: 1.2).")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="(paper: 500).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.set_defaults(run=run, rules=RULES, command_parser=parser)


def _check_decoding(args: argparse.Namespace) -> None:
    """Sampling needs a temperature > 0 and a top-p in (0, 1]; greedy decoding reads neither."""
    if not args.greedy and not args.temperature > 0:
        raise STARDSSError(
            f"--temperature {args.temperature} must be > 0 for sampling. Use e.g. 0.2 (the paper's), "
            "or --greedy for greedy decoding."
        )
    if not 0 < args.top_p <= 1:
        raise STARDSSError(f"--top-p {args.top_p} must lie in (0, 1]. Use e.g. 0.9 (the paper's); 1.0 turns it off.")


def run(args: argparse.Namespace) -> None:
    from ...scoring.families import load_guardrail
    from ...tools.evaluation import DecodingConfig, evaluate_safety, load_policy, load_prompts
    from ...tools.loading import default_device
    from ...tools.prefilling import check_prefill_arguments, load_prefill_answers

    _check_decoding(args)
    prompts, categories = load_prompts(args.prompts, args.prompt_column, args.split)
    answers = None
    if args.prefill_column is not None:
        answers = load_prefill_answers(args.prompts, args.prefill_column, args.split)
        # Refused before any model is loaded; each row's length is checked once the model's tokenizer is.
        check_prefill_arguments(len(prompts), args.prefill, answers, args.prefill_tokens, args.prefill_column)
    device = args.device or default_device()
    guardrail = load_guardrail(args.guardrail, family=args.family, device_map=device)
    model, tokenizer = load_policy(args.model, args.adapter, args.dtype, device)
    decoding = DecodingConfig(
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.repetition_penalty,
        args.greedy,
        args.seed,
        args.batch_size,
    )
    report = evaluate_safety(
        model,
        tokenizer,
        guardrail,
        prompts,
        args.output,
        categories,
        decoding,
        args.prefill,
        args.trigger,
        args.resume,
        {"model": args.model, "adapter": args.adapter, "prompts": args.prompts},
        progress=not args.no_progress,
        prefill_answers=answers,
        prefill_tokens=args.prefill_tokens,
        prefill_column=args.prefill_column,
    )
    for one in report.values() if isinstance(report, dict) else [report]:  # one report per K of --prefill-tokens
        print(one.format())
    print(f"records: {args.output}")
