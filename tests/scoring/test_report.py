import os
import re
import shutil
import subprocess

import pytest

from trl_star_dss.testing import tiny_tokenizer
from trl_star_dss.tools.cli import main as star_dss


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "examples", "data", "toy_sample.jsonl")


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scored")
    star_dss(
        [
            "score",
            "--guardrail",
            "trl_star_dss.testing:scripted_guardrail",
            "--dataset",
            SAMPLE,
            "--unit",
            "word",
            "--chunk-size",
            "3",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    return out


def test_show_writes_heatmap_and_pngs(scored_dir, tmp_path, capsys):
    from datasets import load_from_disk
    from matplotlib.image import imread

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    star_dss(
        [
            "show",
            "--dataset",
            str(scored_dir),
            "--output",
            str(tmp_path / "pics"),
            "--policy-tokenizer",
            str(tmp_path / "tok"),
            "--examples",
            "3",
            "4",
        ]
    )
    assert "responses 11 | flagged 6" in capsys.readouterr().out
    assert imread(tmp_path / "pics" / "trajectories.png").shape[:2] == (600, 1200)
    assert imread(tmp_path / "pics" / "summary.png").shape[:2] == (800, 1200)
    page = (tmp_path / "pics" / "heatmap.html").read_text()
    dataset = load_from_disk(str(scored_dir / "dataset"))
    responses = [m["content"] for ex in dataset["messages"] for m in ex if m["role"] == "assistant"]
    tokens = sum(len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses)
    cells = re.findall(r'<span class="t" style="background:rgb\(\d+,\d+,\d+\)" title="STAR ([0-9.]+) \| chunk', page)
    assert len(cells) == tokens  # one coloured element per response token
    # Example 4's misleading last sentence fools the guard on the whole response only: red before, green at the end.
    assert "0.050" in cells and "0.950" in cells


def test_heatmap_page_has_a_title_and_a_line_on_what_to_look_for(scored_dir, tmp_path):
    star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path)])
    page = (tmp_path / "heatmap.html").read_text()
    assert f"<title>STAR scores of {scored_dir}</title>" in page and f"<h1>STAR scores of {scored_dir}</h1>" in page
    assert '<p class="note">What to look for: red spans are pulled toward the reference model' in page


def test_summary_bars_take_the_colour_of_their_star(scored_dir, tmp_path):
    import numpy as np
    from datasets import load_from_disk
    from matplotlib.image import imread

    from trl_star_dss.scoring.report import _rgb, summary_png

    dataset = load_from_disk(str(scored_dir / "dataset"))
    summary_png(dataset, str(tmp_path / "summary.png"))
    pixels = {tuple(p) for p in (imread(tmp_path / "summary.png")[..., :3] * 255).round().astype(int).reshape(-1, 3)}
    lowest = [min(turn["scores"]) for star in dataset["star"] for turn in star]
    counts, edges = np.histogram(lowest, bins=20, range=(0, 1))
    colours = {_rgb((low + high) / 2) for count, low, high in zip(counts, edges[:-1], edges[1:]) if count}
    assert len(colours) == 2 and colours <= pixels  # a red bar (flagged) and a green one (safe), not two red ones


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_sit_outside_the_axes(scored_dir, tmp_path, monkeypatch):
    """The legends of trajectories.png and the demo's chart.png cover no bar or line: they sit outside every axes."""
    from datasets import load_from_disk

    import trl_star_dss.scoring.report as report
    from trl_star_dss.demo import ATTACKS, METHODS
    from trl_star_dss.demo.report import _chart

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path: figures.append(figure))
    report.trajectory_png(load_from_disk(str(scored_dir / "dataset")), str(tmp_path / "t.png"), [2, 3, 4, 5, 7])
    _chart(
        {"aligned model": {"-": (100.0, 98.3)}, **{a: dict.fromkeys(METHODS, (100.0, 100.0)) for a in ATTACKS}},
        str(tmp_path / "chart.png"),
    )
    for figure in figures:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        legends = [legend for axes in figure.axes for legend in [axes.get_legend()] if legend] + figure.legends
        assert len(legends) == 1
        box = legends[0].get_window_extent(renderer)
        assert not any(_overlaps(box, axes.get_window_extent(renderer)) for axes in figure.axes)
        assert 0 <= box.x0 and box.x1 <= figure.bbox.x1 and 0 <= box.y0 and box.y1 <= figure.bbox.y1  # not cut off


def test_show_rejects_unscored_data_and_bad_examples(scored_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"has no `star` column\. Score it first"):
        star_dss(["show", "--dataset", SAMPLE, "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--examples 99 is out of range: the dataset has 10 examples"):
        star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path), "--examples", "99"])
    with pytest.raises(SystemExit, match=r"--max-examples 0 must be a positive whole number\. Use e\.g\. 200"):
        star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path), "--max-examples", "0"])


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="no headless browser installed (apt-get install chromium)"
)
def test_heatmap_renders_in_a_headless_browser(scored_dir, tmp_path):
    star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path)])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1000,800",
            f"file://{tmp_path / 'heatmap.html'}",
        ],
        timeout=120,
        capture_output=True,
    )
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (800, 1000)
    assert pixels[..., :3].std() > 0.05  # not a blank page: text and coloured tokens were drawn
