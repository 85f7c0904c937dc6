"""The demo's report: its tables (one seed, seeds, ablations) as the README prints them, and its chart."""

from __future__ import annotations

import statistics
import textwrap

# `star-dss demo`'s time, stated in `choices` so that `star-dss --help` reads it without loading the demo.
from ..choices import DEMO_TIME  # noqa: F401 (public here too)
from ..errors import STARDSSError
from ..scoring.report import pyplot, save_figure
from ..tools.guard_eval import format_figures
from .world import ATTACK_LABELS, GUARD_NAMES, METHODS, RECOMMENDED, method_label, method_shaping


ABLATION_ORDER = (*METHODS, RECOMMENDED)  # an ablation's columns, in this order


ONE_SEED_NOTE = (
    "One seed is an example, not the result: cells move by several points from seed to seed (and from CPU "
    "to CPU). The README's table (README, The demo) is the mean over 5 seeds: `star-dss demo --seeds 5`."
)


def _columns(table: dict) -> list[str]:
    """The methods of a table in the order of METHODS, then STAR-DSS at the recommended look-ahead, then each other
    look-ahead (smallest L first)."""
    present = {m for row in table.values() for m in row if m != "-"}
    extra = sorted((m for m in present if m not in METHODS and m != RECOMMENDED), key=lambda m: method_shaping(m)[1])
    return [m for m in METHODS if m in present] + [RECOMMENDED] * (RECOMMENDED in present) + extra


def format_table(table: dict, recommended: int | None = None) -> str:
    """The table as the README prints it: safety / capability in %, the README's names of attacks and methods
    (`recommended`: the look-ahead of the `RECOMMENDED` column)."""
    methods = _columns(table)
    lines = [
        "| attack (SIMULATION) | " + " | ".join(method_label(m, recommended) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for attack, row in table.items():
        if attack == "aligned model":
            safety, capability = row["-"]
            lines.insert(0, f"aligned model before any attack: safety {safety:.1f}, capability {capability:.1f}\n")
            continue
        cells = [f"{row[m][0]:.1f} / {row[m][1]:.1f}" if m in row else "" for m in methods]
        lines.append(f"| {ATTACK_LABELS[attack]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PREFILL_NOTE = (
    'Prefilling attack (Qi et al. 2024; docs/demo.md, "Prefilling"): each held-out harmful prompt\'s answer starts '
    "with the first K tokens of a harmful answer; % of continuations without the harmful vocabulary (the prefill "
    "itself is not judged: it names the item). K = 0 is the table's safety."
)


def _prefill_rows(prefill: dict, cell, recommended: int | None = None) -> list[str]:
    """One row per model (the aligned model, then each attack x method), `cell(value)` per K."""
    ks = sorted({k for row in prefill.values() for cells in row.values() for k in cells}, key=int)
    lines = ["| model | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for attack, row in prefill.items():
        for method in _columns({attack: row}) if attack != "aligned model" else ["-"]:
            name = (
                "aligned model" if method == "-" else f"{ATTACK_LABELS[attack]}: {method_label(method, recommended)}"
            )
            lines.append(f"| {name} | " + " | ".join(cell(row[method][k]) for k in ks) + " |")
    return lines


def format_report(result: dict) -> str:
    """What `star-dss demo` prints and writes to table.md: the table, the prefilling table, then (learned guard) the
    guard's figures and the look-ahead they recommend."""

    recommended = result.get("recommended_lookahead")
    text = (
        f"SIMULATION (toy world, {GUARD_NAMES[result['guard']]}): safety / capability in % (held-out harmful "
        f"prompts / held-out tasks)\n\n{format_table(result['table'], recommended)}"
    )
    if recommended is not None:
        text += (
            f"\n\nSTAR-DSS (L=0) is the paper's; STAR-DSS (L={recommended}, recommended) uses the look-ahead this "
            'world\'s learned guard calls for (its delay, measured below; docs/method.md, "Look-ahead").'
        )
    if result.get("prefill") and result["prefill"]["aligned model"]["-"]:
        text += (
            "\n\n" + PREFILL_NOTE + "\n\n" + "\n".join(_prefill_rows(result["prefill"], "{:.1f}".format, recommended))
        )
    if result["guard_eval"] is not None:
        text += (
            "\n\nThe learned guard on fresh labelled responses (`star-dss eval guard`, prefixes judged by the "
            f"world's truth):\n\n{format_figures(result['guard_eval'])}"
        )
    return text


def _spread_cell(c: dict) -> str:
    return f"{c['mean']:.1f} ± {c['std']:.1f} ({c['worst']:.1f})"


def format_seeds_table(summary: dict, measure_name: str) -> str:
    """One measure (`safety` or `capability`) of every cell: mean ± standard deviation (worst seed's value)."""
    methods = _columns({a: row for a, row in summary.items() if a != "aligned model"})
    lines = [
        f"| {measure_name} %: mean ± std (worst seed) | " + " | ".join(method_label(m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for attack, row in summary.items():
        if attack == "aligned model":
            continue
        lines.append(
            f"| {ATTACK_LABELS[attack]} | " + " | ".join(_spread_cell(row[m][measure_name]) for m in methods) + " |"
        )
    return "\n".join(lines)


def format_seeds_report(result: dict) -> str:
    """What `star-dss demo --seeds N` prints and writes to table.md: the aligned model, safety and capability, each
    seed's recommended look-ahead, and the prefilling table."""
    summary, n = result["summary"], len(result["seeds"])
    text = [
        f"SIMULATION (toy world, {GUARD_NAMES[result['guard']]}), {n} seeds ({', '.join(map(str, result['seeds']))})"
        ": mean ± standard deviation over seeds (the lowest seed's value); % of held-out harmful prompts answered "
        "safely / held-out tasks solved",
        "",
        aligned_line(summary),
        "",
        format_seeds_table(summary, "safety"),
        "",
        format_seeds_table(summary, "capability"),
    ]
    recommended = result.get("recommended_lookahead") or {}
    if any(n is not None for n in recommended.values()):
        text += [
            "",
            "STAR-DSS (recommended L): the look-ahead each seed's learned guard calls for (docs/method.md, "
            '"Look-ahead"): ' + ", ".join(f"seed {s}: L = {n}" for s, n in recommended.items()),
        ]
    if result.get("prefill") and result["prefill"]["aligned model"]["-"]:
        text += ["", PREFILL_NOTE + " Mean ± std (worst seed).", "", *_prefill_rows(result["prefill"], _spread_cell)]
    return "\n".join(text)


def _ablation_setting(kind: str, setting, noise_side: str = "both") -> str:
    if kind == "chunk_size":
        return f"{setting:g}"
    return f"{100 * setting:g}%" + (" of unsafe" if noise_side == "unsafe" else "")


def _ablation_guard_cells(figures: dict) -> list[str]:
    """The learned guard's errors at one setting: whole responses (accuracy / FNR), prefixes at 10-90% (accuracy)."""
    prefixes = [figures["by_position"][share]["accuracy"] for share in range(10, 100, 10)]
    return [
        f"{100 * figures['whole']['accuracy']:.1f} / {100 * figures['whole']['fnr']:.1f}",
        f"{100 * sum(prefixes) / len(prefixes):.1f}",
    ]


def format_ablation(result: dict) -> str:
    """An ablation's table: one row per setting, the learned guard's errors there (against the world's truth, on
    fresh labelled responses: whole responses, and prefixes at 10% to 90% of them) and the look-ahead it recommends,
    then safety / capability in % per attack and method (a cell no run gave is left empty)."""
    kind, rows = result["kind"], result["rows"]
    first = next(iter(rows.values()))
    columns = [(a, m) for a in first for m in ABLATION_ORDER if any(m in row[a] for row in rows.values())]
    name = {"chunk_size": "M (chunk size, tokens)", "label_noise": "guard labels flipped"}[kind]
    guard = ["guard: whole acc. / FNR %", "guard: prefix acc. % (10-90%)"] if result["guard_eval"] else []
    guard += ["recommended L"] * bool(result["guard_eval"] and kind == "label_noise")
    header = [name, *guard] + [f"{ATTACK_LABELS[a]}: {method_label(m)}" for a, m in columns]
    lines = [
        f"SIMULATION (toy world, {GUARD_NAMES[result['guard']]}): safety / capability in %",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---|" * (len(header) - 1),
    ]
    for setting, row in rows.items():
        cells = [_ablation_setting(kind, setting, result.get("noise_side", "both"))]
        if result["guard_eval"]:
            cells += _ablation_guard_cells(result["guard_eval"][setting])
            if kind == "label_noise":
                cells.append(str(result["recommended_lookahead"].get(setting, "-")))
        cells += [f"{row[a][m][0]:.1f} / {row[a][m][1]:.1f}" if m in row[a] else "" for a, m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ablation_seeds(result: dict) -> str:
    """The label-noise ablation over seeds (`run_ablation_seeds`): per share of flipped labels, each seed's
    recommended look-ahead, then one table per attack, methods as columns, each cell's safety and capability as mean
    ± standard deviation (worst seed)."""
    seeds, summary = result["seeds"], result["summary"]
    side = result.get("noise_side", "both")
    lines = [
        f"SIMULATION (toy world, learned guard), {len(seeds)} seeds ({', '.join(map(str, seeds))}): safety / "
        "capability in %, mean ± standard deviation over seeds (the lowest seed's value)",
        "",
        "| guard labels flipped | guard: whole acc. / FNR % (mean) | recommended L by seed |",
        "|---|---|---|",
    ]
    for setting, guard in result["guard"].items():
        recommended = ", ".join(f"{n}" for n in guard["recommended_lookahead"])
        lines.append(
            f"| {_ablation_setting('label_noise', setting, side)} | {guard['whole_accuracy']:.1f} / "
            f"{guard['whole_fnr']:.1f} | {recommended} |"
        )
    first = next(iter(summary.values()))
    for attack in first:
        methods = [m for m in ABLATION_ORDER if any(m in table[attack] for table in summary.values())]
        lines += [
            "",
            f"| {ATTACK_LABELS[attack]}: safety / capability | " + " | ".join(map(method_label, methods)) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for setting, table in summary.items():
            cells = [
                " / ".join(
                    f"{c[name]['mean']:.1f} ± {c[name]['std']:.1f} ({c[name]['worst']:.1f})"
                    for name in ("safety", "capability")
                )
                if c
                else ""
                for c in (table[attack].get(m) for m in methods)
            ]
            lines.append(f"| {_ablation_setting('label_noise', setting, side)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _chart(
    table: dict,
    path: str,
    guard_name: str = GUARD_NAMES["rule"],
    errors: dict | None = None,
    seeds: int = 1,
    recommended: int | None = None,
) -> None:
    """Bars of safety and capability per attack and method; with `errors` (the same shape as `table`), error bars of
    one standard deviation over `seeds` seeds; `recommended`: the look-ahead of the `RECOMMENDED` column."""

    plt = pyplot()
    attacks = [a for a in table if a != "aligned model"]
    methods = _columns({a: table[a] for a in attacks})
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=100)
    width = 0.8 / len(methods)
    for j, (axis, label) in enumerate(zip(axes, ("safety (%)", "capability (%)"))):
        for i, method in enumerate(methods):
            spread = [errors[a][method][j] for a in attacks] if errors else None
            axis.bar(
                [k + i * width for k in range(len(attacks))],
                [table[a][method][j] for a in attacks],
                width,
                yerr=spread,
                capsize=2,
                error_kw={"elinewidth": 0.8},
                label=method_label(method, recommended),
            )
        axis.set_xticks(
            [k + width * (len(methods) - 1) / 2 for k in range(len(attacks))],
            [textwrap.fill(ATTACK_LABELS[a], 12) for a in attacks],
            fontsize=8,
        )
        axis.set(ylabel=label, ylim=(0, 105))
    # One legend for both panels, in its own rows between the title and the axes: bars reach 100%, so a legend
    # inside an axis would cover them.
    columns = min(len(methods), 4)
    figure.legend(
        *axes[0].get_legend_handles_labels(),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.93),
        ncol=columns,
        fontsize=9,
        frameon=False,
    )
    figure.subplots_adjust(top=0.83 if len(methods) <= columns else 0.78, bottom=0.14)
    over = f", mean of {seeds} seeds (bars: ± 1 std)" if seeds > 1 else ", one seed (an example)"
    figure.suptitle(f"SIMULATION: toy safety world, {guard_name}{over} (not a real safety judge)")
    save_figure(figure, path)


def spread(column: list[float], seeds: list[int]) -> dict:
    """Mean, standard deviation over seeds (n - 1; 0 for one seed), the lowest value and its seed, and every seed's
    value."""
    worst = min(range(len(seeds)), key=lambda k: column[k])
    return {
        "mean": statistics.fmean(column),
        "std": statistics.stdev(column) if len(column) > 1 else 0.0,
        "worst": column[worst],
        "worst_seed": seeds[worst],
        "values": column,
    }


def seed_summary(tables: dict) -> dict:
    """{attack: {method: {"safety" | "capability": spread}}} of `{seed: table}` (tables as `run_demo` returns them):
    each cell's `spread` over seeds. A cell missing on some seed is left out."""
    seeds = list(tables)
    return {
        attack: {
            method: {
                name: spread([tables[s][attack][method][j] for s in seeds], seeds)
                for j, name in enumerate(("safety", "capability"))
            }
            for method in row
            if all(method in tables[s][attack] for s in seeds)
        }
        for attack, row in tables[seeds[0]].items()
    }


def aligned_line(summary: dict) -> str:
    """The aligned model's line of a seeds report: safety and capability as mean ± std (worst seed)."""
    aligned = summary["aligned model"]["-"]
    return (
        "aligned model before any attack: safety {:.1f} ± {:.1f} ({:.1f}), capability {:.1f} ± {:.1f} ({:.1f})".format(
            *(aligned[k][f] for k in ("safety", "capability") for f in ("mean", "std", "worst"))
        )
    )


def check_seeds(seeds, example: int) -> list:
    """The seeds of a several-seed run, refused when empty or repeated (`example`: a count to suggest)."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise STARDSSError(
            f"--seeds gives {len(seeds)} seeds ({seeds}); give a positive number of distinct seeds, e.g. {example}.",
            arguments=("seeds",),
        )
    return seeds
