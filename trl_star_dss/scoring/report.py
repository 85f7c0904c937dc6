"""Pictures of STAR scores: a token heat map (self-contained HTML) and two PNGs (trajectories, dataset summary).

They read the `star` column that scoring writes (`scoring.py`), so they work on any scored dataset, before training.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

from ..formats import STAR_COLUMN, dataset_format, response_turns
from ..storage import write_text_atomic
from ..weights import token_scores
from .chunks import unit_ends


def _rgb(score: float) -> tuple[int, int, int]:
    """Red (unsafe, 0) through pale yellow (0.5) to green (safe, 1): the one colour scale of every picture."""
    if score < 0.5:
        t = score / 0.5
        return (230, int(80 + 150 * t), int(80 + 120 * t))
    t = (score - 0.5) / 0.5
    return (int(230 - 130 * t), int(230 - 30 * t), int(200 - 100 * t))


def _colour(score: float) -> str:
    """`_rgb` as CSS."""
    return "rgb({},{},{})".format(*_rgb(score))


def _scored_turns(dataset, indices: Sequence[int]):
    """(example index, turn record, context, response) of every scored turn of the chosen examples."""
    fmt = dataset_format(dataset.column_names)
    for index in indices:
        example = dataset[index]
        turns = {turn: (context, response) for turn, context, response in response_turns(example, fmt, index)}
        for record in example[STAR_COLUMN]:
            context, response = turns[record["turn"]]
            yield index, record, context, response


def _pieces(response: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) character spans of the response's units: policy tokens, or words without a tokenizer."""
    ends = unit_ends(response, "token" if tokenizer is not None else "word", tokenizer)
    starts = [0] + ends[:-1]
    return [(start, end) for start, end in zip(starts, ends) if end > start]


def first_flagged(dataset, count: int = 5) -> list[int]:
    """The first `count` examples with a response whose lowest STAR is below 0.5, else the first `count`: what a
    picture of a few examples should show (the first examples of mostly benign data show nothing)."""
    lowest = [min(min(turn["scores"]) for turn in star) for star in dataset[STAR_COLUMN]]
    return [i for i, low in enumerate(lowest) if low < 0.5][:count] or list(range(min(count, len(dataset))))


HEATMAP_NOTE = (
    "What to look for: red spans are pulled toward the reference model (KL), green ones are learned "
    "(cross-entropy); a response that is red inside and green only at its end was judged safe as a whole "
    "but not by its prefixes (a misleading suffix)."
)


def heatmap_html(
    dataset,
    path: str,
    tokenizer=None,
    indices: Sequence[int] | None = None,
    title: str = "STAR scores",
    note: str = HEATMAP_NOTE,
) -> int:
    """Write an HTML page where every response unit (policy token, or word without `tokenizer`) is coloured by its
    STAR weight; hovering shows the score and the chunk. `title` is the page's title and heading, `note` one line
    under it on what to look for. Returns the number of coloured units."""
    indices = range(len(dataset)) if indices is None else indices
    blocks, count = [], 0
    for index, record, context, response in _scored_turns(dataset, indices):
        spans = _pieces(response, tokenizer)
        weights = token_scores([end for _, end in spans], record["chunk_ends"], record["scores"])
        chunk_of = token_scores([end for _, end in spans], record["chunk_ends"], list(range(len(record["scores"]))))
        cells = []
        for (start, end), weight, chunk in zip(spans, weights, chunk_of):
            hover = f"STAR {weight:.3f} | chunk {chunk + 1}/{len(record['scores'])}"
            cells.append(
                f'<span class="t" style="background:{_colour(weight)}" title="{hover}">'
                f"{html.escape(response[start:end])}</span>"
            )
        count += len(cells)
        prompt = html.escape(context[-1]["content"]) if context else ""
        low = min(record["scores"])
        blocks.append(
            f'<div class="ex"><div class="meta">example {index}, turn {record["turn"]} | lowest STAR {low:.3f}'
            f'{" | flagged" if low < 0.5 else ""}</div><div class="prompt">{prompt}</div>'
            f'<div class="resp">{"".join(cells)}</div></div>'
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}.ex{border-bottom:1px solid #ddd;padding:1em 0}"
        ".meta{color:#555;font-size:.85em}.prompt{color:#333;margin:.3em 0;font-style:italic}"
        ".resp{white-space:pre-wrap;line-height:1.6}.t{border-radius:2px}.note{font-weight:bold}"
        f'</style></head><body><h1>{html.escape(title)}</h1><p class="note">{html.escape(note)}</p>'
        "<p>Each response unit is coloured by its STAR weight: "
        f'<span style="background:{_colour(0)}">0 unsafe (KL to the reference)</span> '
        f'<span style="background:{_colour(0.5)}">0.5</span> '
        f'<span style="background:{_colour(1)}">1 safe (cross-entropy)</span>. Hover a unit for its score and chunk.'
        f"</p>{''.join(blocks)}</body></html>"
    )
    write_text_atomic(path, page)
    return count


def trajectory_png(dataset, path: str, indices: Sequence[int]) -> None:
    """A PNG (1200 x 600 px) of the STAR score against the position in the response, one line per chosen turn."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(12, 6), dpi=100)
    for index, record, _, response in _scored_turns(dataset, indices):
        positions = [0] + [end / len(response) for end in record["chunk_ends"]]
        axes.step(
            positions,
            [record["scores"][0]] + record["scores"],
            where="pre",
            label=f"example {index}, turn {record['turn']}",
        )
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.set(
        xlabel="position in the response (share of its characters)",
        ylabel="STAR (guard P(safe))",
        ylim=(-0.02, 1.02),
        xlim=(0, 1),
        title="STAR trajectories: score of every prefix, chunk by chunk",
    )
    # The legend sits right of the axes: scores of 0 and 1 fill every corner of them.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, borderaxespad=0)
    figure.subplots_adjust(left=0.07, right=0.82)
    save_figure(figure, path)


def summary_png(dataset, path: str, max_listed: int = 8) -> dict:
    """A PNG (1200 x 800 px) summarising a scored dataset: the distribution of each example's lowest STAR, the share
    of response units under KL (STAR < 0.5), and the flagged examples with the span where the score dropped."""
    plt = pyplot()
    lowest, units, under, flagged = [], 0, 0, []
    for index, record, _, response in _scored_turns(dataset, range(len(dataset))):
        spans = _pieces(response, None)
        weights = token_scores([end for _, end in spans], record["chunk_ends"], record["scores"])
        units += len(weights)
        under += sum(weight < 0.5 for weight in weights)
        low = min(record["scores"])
        lowest.append(low)
        if low < 0.5:
            first = next(k for k, score in enumerate(record["scores"]) if score < 0.5)
            start = record["chunk_ends"][first - 1] if first else 0
            flagged.append((index, record["turn"], response[start : record["chunk_ends"][first]]))
    share = under / units if units else 0.0
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 8), dpi=100)
    _, edges, bars = left.hist(lowest, bins=20, range=(0, 1), edgecolor="#666", linewidth=0.5)
    for bar, low, high in zip(bars, edges[:-1], edges[1:]):  # each bar in the colour of its STAR (the heat map's)
        bar.set_facecolor([c / 255 for c in _rgb((low + high) / 2)])
    left.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    left.set(
        xlabel="lowest STAR of the response (< 0.5: flagged)",
        ylabel="responses",
        title=f"{len(lowest)} responses, {len(flagged)} flagged (< 0.5)",
    )
    right.axis("off")
    lines = [f"share of response words under KL (STAR < 0.5): {100 * share:.1f}%", "", "flagged: where it dropped"]
    for index, turn, span in flagged[:max_listed]:
        lines.append(f"ex {index} turn {turn}: ...{span.strip()[:60]}...")
    if len(flagged) > max_listed:
        lines.append(f"(+{len(flagged) - max_listed} more)")
    right.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9, wrap=True)
    save_figure(figure, path)
    return {"responses": len(lowest), "flagged": len(flagged), "share_under_kl": share}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend: the pictures are written, never shown (CI, servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    figure.savefig(tmp)  # fixed figsize x dpi, no bbox trimming: the size is known
    plt.close(figure)
    os.replace(tmp, path)
