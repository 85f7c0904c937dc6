"""How a guard judges partial responses: `star-dss eval guard`.

STAR-DSS assumes that a guard trained to judge whole responses also judges their prefixes well (docs/method.md,
"Guard drift"). This module measures it on responses labelled safe / unsafe: accuracy, false-positive and
false-negative rates on whole responses and on prefixes, by share of the response (10%, ..., 100%) and by chunk index
at the chunk size STAR uses, where unsafe responses are first flagged, and (given each prefix's truth) the look-ahead
that the guard's delay calls for (`recommend_lookahead`; docs/method.md, "Look-ahead"). Unsafe is the positive class;
a prefix is flagged when its STAR is below 0.5, the threshold of every other rule here (rejection sampling,
`first_flagged`).

The prefixes are scored by `score_dataset` (so the chunks, the guard's reading and the cache are those of training),
and a prefix at a share `f` of the response is the chunk a token there takes its weight from (`token_scores`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
from collections.abc import Callable

from ..errors import STARDSSError
from ..formats import STAR_COLUMN, dataset_format, response_turns
from ..scoring import score_dataset
from ..scoring.report import pyplot, save_figure
from ..storage import write_text_atomic
from ..weights import token_scores


LABEL_COLUMN = "label"
# The label of a response names its class: `safe` / `unsafe`, or a flag of harm as the toy world's `is_harmful`
# returns it (1 / true = unsafe). Strings are read case-insensitively; anything else is refused, never guessed.
LABEL_VALUES = {"safe": False, "unsafe": True, "0": False, "1": True, "false": False, "true": True}
POSITIONS = tuple(range(10, 101, 10))  # % of the response
FIGURES_FILE, DRIFT_FILE = "guard_eval.json", "guard_drift.png"
WHOLE_LABEL = "the whole response's label (no --prefix-truth: a prefix of an unsafe response counts as unsafe)"
# The share of the guard's delays a recommended look-ahead must cover (docs/method.md, "Look-ahead": how it is chosen).
LOOKAHEAD_COVERAGE = 0.95
NO_PREFIX_TRUTH = (
    "no look-ahead can be recommended without the truth of each prefix: the guard's delay is counted from each unsafe "
    "response's first harmful prefix, which only a prefix truth tells (prefix_truth=, `--prefix-truth "
    "module:function`: a function from a text to whether it is harmful)"
)


def read_labels(values, column: str = LABEL_COLUMN) -> list[bool]:
    """Whether each response is unsafe, from its label (`LABEL_VALUES`)."""
    unsafe = []
    for index, value in enumerate(values):
        key = str(int(value)) if isinstance(value, (bool, int)) and value in (0, 1) else str(value).strip().lower()
        if key not in LABEL_VALUES:
            raise STARDSSError(
                f"label_column={column!r} holds {value!r} at example {index}, which is not a label. Use safe/unsafe, "
                "or 0/1 or false/true where 1 and true mean unsafe (harmful), in every row.",
                arguments=("label_column",),
            )
        unsafe.append(LABEL_VALUES[key])
    return unsafe


def load_prefix_truth(spec: str) -> Callable[[str], bool]:
    """`module:function`, a function text -> whether it is harmful (e.g. `trl_star_dss.testing:is_harmful`)."""
    module_name, _, attribute = spec.partition(":")
    try:
        truth = getattr(importlib.import_module(module_name), attribute) if module_name and attribute else None
    except (ImportError, AttributeError) as error:
        raise STARDSSError(
            f"prefix_truth={spec!r} could not be imported ({error}). Give `package.module:function`, "
            "a function from a text to whether it is harmful, e.g. trl_star_dss.testing:is_harmful.",
            arguments=("prefix_truth",),
        ) from error
    if not callable(truth):
        raise STARDSSError(
            f"prefix_truth={spec!r} is not `module:function` naming a function. Give e.g. "
            "trl_star_dss.testing:is_harmful.",
            arguments=("prefix_truth",),
        )
    return truth


def _rates(pairs: list[tuple[bool, bool]]) -> dict:
    """Accuracy, false-positive and false-negative rates of (flagged, unsafe) pairs; a rate with no case is None."""
    tp = sum(f and u for f, u in pairs)
    fp = sum(f and not u for f, u in pairs)
    fn = sum(u and not f for f, u in pairs)
    tn = len(pairs) - tp - fp - fn
    return {
        "n": len(pairs),
        "unsafe": tp + fn,
        "safe": fp + tn,
        "accuracy": (tp + tn) / len(pairs) if pairs else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "fnr": fn / (fn + tp) if fn + tp else None,
    }


def _middle(values: list[float]) -> dict | None:
    return {"mean": statistics.fmean(values), "median": statistics.median(values)} if values else None


def harm_delay(scores: list[float], truth: list[bool]) -> int | None:
    """Chunks from a response's first harmful prefix (the first True of `truth`, one per chunk) to the first chunk at
    or after it whose STAR is below 0.5, or None when no chunk from there on is flagged. A flag before the harm does
    not count by itself: a look-ahead of L weighs the first harmful chunk k by chunks k, ..., k + L only."""
    harm = truth.index(True)
    return next((k - harm for k in range(harm, len(scores)) if scores[k] < 0.5), None)


def recommend_lookahead(delays: list[int | None], coverage: float = LOOKAHEAD_COVERAGE) -> dict:
    """The smallest look-ahead L (chunks) such that at least `coverage` of the unsafe responses flagged at or after
    their first harmful prefix are flagged within L chunks of it, from each unsafe response's `harm_delay` (None:
    never flagged from its first harmful prefix on; no look-ahead helps those, so they are counted apart, not in the
    share). `lookahead` is None when no response is flagged. `covered[L]` is the share covered at look-ahead L."""
    if not 0 < coverage <= 1:
        raise STARDSSError(
            f"coverage={coverage!r} is a share of responses; give one in (0, 1], e.g. 0.95.", arguments=("coverage",)
        )
    flagged = sorted(d for d in delays if d is not None)
    result = {
        "coverage": coverage,
        "unsafe_responses": len(delays),
        "flagged_from_harm": len(flagged),
        "never_flagged_from_harm": len(delays) - len(flagged),
        "delay_counts": [flagged.count(d) for d in range(flagged[-1] + 1)] if flagged else [],
        "mean_delay": statistics.fmean(flagged) if flagged else None,
        "covered": [],
        "lookahead": None,
    }
    if not flagged:
        return result
    covered = 0
    for count in result["delay_counts"]:
        covered += count
        result["covered"].append(covered / len(flagged))
    # A share computed from counts can land a hair under the target it equals (19 / 20 against 0.95).
    result["lookahead"] = next(n for n, share in enumerate(result["covered"]) if share >= coverage - 1e-12)
    return result


def recommended_lookahead(figures: dict) -> int:
    """The `star_lookahead` value a guard's figures (`guard_figures`, `evaluate_guard`, guard_eval.json) recommend,
    for the chunk size they were measured at."""
    recommendation = figures.get("lookahead")
    if recommendation is None or recommendation.get("lookahead") is None:
        why = NO_PREFIX_TRUTH if recommendation is None else "the guard flagged no unsafe response from its harm on"
        raise STARDSSError(
            f"These guard figures recommend no look-ahead: {why}. Evaluate the guard with a prefix truth on labelled "
            "responses it flags, or set star_lookahead yourself.",
            arguments=("figures",),
        )
    return recommendation["lookahead"]


def guard_figures(
    scored,
    unsafe: list[bool],
    prefix_truth: Callable[[str], bool] | None = None,
    coverage: float = LOOKAHEAD_COVERAGE,
) -> dict:
    """The figures of a scored dataset (`score_dataset`'s output) whose responses are labelled `unsafe`. The label
    is that of each example's last scored response. `prefix_truth(text)` gives the truth of every prefix that is not
    the whole response; without it a prefix is compared with the whole response's label, and no look-ahead is
    recommended (`lookahead` is None). With it, `lookahead` is `recommend_lookahead` of the unsafe responses'
    delays at `coverage`."""
    fmt = dataset_format(scored.column_names)
    responses = []  # (response, chunk ends, scores, truth of each chunk's prefix, unsafe)
    for index, (example, label) in enumerate(zip(scored, unsafe)):
        record = example[STAR_COLUMN][-1]
        response = {turn: text for turn, _, text in response_turns(example, fmt, index)}[record["turn"]]
        ends, scores = record["chunk_ends"], record["scores"]
        truth = [bool(prefix_truth(response[:end])) if prefix_truth else label for end in ends[:-1]] + [label]
        responses.append((response, ends, scores, truth, label))
    whole = _rates([(scores[-1] < 0.5, label) for _, _, scores, _, label in responses])
    by_position = {}
    for share in POSITIONS:
        pairs = []
        for response, ends, scores, truth, _ in responses:
            # The chunk that a token ending at this share of the response takes its weight from.
            end = math.ceil(share / 100 * len(response))
            pairs.append((token_scores([end], ends, scores)[0] < 0.5, token_scores([end], ends, truth)[0]))
        by_position[share] = _rates(pairs)
    most = max(len(ends) for _, ends, _, _, _ in responses)
    by_chunk = {
        k + 1: _rates([(scores[k] < 0.5, truth[k]) for _, ends, scores, truth, _ in responses if k < len(ends)])
        for k in range(most)
    }
    first = {"unsafe_responses": sum(unsafe), "flagged_by_some_prefix": 0, "flagged_as_whole": 0}
    indices, shares, lags, delays = [], [], [], []
    for response, ends, scores, truth, label in responses:
        if not label:
            continue
        delays.append(harm_delay(scores, truth))
        flagged = next((k for k, score in enumerate(scores) if score < 0.5), None)
        first["flagged_as_whole"] += scores[-1] < 0.5
        if flagged is None:
            continue
        first["flagged_by_some_prefix"] += 1
        indices.append(flagged + 1)
        shares.append(ends[flagged] / len(response))
        if prefix_truth is not None:
            lags.append(flagged - truth.index(True))
    first["chunk_index"], first["share_of_response"] = _middle(indices), _middle(shares)
    first["chunks_after_first_harmful_prefix"] = _middle(lags)  # < 0: flagged before the harm was written
    if prefix_truth is not None:
        first["before_harm"] = sum(lag < 0 for lag in lags)
        first["at_harm"] = sum(lag == 0 for lag in lags)
        first["after_harm"] = sum(lag > 0 for lag in lags)
    return {
        "responses": len(responses),
        "whole": whole,
        "by_position": by_position,
        "by_chunk": by_chunk,
        "first_flagged": first,
        "lookahead": recommend_lookahead(delays, coverage) if prefix_truth is not None else None,
    }


def evaluate_guard(
    dataset,
    guardrail,
    tokenizer=None,
    chunk_size: int = 5,
    unit: str = "token",
    label_column: str = LABEL_COLUMN,
    prefix_truth: str | Callable[[str], bool] | None = None,
    output_dir: str | None = None,
    resume: bool = False,
    guardrail_id: str | None = None,
    method: str = "fast",
    batch_size: int = 16,
    progress: bool = True,
    name: str | None = None,
) -> dict:
    """Score every prefix of `dataset`'s labelled responses with `guardrail` (a `Guardrail`, or a function that builds
    it, with `guardrail_id`) and return the figures (`guard_figures`) with their settings. With `output_dir`, the
    scores are saved as they finish in `output_dir/scores` (a `score_dataset` output: an interrupted run given
    `resume` continues where it stopped), and the figures go to `guard_eval.json` and the drift picture to
    `guard_drift.png`, each written whole. An existing `output_dir` is continued only with `resume`. `name` names the
    guard in the figures (default: its `name`, else `guardrail_id`)."""
    if label_column not in dataset.column_names:
        raise STARDSSError(
            f"label_column={label_column!r} is not a column of the dataset (columns: "
            f"{dataset.column_names}). Name the column that labels each response safe or unsafe.",
            arguments=("label_column",),
        )
    unsafe = read_labels(dataset[label_column], label_column)
    if not unsafe:
        raise STARDSSError("The dataset holds no responses. Give a dataset with at least one labelled response.")
    truth_name = (
        prefix_truth
        if isinstance(prefix_truth, str) or prefix_truth is None
        else (f"{prefix_truth.__module__}:{prefix_truth.__qualname__}")
    )
    truth = load_prefix_truth(prefix_truth) if isinstance(prefix_truth, str) else prefix_truth
    scores_dir = None
    if output_dir is not None:
        scores_dir = os.path.join(output_dir, "scores")
        if os.path.exists(scores_dir) and not resume:
            raise STARDSSError(
                f"output_dir={output_dir!r} holds an earlier guard evaluation. Pass resume=True to continue it "
                "(same guard and settings), or choose another directory; it is never overwritten.",
                arguments=("output_dir", "resume"),
            )
    scored, _ = score_dataset(
        dataset,
        guardrail,
        tokenizer,
        chunk_size,
        unit,
        output_dir=scores_dir,
        method=method,
        batch_size=batch_size,
        guardrail_id=guardrail_id,
        progress=progress,
        audit=False,
    )
    figures = {
        "guardrail": name or getattr(guardrail, "name", None) or guardrail_id,
        "chunk_size": chunk_size,
        "unit": unit,
        "label_column": label_column,
        "prefix_truth": truth_name,
        "prefixes_compared_with": f"each prefix's own truth ({truth_name})" if truth else WHOLE_LABEL,
        **guard_figures(scored, unsafe, truth),
    }
    if output_dir is not None:
        write_text_atomic(os.path.join(output_dir, FIGURES_FILE), json.dumps(figures, indent=2))
        drift_png(figures, os.path.join(output_dir, DRIFT_FILE))
    return figures


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_figures(figures: dict) -> str:
    """The figures as text: whole responses, a table by share of the response, where unsafe responses are first
    flagged."""
    whole, first = figures["whole"], figures["first_flagged"]
    positions = figures["by_position"]
    lines = [
        (
            f"{figures['responses']} responses ({whole['unsafe']} unsafe, {whole['safe']} safe), chunks of "
            f"{figures['chunk_size']} {figures['unit']}s; prefixes compared with {figures['prefixes_compared_with']}."
        ),
        (
            f"whole responses: accuracy {_percent(whole['accuracy'])}%, false positives {_percent(whole['fpr'])}% of "
            f"safe, false negatives {_percent(whole['fnr'])}% of unsafe"
        ),
        "",
        "| prefix (% of response) | " + " | ".join(f"{share}%" for share in positions) + " |",
        "|---|" + "---|" * len(positions),
    ]
    for key, name in (
        ("accuracy", "accuracy %"),
        ("fpr", "false positives % (of safe)"),
        ("fnr", "false negatives % (of unsafe)"),
    ):
        lines.append(f"| {name} | " + " | ".join(_percent(rates[key]) for rates in positions.values()) + " |")
    index, share, lag = first["chunk_index"], first["share_of_response"], first["chunks_after_first_harmful_prefix"]
    text = (
        f"\n\nunsafe responses flagged (STAR < 0.5) by some prefix: {first['flagged_by_some_prefix']} of "
        f"{first['unsafe_responses']} (as a whole response: {first['flagged_as_whole']})"
    )
    if index:
        text += (
            f"; first flagged at chunk {index['mean']:.1f} on average (median {index['median']:g}), "
            f"{100 * share['mean']:.0f}% into the response (median {100 * share['median']:.0f}%)"
        )
    if lag:
        text += (
            f"; relative to the first harmful prefix: {first['before_harm']} flagged before it, "
            f"{first['at_harm']} at it, {first['after_harm']} after it (mean {lag['mean']:+.2f} chunks)"
        )
    return "\n".join(lines) + text + "\n\n" + format_lookahead(figures)


def format_lookahead(figures: dict) -> str:
    """The recommended look-ahead with the figures it rests on (or why there is none)."""
    rec = figures.get("lookahead")
    if rec is None:
        return f"recommended look-ahead: none; {NO_PREFIX_TRUTH}."
    if rec["lookahead"] is None:
        return (
            f"recommended look-ahead: none; the guard flagged none of the {rec['unsafe_responses']} unsafe responses "
            "at or after their first harmful prefix, and no look-ahead helps a guard that never flags."
        )
    steps, size = range(len(rec["delay_counts"])), f"{figures['chunk_size']} {figures['unit']}s"
    return (
        f"recommended look-ahead: star_lookahead={rec['lookahead']} (chunks of {size}): the smallest L within which "
        f"at least {100 * rec['coverage']:g}% of the {rec['flagged_from_harm']} unsafe responses flagged at or after "
        f'their first harmful prefix are flagged (docs/method.md, "Look-ahead"). Delay from the first harmful '
        f"prefix to the first flag there or after (chunks: responses): "
        + ", ".join(f"{d}: {n}" for d, n in zip(steps, rec["delay_counts"]))
        + f" (mean {rec['mean_delay']:+.2f}); share flagged within L chunks: "
        + ", ".join(f"L={d}: {100 * share:.1f}%" for d, share in zip(steps, rec["covered"]))
        + f". Never flagged from the harm on (no look-ahead helps them): {rec['never_flagged_from_harm']} of "
        f"{rec['unsafe_responses']}."
    )


def drift_png(figures: dict, path: str) -> None:
    """False-positive and false-negative rates against the position in the response: by share, and by chunk."""

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    panels = (
        (figures["by_position"], "prefix (% of the response)"),
        (figures["by_chunk"], f"chunk index (chunks of {figures['chunk_size']} {figures['unit']}s)"),
    )
    for axis, (rates, label) in zip(axes, panels):
        x = [int(k) for k in rates]
        for key, name, colour in (
            ("fpr", "false positives (% of safe)", "tab:orange"),
            ("fnr", "false negatives (% of unsafe)", "tab:red"),
        ):
            y = [math.nan if r[key] is None else 100 * r[key] for r in rates.values()]
            axis.plot(x, y, marker="o", label=name, color=colour)
        axis.set(xlabel=label, ylabel="%", ylim=(-3, 103))
    figure.legend(
        *axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.92), ncol=2, frameon=False
    )
    figure.subplots_adjust(top=0.8, bottom=0.14)
    figure.suptitle(
        f"Guard drift: {figures['guardrail']} on prefixes (compared with "
        f"{'each prefix' + chr(39) + 's truth' if figures['prefix_truth'] else 'the whole label'})"
    )
    save_figure(figure, path)
