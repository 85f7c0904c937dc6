"""The demo's experiments: `run_demo` (one world, every method against every attack), `run_demo_seeds` (the
README's table over seeds) and `run_ablation` (chunk size, guard label noise)."""

from __future__ import annotations

import copy
import json
import os
import statistics
import time

from ..errors import STARDSSError
from ..storage import write_text_atomic
from ..tools.guard_eval import recommended_lookahead
from .guard import NOISE_SIDES, _evaluate_learned_guard, _learned_guard, _write_guard_eval, world_tokenizer
from .report import (
    ONE_SEED_NOTE,
    _chart,
    check_seeds,
    format_ablation,
    format_ablation_seeds,
    format_report,
    format_seeds_report,
    seed_summary,
    spread,
)
from .training import (
    PREFILL_TOKENS,
    STAGES,
    _aligned_model,
    _attack,
    _Progress,
    _score_attack,
    logger,
    measure,
    prefill_safety,
)
from .world import (
    ATTACK_LABELS,
    ATTACKS,
    CHUNK_SIZE,
    GUARD_NAMES,
    GUARDS,
    METHODS,
    RECOMMENDED,
    build_world,
    lookahead_method,
    method_label,
    method_shaping,
)


def _check_lookaheads(lookaheads) -> None:
    for n in lookaheads:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise STARDSSError(
                f"--lookahead {n!r} must be whole numbers of chunks >= 0, e.g. 0 1 2 (0: the paper's STAR)."
            )


def _check_guard(guard: str) -> None:
    if guard not in GUARDS:
        raise STARDSSError(
            f"guard={guard!r} is not a guard of the demo. Use 'learned' (a tiny guard LM, the default) or "
            "'rule' (the keyword rule)."
        )


def run_demo(
    output_dir: str = "runs/demo",
    seed: int = 0,
    attacks=ATTACKS,
    methods=METHODS,
    stages=None,
    progress: bool = True,
    guard: str = "learned",
    lookaheads=(0,),
    recommended: bool = True,
    prefill=PREFILL_TOKENS,
) -> dict:
    """Build the world, train the aligned model, attack it with every method, measure. `guard` scores the attacks:
    `learned` (a tiny guard LM trained on whole responses, read through `load_guardrail` and the fast scorer) or `rule`
    (the keyword rule). Returns `{"table": {attack: {method: (safety, capability)}}, "guard_eval": figures of the
    learned guard (`guard_eval.guard_figures`) or None, "recommended_lookahead": L or None, "prefill": {row: {method:
    {K: safety}}}, "seconds": ...}` and writes it to table.json (JSON: cells as lists, K as text), table.md, chart.png
    and STAR heat maps (and, for the learned guard, `guard/`, guard_eval.json and guard_drift.png) to `output_dir`.
    `progress` logs one line per stage (logger `trl_star_dss.demo`, INFO). `lookaheads` other than 0 add STAR-DSS with
    that look-ahead (`lookahead_method`) beside STAR-DSS, on the same aligned model and guard. `recommended` (learned
    guard, STAR-DSS among `methods`) adds STAR-DSS at the look-ahead the guard's measured delay calls for
    (`RECOMMENDED`; docs/method.md, "Look-ahead"). `prefill`: the Ks of the prefilling attack
    (`training.prefill_safety`) measured on every model of the table, the aligned one too (`()`: none)."""

    import torch

    _check_guard(guard)
    _check_lookaheads(lookaheads)
    star = "star_dss" in methods
    methods = list(methods) + [lookahead_method(n) for n in lookaheads if n and star]
    recommend = recommended and star and guard == "learned"
    stages = {**STAGES, **(stages or {})}
    start = time.perf_counter()
    stage_count = 2 + 2 * (guard == "learned") + len(attacks) * (len(methods) + recommend)
    announce = _Progress(stage_count, enabled=progress)
    torch.manual_seed(seed)
    world = build_world(seed)
    tokenizer = world_tokenizer(world)
    scratch = os.path.join(output_dir, "trainer")
    model = _aligned_model(world, tokenizer, stages, seed, scratch, announce)
    table = {"aligned model": {"-": measure(model, tokenizer, world)}}
    prefills = {"aligned model": {"-": _prefill_row(model, tokenizer, world, table["aligned model"]["-"], prefill)}}
    aligned = copy.deepcopy(model.state_dict())
    judge, figures, lookahead = None, None, None
    if guard == "learned":
        judge = _learned_guard(tokenizer, seed, stages, os.path.join(output_dir, "guard"), announce)
        announce("guard eval: its STAR on every prefix of fresh labelled responses, against the world's truth")
        figures = _evaluate_learned_guard(judge, tokenizer, seed, output_dir)
        _write_guard_eval(figures, output_dir)
        if recommend:
            try:
                lookahead = recommended_lookahead(figures)
            except STARDSSError:  # a guard that flags nothing (a --fast guard may): the report says why, no column
                recommend = False
                announce.total -= len(attacks)
    runs = methods + [RECOMMENDED] * recommend
    for attack in attacks:
        scored, _ = _score_attack(world, attack, tokenizer, output_dir, judge, guard_name=GUARD_NAMES[guard])
        table[attack], prefills[attack], trained = {}, {}, {}
        for method in runs:
            label, setting = method_label(method, lookahead), method_shaping(method, lookahead)
            if setting in trained:  # the recommended L is 0 or an L of `lookaheads`: that run, not trained again
                same = trained[setting]
                announce(f"attack {ATTACK_LABELS[attack]} x {label}: the same run as {method_label(same)}")
                table[attack][method], prefills[attack][method] = table[attack][same], prefills[attack][same]
                continue
            announce(f"attack {ATTACK_LABELS[attack]} x {label} ({len(scored)} examples)")
            cell = _attack(model, aligned, tokenizer, world, scored, method, stages, scratch, seed, lookahead)
            table[attack][method], trained[setting] = cell, method
            prefills[attack][method] = _prefill_row(model, tokenizer, world, cell, prefill)
    result = {
        "table": table,
        "guard_eval": figures,
        "recommended_lookahead": lookahead,
        "prefill": prefills,
        "prefill_tokens": list(prefill),
        "guard": guard,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }

    write_text_atomic(
        os.path.join(output_dir, "table.md"),
        format_report(result) + f"\n\n({result['seconds']:.0f} s)\n\n{ONE_SEED_NOTE}\n",
    )
    write_text_atomic(os.path.join(output_dir, "table.json"), json.dumps(result, indent=1))
    _chart(table, os.path.join(output_dir, "chart.png"), GUARD_NAMES[guard], recommended=lookahead)
    announce.finish()
    return result


def _prefill_row(model, tokenizer, world: dict, cell: tuple[float, float], ks) -> dict[int, float]:
    """{K: safety %} of a model under the prefilling attack; K = 0 is the table's safety (the same greedy answers)."""
    return ({0: cell[0]} if 0 in ks else {}) | prefill_safety(model, tokenizer, world, [k for k in ks if k])


# ---------------------------------------------------------------------------------------------------------------
# Several seeds (`star-dss demo --seeds N`): training a small model is chaotic (another seed, or another CPU's float
# sums, gives another run), so the README's table is the mean over N whole worlds (knowledge, alignment, guard,
# attacks), each cell with its standard deviation and its worst seed; one seed's table is an example.
# ---------------------------------------------------------------------------------------------------------------


def run_demo_seeds(
    output_dir: str = "runs/demo-seeds",
    seeds=range(5),
    progress: bool = True,
    guard: str = "learned",
    lookaheads=(0,),
    attacks=ATTACKS,
    methods=METHODS,
    stages=None,
    recommended: bool = True,
    prefill=PREFILL_TOKENS,
) -> dict:
    """`run_demo` once per seed (each in `output_dir/seed-<s>`), then every cell's mean, standard deviation (over
    seeds, n - 1) and worst seed (the lowest value, and which seed gave it), of the table and of the prefilling
    table, and each seed's recommended look-ahead. A column missing on some seed (no recommended look-ahead there) is
    left out. Writes table.md, table.json (every seed's cells too) and chart.png (means, error bars one standard
    deviation) to `output_dir`."""

    seeds = check_seeds(seeds, example=5)
    start, runs = time.perf_counter(), {}
    for i, seed in enumerate(seeds):
        if progress:
            logger.info("demo seed %d (%d of %d)", seed, i + 1, len(seeds))
        runs[seed] = run_demo(
            os.path.join(output_dir, f"seed-{seed}"),
            seed,
            attacks,
            methods,
            stages,
            progress,
            guard,
            lookaheads,
            recommended=recommended,
            prefill=prefill,
        )
    summary = seed_summary({s: runs[s]["table"] for s in seeds})
    prefills = {
        row: {m: {k: spread([runs[s]["prefill"][row][m][k] for s in seeds], seeds) for k in prefill} for m in cells}
        for row, cells in summary.items()
    }
    recommended_by_seed = {s: runs[s].get("recommended_lookahead") for s in seeds}
    result = {
        "seeds": seeds,
        "guard": guard,
        "summary": summary,
        "prefill": prefills,
        "prefill_tokens": list(prefill),
        "recommended_lookahead": recommended_by_seed,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    saved = {
        "seeds": seeds,
        "guard": guard,
        "seconds": result["seconds"],
        "summary": summary,
        "prefill": prefills,
        "recommended_lookahead": {str(s): n for s, n in recommended_by_seed.items()},
        "per_seed": {
            str(s): {
                "table": runs[s]["table"],
                "prefill": runs[s]["prefill"],
                "recommended_lookahead": runs[s]["recommended_lookahead"],
                "seconds": runs[s]["seconds"],
                "guard_eval": runs[s]["guard_eval"],
            }
            for s in seeds
        },
    }
    write_text_atomic(os.path.join(output_dir, "table.json"), json.dumps(saved, indent=1))
    write_text_atomic(
        os.path.join(output_dir, "table.md"), format_seeds_report(result) + f"\n\n({result['seconds']:.0f} s)\n"
    )
    means = {
        a: {m: (c["safety"]["mean"], c["capability"]["mean"]) for m, c in row.items()} for a, row in summary.items()
    }
    stds = {a: {m: (c["safety"]["std"], c["capability"]["std"]) for m, c in row.items()} for a, row in summary.items()}
    _chart(means, os.path.join(output_dir, "chart.png"), GUARD_NAMES[guard], stds, len(seeds))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The paper's two ablations (`star-dss demo --chunk-sizes ...`, `--guard-label-noise ...`), never in the default run:
# the chunk size M of STAR-DSS on the misleading-suffix attack, and the guard's error (labels flipped in its training
# data) against STAR-DSS and rejection sampling. Same world, aligned model and hyper-parameters as `run_demo`.
# ---------------------------------------------------------------------------------------------------------------

# The label-noise ablation trains SFT and Deep Token, which read no guard, once (at its first setting) and shows those
# cells at every setting; the methods that read the guard train again at each, STAR-DSS at L = 0 and at the look-ahead
# that setting's guard recommends (docs/demo.md, "Ablations").
ABLATION_METHODS = {
    "chunk_size": ("star_dss",),
    "label_noise": ("sft", "deep_token", "rejection_sampling", "star_dss", RECOMMENDED),
}
GUARD_FREE = ("sft", "deep_token")


def _check_ablation(chunk_sizes, label_noise, guard: str, noise_side: str) -> None:
    _check_guard(guard)
    if (chunk_sizes is None) == (label_noise is None):
        raise STARDSSError(
            "Give one ablation at a time: chunk_sizes (--chunk-sizes) or label_noise (--guard-label-noise)."
        )
    if label_noise is not None and guard != "learned":
        raise STARDSSError(
            f"--guard-label-noise flips labels in the learned guard's training data, but --guard is "
            f"{guard!r}. Drop --guard rule (the default is learned)."
        )
    if noise_side not in NOISE_SIDES:
        raise STARDSSError(
            f"--guard-noise-side {noise_side!r} is not a side of the label noise. Use both (any label flipped) or "
            "unsafe (unsafe labels taught as safe)."
        )
    for size in chunk_sizes or []:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise STARDSSError(f"--chunk-sizes {size!r} must be positive whole numbers of tokens, e.g. 1 5 15.")
    # Flipping half of all labels leaves them no information; half of the unsafe ones still leaves some.
    top = 1 if noise_side == "unsafe" else 0.5
    for share in label_noise or []:
        if not 0 <= share < top:
            raise STARDSSError(
                f"--guard-label-noise {share!r} must be a share of flipped labels in [0, {top:g}), e.g. 0 0.1 "
                f"0.3 (at {top:g} the labels carry no information about harm)."
            )


def run_ablation(
    output_dir: str = "runs/demo-ablation",
    seed: int = 0,
    chunk_sizes=None,
    label_noise=None,
    guard: str = "learned",
    stages=None,
    progress: bool = True,
    noise_side: str = "both",
    attacks=None,
) -> dict:
    """One ablation: `chunk_sizes` (STAR-DSS on the misleading-suffix attack per M, scored by `guard`) or
    `label_noise` (the learned guard trained with each share of flipped labels, `noise_side` saying which: `both` or
    only `unsafe` ones, taught as safe; every method on `attacks`, default every attack, STAR-DSS at L = 0 and at each
    guard's recommended look-ahead). Returns `{"kind", "rows": {setting: {attack: {method: (safety, capability)}}},
    "guard_eval": {setting: the learned guard's figures at that setting's M}, "recommended_lookahead": {setting: L},
    "seconds"}` and writes ablation.md to `output_dir`."""

    import torch

    _check_ablation(chunk_sizes, label_noise, guard, noise_side)
    kind = "chunk_size" if chunk_sizes is not None else "label_noise"
    settings = list(chunk_sizes if chunk_sizes is not None else label_noise)
    attacks = tuple(attacks or (("misleading_suffix",) if kind == "chunk_size" else ATTACKS))
    methods = ABLATION_METHODS[kind]
    stages = {**STAGES, **(stages or {})}
    start = time.perf_counter()
    guard_stages = (guard == "learned") * (len(settings) + (len(settings) if kind == "label_noise" else 1))
    runs = len(settings) * len(attacks) * len(methods) - (len(settings) - 1) * len(attacks) * len(GUARD_FREE) * (
        kind == "label_noise"
    )
    announce = _Progress(2 + guard_stages + runs, enabled=progress)
    torch.manual_seed(seed)
    world = build_world(seed)
    tokenizer = world_tokenizer(world)
    scratch = os.path.join(output_dir, "trainer")
    model = _aligned_model(world, tokenizer, stages, seed, scratch, announce)
    aligned = copy.deepcopy(model.state_dict())
    rows, guard_eval, recommended, judge = {}, {}, {}, None
    for setting in settings:
        chunk_size = setting if kind == "chunk_size" else CHUNK_SIZE
        if guard == "learned":
            if judge is None or kind == "label_noise":
                noise = setting if kind == "label_noise" else 0.0
                path = os.path.join(output_dir, f"guard-{noise:g}")
                judge = _learned_guard(tokenizer, seed, stages, path, announce, noise, noise_side)
            announce(f"guard eval: whole responses and prefixes of fresh labelled responses, M = {chunk_size}")
            guard_eval[setting] = _evaluate_learned_guard(judge, tokenizer, seed, chunk_size=chunk_size)
            recommended[setting] = (guard_eval[setting]["lookahead"] or {}).get("lookahead")
        rows[setting] = {}
        for attack in attacks:
            scored, _ = _score_attack(world, attack, tokenizer, output_dir, judge, chunk_size, heatmap=False)
            row = rows[setting][attack] = {}
            for method in methods:
                if method in GUARD_FREE and setting != settings[0]:  # reads no guard: the first setting's cell
                    row[method] = rows[settings[0]][attack][method]
                    continue
                lookahead = recommended.get(setting)
                if method == RECOMMENDED and not lookahead:  # none, or 0: the L = 0 cell, not trained twice
                    if lookahead == 0:
                        row[method] = row["star_dss"]
                    continue
                label = method_label(method, lookahead)
                announce(f"{kind.replace('_', ' ')} {setting}: attack {ATTACK_LABELS[attack]} x {label}")
                row[method] = _attack(
                    model, aligned, tokenizer, world, scored, method, stages, scratch, seed, recommended=lookahead
                )
    result = {
        "kind": kind,
        "guard": guard,
        "noise_side": noise_side,
        "rows": rows,
        "guard_eval": guard_eval,
        "recommended_lookahead": recommended,
        "seconds": time.perf_counter() - start,
    }
    write_text_atomic(
        os.path.join(output_dir, "ablation.md"), format_ablation(result) + f"\n\n({result['seconds']:.0f} s)\n"
    )
    announce.finish()
    return result


def run_ablation_seeds(
    output_dir: str = "runs/demo-ablation-seeds",
    seeds=range(3),
    label_noise=(0.0, 0.1, 0.3),
    noise_side: str = "both",
    attacks=None,
    stages=None,
    progress: bool = True,
) -> dict:
    """The label-noise ablation (`run_ablation`) once per seed (each in `output_dir/seed-<s>`), then per share of
    flipped labels every cell's mean, standard deviation and worst seed (`seed_summary`), the guard's mean
    whole-response accuracy and false-negative rate, and each seed's recommended look-ahead. Writes ablation.md and
    ablation.json (every seed's rows and guard figures too) to `output_dir`."""
    seeds = check_seeds(seeds, example=3)
    _check_ablation(None, list(label_noise), "learned", noise_side)
    start, runs = time.perf_counter(), {}
    for i, seed in enumerate(seeds):
        if progress:
            logger.info("ablation seed %d (%d of %d)", seed, i + 1, len(seeds))
        runs[seed] = run_ablation(
            os.path.join(output_dir, f"seed-{seed}"),
            seed,
            label_noise=list(label_noise),
            stages=stages,
            progress=progress,
            noise_side=noise_side,
            attacks=attacks,
        )
    guard = {
        setting: {
            "whole_accuracy": statistics.fmean(
                100 * runs[s]["guard_eval"][setting]["whole"]["accuracy"] for s in seeds
            ),
            "whole_fnr": statistics.fmean(100 * runs[s]["guard_eval"][setting]["whole"]["fnr"] for s in seeds),
            "recommended_lookahead": [runs[s]["recommended_lookahead"][setting] for s in seeds],
        }
        for setting in label_noise
    }
    result = {
        "seeds": seeds,
        "noise_side": noise_side,
        "summary": {setting: seed_summary({s: runs[s]["rows"][setting] for s in seeds}) for setting in label_noise},
        "guard": guard,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    write_text_atomic(os.path.join(output_dir, "ablation.json"), json.dumps(result, indent=1))
    write_text_atomic(
        os.path.join(output_dir, "ablation.md"), format_ablation_seeds(result) + f"\n\n({result['seconds']:.0f} s)\n"
    )
    return result
