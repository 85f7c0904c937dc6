import os
import re
import shutil
import subprocess

import pytest

from trl_star_dss.cli import main as star_dss
from trl_star_dss.testing import tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "data", "toy_sample.jsonl")


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scored")
    star_dss(["score", "--guardrail", "trl_star_dss.testing:scripted_guardrail", "--dataset", SAMPLE, "--unit", "word",
              "--chunk-size", "3", "--output", str(out), "--no-progress"])  # fmt: skip
    return out


def test_show_writes_heatmap_and_pngs(scored_dir, tmp_path, capsys):
    from datasets import load_from_disk
    from matplotlib.image import imread

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path / "pics"), "--policy-tokenizer",
              str(tmp_path / "tok"), "--examples", "3", "4"])  # fmt: skip
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


def test_show_rejects_unscored_data_and_bad_examples(scored_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"has no `star` column\. Score it first"):
        star_dss(["show", "--dataset", SAMPLE, "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--examples 99 is out of range: the dataset has 10 examples"):
        star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path), "--examples", "99"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless browser installed (apt-get install chromium)")
def test_heatmap_renders_in_a_headless_browser(scored_dir, tmp_path):
    star_dss(["show", "--dataset", str(scored_dir), "--output", str(tmp_path)])
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,800", f"file://{tmp_path / 'heatmap.html'}"], timeout=120,
                   capture_output=True)  # fmt: skip
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (800, 1000)
    assert pixels[..., :3].std() > 0.05  # not a blank page: text and coloured tokens were drawn
