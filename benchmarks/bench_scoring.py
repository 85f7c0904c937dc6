"""Fast shared-prefix guard scoring vs the naive per-prefix scorer, side by side in one process (docs/method.md, "The scoring engine").

    python benchmarks/bench_scoring.py                       # CPU, small random Llama-Guard-3-shaped guard
    python benchmarks/bench_scoring.py --chunk-size 1 --num-responses 4      # score after every token
    python benchmarks/bench_scoring.py --response-tokens 2048 --num-responses 2   # long responses: memory
    python benchmarks/bench_scoring.py --device cuda --dtype bfloat16 \
        --layers 16 --hidden 2048 --intermediate 8192 --heads 32 --kv-heads 8   # Llama Guard 3 1B dims

The guard has random weights (its verdicts are meaningless) but the real Llama-3 vocabulary, tokenizer and Llama
Guard 3 prompt, so prompt, response and suffix lengths, and the vocabulary projection, are those of the real guard.
Nothing is downloaded. The last line is `speedup <naive time / fast time>`, for scripts to read.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from bench_training import PeakMemory  # the same memory measure as the training benchmark
from transformers import AutoModelForCausalLM, LlamaConfig

from trl_star_dss.scoring import PrefixQuery, TokenLevelGuardrail, chunk_ends
from trl_star_dss.scoring.audit import Auditor
from trl_star_dss.scoring.families import LlamaGuard
from trl_star_dss.testing import llama3_tokenizer, tiny_stream_guard


ASKS = ["How do I", "Can you explain how to", "What is the best way to", "Tell me how to", "Is it safe to"]
TASKS = [
    "bake sourdough bread",
    "fix a leaking tap",
    "plan a trip to Lisbon",
    "learn the guitar",
    "train for a marathon",
    "write a cover letter",
    "repot an orchid",
    "clean a cast iron pan",
]
WORDS = (
    "the a of and to in is that it for with as on be this you at by from or have not are can your will "
    "water time people work first way should then when after before some more most other about into only "
    "also make sure keep check small large warm dry slowly carefully usually often every each step minutes "
    "hours days week next part simple good better important easy hard heat dough flour oven salt tools wrench "
    "valve seal pipe route train ticket city chords fingers practice pace rest shoes letter role skills pot "
    "roots soil light oil surface rust towel"
).split()


def make_prompt(i: int) -> str:
    return f"{ASKS[i % len(ASKS)]} {TASKS[i % len(TASKS)]}?"


def make_response(rng: random.Random, tokenizer, n_tokens: int) -> str:
    """English-ish sentences from WORDS, cut to exactly `n_tokens` Llama-3 tokens (at a token end)."""
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        words = rng.choices(WORDS, k=rng.randint(6, 16))
        if rng.random() < 0.4:  # a comma somewhere inside, as real prose has
            words[rng.randint(1, len(words) - 2)] += ","
        text += " ".join(words).capitalize() + rng.choice(".....?!:") + " "
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[n_tokens - 1][1]]


def build_guard(args, tokenizer) -> LlamaGuard:
    """A Llama-Guard-3-shaped LlamaForCausalLM with random weights (LG3-1B ties input and output embeddings)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # build in place: 1B-size init on CPU would dominate a GPU run
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # fast path needs sdpa/eager
    model = model.to(dtype=getattr(torch, args.dtype)).eval()
    kwargs = {"max_tokens_per_forward": args.max_tokens_per_forward, "batch_size": args.batch_size}
    return LlamaGuard(model, tokenizer, **{k: v for k, v in kwargs.items() if v is not None})


def build_token_level(args, tokenizer) -> TokenLevelGuardrail:
    """A token-level guard (Qwen3Guard-Stream's interface) of the same backbone size, random weights, reading the
    same guard input (the Llama Guard 3 prompt on the Llama-3 tokenizer): its cost is one forward per response."""
    with torch.device(args.device):
        model = tiny_stream_guard(
            tokenizer,
            seed=args.seed,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            intermediate_size=args.intermediate,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.hidden // args.heads,
            guard_inner_size=512,
            max_position_embeddings=8192,
        )
    return TokenLevelGuardrail(model.to(dtype=getattr(torch, args.dtype)), tokenizer)


def components(guard: LlamaGuard, query: PrefixQuery) -> tuple[int, int, int]:
    """docs/method.md, "The scoring engine"'s P (template + prompt), L (response) and S (closing suffix) in guard tokens for one query."""
    full = guard.encode([query.context + [{"role": "assistant", "content": query.response}]])[0]
    empty = guard.encode([query.context + [{"role": "assistant", "content": ""}]])[0]
    p = next((i for i, (a, b) in enumerate(zip(full, empty)) if a != b), len(empty))
    return p, len(full) - len(empty), len(empty) - p


def timed(guard, queries: list[PrefixQuery], method: str, device: str):
    """Seconds, results and peak memory added (CUDA allocator peak, or sampled RSS on CPU) of one scoring call."""

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        results = guard.score_prefixes(queries, method=method)
        sync()
        seconds = time.perf_counter() - start
    return seconds, results, memory.used


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--num-responses", type=int, default=20)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=5, help="M: policy tokens per chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens-per-forward", type=int, default=None, help="fast path budget (guard default)")
    parser.add_argument("--batch-size", type=int, default=None, help="naive path batch (guard default)")
    parser.add_argument("--group", type=int, default=2, help="responses per timed call; the paths alternate")
    args = parser.parse_args(argv)

    tokenizer = llama3_tokenizer()  # also the policy tokenizer that cuts the chunks
    guard = build_guard(args, tokenizer)
    token_level = build_token_level(args, tokenizer)
    rng = random.Random(args.seed)
    queries = []
    for i in range(args.num_responses):
        response = make_response(rng, tokenizer, args.response_tokens)
        ends = chunk_ends(response, args.chunk_size, "token", tokenizer)
        queries.append(PrefixQuery([{"role": "user", "content": make_prompt(i)}], response, ends, f"response {i}"))

    # Warm-up (untimed): first-call allocations, kernel selection and lazy imports would otherwise land on
    # whichever path runs first.
    short = queries[0].response[: queries[0].ends[min(3, len(queries[0].ends) - 1)]]
    warm = PrefixQuery(queries[0].context, short, chunk_ends(short, args.chunk_size, "token", tokenizer))
    for method in ("naive", "fast"):
        guard.score_prefixes([warm], method=method)
    token_level.score_prefixes([warm])

    # Interleaved in groups of responses: load from other processes on a shared machine drifts over minutes and
    # would otherwise land on one path only. Each call still scores several responses, as a scoring shard does.
    paths = {"naive": (guard, "naive"), "fast": (guard, "fast"), "token": (token_level, "fast")}
    seconds = dict.fromkeys(paths, 0.0)
    results = {name: [] for name in paths}
    peak = dict.fromkeys(paths, 0)
    for start in range(0, len(queries), args.group):
        group = queries[start : start + args.group]
        for name, (scorer, method) in paths.items():
            took, scored, memory = timed(scorer, group, method, args.device)
            seconds[name] += took
            results[name] += scored
            peak[name] = max(peak[name], memory)
    naive_s, fast_s, naive, fast = seconds["naive"], seconds["fast"], results["naive"], results["fast"]

    # The audit `score_dataset` runs on every example (its messages, once), against the guard's and policy's rules.
    auditor = Auditor.for_guardrail(guard, tokenizer)
    start = time.perf_counter()
    for i, q in enumerate(queries):
        auditor.audit_messages(i, "messages", q.context + [{"role": "assistant", "content": q.response}])
    audit_s = time.perf_counter() - start

    tokens = {name: sum(r.guard_tokens for r in scored) for name, scored in results.items()}
    naive_tokens, fast_tokens = tokens["naive"], tokens["fast"]
    diff = max(abs(a - b) for n, f in zip(naive, fast) for a, b in zip(n.scores, f.scores))
    parts = [components(guard, q) for q in queries]
    n = len(queries)
    P, L, S = (sum(c[j] for c in parts) / n for j in range(3))
    K = sum(len(q.ends) for q in queries) / n
    # docs/method.md, "The scoring engine" bound: naive sum_k (P + k*M + S) (the k-th prefix holds about k*L/K response tokens) vs P + L + K*S.
    formula = (K * (P + S) + L * (K + 1) / 2) / (P + L + K * S)

    params = sum(p.numel() for p in guard.model.parameters()) / 1e6
    print(
        f"guard    LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"heads {args.heads}/{args.kv_heads}, vocab {len(tokenizer)}, {params:.1f}M params, "
        f"{args.device} {args.dtype}"
    )
    print(
        f"workload {n} responses x {args.response_tokens} tokens, M={args.chunk_size}, {args.group} per call, "
        f"naive batch {guard.batch_size}, fast budget {guard.max_tokens_per_forward} tokens/forward"
    )
    print(f"averages P={P:.1f} L={L:.1f} S={S:.1f} K={K:.1f}  (guard tokens; K chunks per response)")
    print()
    memory_kind = "CUDA max allocated" if args.device.startswith("cuda") else "RSS increase, approx."
    print(f"{'path':<6} {'time s':>9} {'guard tokens':>13} {'tokens/s':>10} {'peak MiB':>9}  ({memory_kind})")
    for name in paths:
        print(
            f"{name:<6} {seconds[name]:>9.2f} {tokens[name]:>13,} {tokens[name] / seconds[name]:>10,.0f} "
            f"{peak[name] / 2**20:>9.0f}"
        )
    print("(token: a token-level guard of the same size, one forward per response; its scores are its own)")
    print()
    print(f"share of the bound reached  {(naive_s / fast_s) / (naive_tokens / fast_tokens):.0%}")
    print(
        f"token bound   {naive_tokens / fast_tokens:.2f}  (naive / fast guard tokens; method.md formula {formula:.2f})"
    )
    print(f"max |fast - naive| score  {diff:.2e}")
    print(f"token-level speedup over naive  {naive_s / seconds['token']:.2f}")
    print(f"audit {audit_s:.4f} s = {100 * audit_s / fast_s:.2f}% of fast scoring time")
    print(f"speedup {naive_s / fast_s:.2f}")


if __name__ == "__main__":
    main()
