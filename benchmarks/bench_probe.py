"""A probe on a guard's hidden states against the exact engine (docs/method.md, "Probe"; issue 38): agreement and speed.

    python benchmarks/bench_probe.py                        # CPU: seed 0's agreement and the speed part
    python benchmarks/bench_probe.py --seeds 0 1 2 3 4      # agreement over 5 demo worlds
    python benchmarks/bench_probe.py --agreement-seeds --response-tokens 2048 --num-responses 2   # long responses

1. Agreement: the demo world's learned guard of each seed (`train_guard` on `guard_training_data`, as the demo trains
   it), its probe fitted by `fit_probe` on `guard_eval_data` (300 fresh responses of every kind; half fit it, a
   quarter choose its layer) and judged on the held-out quarter, at the demo's chunks (M = 5 tokens of the world's
   policy tokenizer): AUROC of flagged prefixes (exact STAR < 0.5), MAE of P(safe), first-flag positions.
2. Speed: bench_scoring.py's Llama-Guard-3-shaped guard (random weights, the real Llama-3 tokenizer and prompt),
   exact fast-path (shared-prefix) scoring against probe scoring of the same responses at M = 1 and M = 5, the two
   paths interleaved in groups. The probe timed reads every candidate layer up to the LAST (its whole forward, the most it can
   cost; a random guard's chosen layers mean nothing); the fit (exact scores of its sample included) is timed apart.

The last line is `probe auroc=A mae=E speedup_m1=S1 speedup_m5=S5` (A, E: means over the seeds), for scripts to read.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from bench_scoring import build_guard, make_prompt, make_response

from trl_star_dss.scoring import PrefixQuery, chunk_ends
from trl_star_dss.scoring.probe import ProbeGuardrail, ProbeSettings, candidate_layers, fit_probe, format_agreement
from trl_star_dss.testing import llama3_tokenizer

# The demo's guard training, imported in this one place (the demo's modules may move).
from trl_star_dss.tools.demo import (
    CHUNK_SIZE,
    STAGES,
    build_world,
    guard_eval_data,
    guard_training_data,
    train_guard,
    world_tokenizer,
)


def demo_agreement(seed: int) -> dict:
    """The probe of the demo's learned guard of `seed`, judged on held-out responses (fit time included)."""
    world = build_world(seed)
    tokenizer = world_tokenizer(world)
    start = time.perf_counter()
    guard = train_guard(tokenizer, guard_training_data(seed), seed, *STAGES["guard"])
    train_s = time.perf_counter() - start
    queries = []
    for i, row in enumerate(guard_eval_data(seed)):
        *context, last = row["messages"]
        ends = chunk_ends(last["content"], CHUNK_SIZE, "token", tokenizer)
        queries.append(PrefixQuery(context, last["content"], ends, f"response {i}"))
    start = time.perf_counter()
    probe = fit_probe(guard, queries, ProbeSettings(sample=len(queries), allow_disagreement=True, seed=seed))
    return {**probe.agreement, "fit_s": time.perf_counter() - start, "guard_train_s": train_s}


def timed(scorer, queries: list[PrefixQuery], method: str = "fast") -> tuple[float, list]:
    start = time.perf_counter()
    results = scorer.score_prefixes(queries, method=method)
    return time.perf_counter() - start, results


def speed(args) -> dict:
    """Exact fast path vs probe at each chunk size, on bench_scoring.py's guard and responses."""
    if args.threads:  # one thread times more steadily on a shared, loaded machine
        torch.set_num_threads(args.threads)
    tokenizer = llama3_tokenizer()
    guard = build_guard(args, tokenizer)
    rng = random.Random(args.seed)
    texts = [make_response(rng, tokenizer, args.response_tokens) for _ in range(args.num_responses)]
    texts += [make_response(rng, tokenizer, args.fit_tokens) for _ in range(args.fit_sample)]
    prompts = [[{"role": "user", "content": make_prompt(i)}] for i in range(len(texts))]

    def queries(chunk: int, rows: range) -> list[PrefixQuery]:
        return [PrefixQuery(prompts[i], texts[i], chunk_ends(texts[i], chunk, "token", tokenizer)) for i in rows]

    fit_rows = range(args.num_responses, args.num_responses + args.fit_sample)
    settings = ProbeSettings(sample=args.fit_sample, allow_disagreement=True, seed=args.seed)
    start = time.perf_counter()
    fitted = fit_probe(guard, queries(5, fit_rows), settings)
    fit_s = time.perf_counter() - start
    # Timed: the probe that costs most (every candidate layer side by side, so the whole forward); its weights do
    # not change its time, and a random guard's fitted choice means nothing.
    layers = candidate_layers(guard.model)
    weight = torch.zeros(len(layers) * guard.model.config.hidden_size)
    probe = ProbeGuardrail(guard, layers, weight, torch.zeros(()), fitted.agreement, settings)
    out = {"fit_s": fit_s, "fitted_layers": fitted.layers, "read_layers": layers}
    warm = queries(5, range(1))[0]
    warm = PrefixQuery(warm.context, warm.response[: warm.ends[3]], warm.ends[:4])
    guard.score_prefixes([warm])
    probe.score_prefixes([warm])
    for chunk in args.chunk_sizes:
        work = queries(chunk, range(args.num_responses))
        seconds = {"exact": 0.0, "probe": 0.0}
        tokens = {"exact": 0, "probe": 0}
        for first in range(0, len(work), args.group):  # interleaved: drifting load on a shared machine hits both
            group = work[first : first + args.group]
            for name, scorer in (("exact", guard), ("probe", probe)):
                took, results = timed(scorer, group)
                seconds[name] += took
                tokens[name] += sum(r.guard_tokens for r in results)
        out[chunk] = {"seconds": seconds, "tokens": tokens, "speedup": seconds["exact"] / seconds["probe"]}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="demo worlds for the agreement (none: skip)")
    parser.add_argument("--agreement-seeds", dest="seeds", action="store_const", const=[], help="skip the agreement")
    parser.add_argument("--num-responses", type=int, default=6)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--fit-sample", type=int, default=8, help="responses the timed probe is fitted on")
    parser.add_argument("--fit-tokens", type=int, default=64, help="tokens per response of the fit sample")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--group", type=int, default=2, help="responses per timed call; the paths alternate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    # bench_scoring.py's guard (its defaults: a small Llama-Guard-3-shaped model on CPU)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens-per-forward", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)

    figures = []
    for seed in args.seeds:
        result = demo_agreement(seed)
        figures.append(result)
        print(f"seed {seed}: {format_agreement(result)}")
        print(
            f"  fit {result['fit_s']:.1f} s (exact scores of its sample included); selection MAE per layer "
            f"{ {k: round(v, 4) for k, v in result['selection_mae'].items()} }"
        )
    if figures:
        aurocs = [f["auroc"] for f in figures if f["auroc"] is not None]
        print(
            f"over {len(figures)} seeds: AUROC mean {statistics.mean(aurocs):.4f} min {min(aurocs):.4f}; "
            f"MAE mean {statistics.mean(f['mae'] for f in figures):.4f} max {max(f['mae'] for f in figures):.4f}; "
            f"same side mean {100 * statistics.mean(f['same_side'] for f in figures):.1f}%"
        )
    speeds = {}
    if not args.skip_speed:
        speeds = speed(args)
        print(
            f"speed: {args.num_responses} responses x {args.response_tokens} tokens, guard {args.layers} layers, "
            f"hidden {args.hidden}, {args.device} {args.dtype}; probe fit {speeds['fit_s']:.1f} s on "
            f"{args.fit_sample} responses of {args.fit_tokens} tokens (apart); probe reads layers {speeds['read_layers']} (fitted: "
            f"{speeds['fitted_layers']})"
        )
        print(f"{'M':>3} {'exact s':>9} {'probe s':>9} {'exact tokens':>13} {'probe tokens':>13} {'speedup':>8}")
        for chunk in args.chunk_sizes:
            row = speeds[chunk]
            print(
                f"{chunk:>3} {row['seconds']['exact']:>9.2f} {row['seconds']['probe']:>9.2f} "
                f"{row['tokens']['exact']:>13,} {row['tokens']['probe']:>13,} {row['speedup']:>8.2f}"
            )

    def mean(key):
        values = [f[key] for f in figures if f[key] is not None]
        return f"{statistics.mean(values):.4f}" if values else "nan"

    def ratio(chunk):
        return f"{speeds[chunk]['speedup']:.2f}" if chunk in speeds else "nan"

    print(f"probe auroc={mean('auroc')} mae={mean('mae')} speedup_m1={ratio(1)} speedup_m5={ratio(5)}")


if __name__ == "__main__":
    main()
