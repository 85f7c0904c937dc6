"""The cost of checking the `star` column before training (issue 25; `scoring.check_star_dataset`, which the TRL
trainer, the Axolotl plugin and `star-dss show` run before any model step).

    python benchmarks/bench_star_check.py                       # 100,000 examples, ~1 s to build, then the check
    python benchmarks/bench_star_check.py --examples 10000 --turns 2

Each example is a conversation (a user prompt and `--turns` assistant responses of `--response-chars` characters)
with one record per response, cut into chunks of about 20 characters (5 tokens of English text), as `star-dss score`
writes them. It prints the time of the check alone (the dataset is built first, in memory), then last
`check <seconds> s for <n> examples`.
"""

from __future__ import annotations

import argparse
import time


def build(examples: int, turns: int, response_chars: int):
    from datasets import Dataset

    response = ("Mix the flour with water and salt, knead it well, let it rise. " * 40)[:response_chars]
    ends = list(range(20, len(response), 20)) + [len(response)]
    messages, star = [], []
    for _ in range(turns):
        messages += [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": response}]
    records = [{"turn": 2 * t + 1, "chunk_ends": ends, "scores": [0.9] * len(ends)} for t in range(turns)]
    star = [records] * examples
    return Dataset.from_dict({"messages": [messages] * examples, "star": star}), len(ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=1, help="Assistant responses per example (default 1).")
    parser.add_argument("--response-chars", type=int, default=1000, help="Characters per response (default 1000).")
    args = parser.parse_args()
    from trl_star_dss.formats import check_star_dataset

    start = time.perf_counter()
    dataset, chunks = build(args.examples, args.turns, args.response_chars)
    built = time.perf_counter() - start
    start = time.perf_counter()
    check_star_dataset(dataset)
    seconds = time.perf_counter() - start
    print(
        f"{args.examples} examples, {args.turns} response(s) of {args.response_chars} characters, {chunks} chunks "
        f"each; dataset built in {built:.1f} s"
    )
    print(f"{1e6 * seconds / args.examples:.1f} us per example")
    print(f"check {seconds:.2f} s for {args.examples} examples")


if __name__ == "__main__":
    main()
