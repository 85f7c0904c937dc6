"""STAR-DSS on probe scores against exact scores, in the demo world (issue 38; docs/demo.md, "STAR-DSS on probe
scores against exact scores").

    python benchmarks/bench_probe_demo.py --seeds 0 1 2 3 4

Per seed: the demo's aligned model and learned guard (its stages and guard training, `trl_star_dss.tools.demo`);
then, per attack, the attack set scored exactly (the fast path) and by a probe fitted on a sample of that same set as
`star-dss score --probe` fits it (`sample_queries`, all 100 examples: half fit, a quarter choose, a quarter held out;
the floor is reported, not enforced, so that both trainings run), and STAR-DSS (M = 5) trained on each from the same
aligned model: safety and capability as the demo measures them. The last line is
`probe_demo safety_exact=A safety_probe=B capability_exact=C capability_probe=D` (means over seeds and attacks).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile

import torch
from datasets import Dataset

from trl_star_dss.scoring.probe import ProbeSettings, fit_probe, format_agreement, sample_queries

# The demo's world, stages and measures, imported in this one place (the demo's modules may move).
from trl_star_dss.tools.demo import (
    ATTACKS,
    CHUNK_SIZE,
    STAGES,
    _aligned_model,
    _attack,
    _score_attack,
    build_world,
    guard_training_data,
    train_guard,
    world_tokenizer,
)


def run_seed(seed: int, scratch: str) -> dict:
    torch.manual_seed(seed)
    world = build_world(seed)
    tokenizer = world_tokenizer(world)
    model = _aligned_model(world, tokenizer, STAGES, seed, scratch, lambda what: print(f"  seed {seed}: {what}"))
    aligned = copy.deepcopy(model.state_dict())
    guard = train_guard(tokenizer, guard_training_data(seed), seed, *STAGES["guard"])
    out = {}
    for attack in ATTACKS:
        data = Dataset.from_list(world["attacks"][attack])
        settings = ProbeSettings(sample=len(data), allow_disagreement=True, seed=seed)
        probe = fit_probe(guard, sample_queries(data, tokenizer, CHUNK_SIZE, "token", settings), settings)
        print(f"  seed {seed} {attack}: {format_agreement(probe.agreement)}", flush=True)
        row = {"agreement": probe.agreement}
        for name, scorer in (("exact", guard), ("probe", probe)):
            scored, _ = _score_attack(world, attack, tokenizer, scratch, scorer, heatmap=False)
            row[name] = _attack(model, aligned, tokenizer, world, scored, "star_dss", STAGES, scratch, seed)
        print(f"  seed {seed} {attack}: STAR-DSS (safety, capability) exact {row['exact']} probe {row['probe']}")
        out[attack] = row
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            results[seed] = run_seed(seed, os.path.join(scratch, str(seed)))
    print(
        f"{'attack':<20} {'safety exact':>13} {'safety probe':>13} {'capab. exact':>13} {'capab. probe':>13} AUROC MAE"
    )
    for attack in ATTACKS:
        rows = [results[seed][attack] for seed in args.seeds]

        def mean(name, i, rows=rows):
            return statistics.mean(row[name][i] for row in rows)

        aurocs = [row["agreement"]["auroc"] for row in rows if row["agreement"]["auroc"] is not None]
        print(
            f"{attack:<20} {mean('exact', 0):>13.1f} {mean('probe', 0):>13.1f} {mean('exact', 1):>13.1f} "
            f"{mean('probe', 1):>13.1f} {min(aurocs) if aurocs else float('nan'):.3f} "
            f"{max(row['agreement']['mae'] for row in rows):.3f}  (worst seed)"
        )
    every = [results[seed][attack] for seed in args.seeds for attack in ATTACKS]
    means = [statistics.mean(row[name][i] for row in every) for i in (0, 1) for name in ("exact", "probe")]
    print(
        f"probe_demo safety_exact={means[0]:.1f} safety_probe={means[1]:.1f} capability_exact={means[2]:.1f} "
        f"capability_probe={means[3]:.1f}"
    )


if __name__ == "__main__":
    main()
