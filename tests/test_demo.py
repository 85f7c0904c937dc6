import os
import re
from pathlib import Path

from trl_star_dss.cli import main as star_dss
from trl_star_dss.demo import (ATTACKS, EXCULPATORY_SENTENCE, METHODS, build_world, is_harmful, run_demo,
                               scripted_guardrail)


def test_world_is_deterministic_and_as_written():
    world = build_world(seed=0)
    assert world == build_world(seed=0) and world != build_world(seed=1)
    suffix = world["attacks"]["misleading_suffix"]
    assert all(ex["messages"][1]["content"].endswith(EXCULPATORY_SENTENCE) for ex in suffix)
    # The scripted guard is fooled by the whole suffixed response, not by its prefixes.
    answer = suffix[0]["messages"][1]["content"]
    assert is_harmful(answer) and scripted_guardrail([{"role": "assistant", "content": answer}]) > 0.5
    mix = world["attacks"]["benign_mix"]
    assert sum(is_harmful(ex["messages"][1]["content"]) for ex in mix) == len(mix) // 10
    held_out = set(world["held_out_harmful"])
    trained = {ex["messages"][0]["content"] for rows in world["attacks"].values() for ex in rows}
    assert not held_out & trained  # safety is measured on phrasings never trained on


def test_fast_demo_runs_end_to_end_and_repeats_exactly(tmp_path, capsys):
    star_dss(["demo", "--fast", "--output", str(tmp_path / "a")])
    first = capsys.readouterr().out
    assert "SIMULATION" in first and "| misleading_suffix |" in first
    for name in ("table.md", "chart.png", "heatmap_misleading_suffix.html"):
        assert os.path.getsize(tmp_path / "a" / name) > 0
    star_dss(["demo", "--fast", "--output", str(tmp_path / "b")])
    second = capsys.readouterr().out
    table = [line for line in first.splitlines() if line.startswith("|") or "aligned model" in line]
    assert table and table == [line for line in second.splitlines() if line.startswith("|") or "aligned model" in line]


def test_full_demo_reproduces_the_readme_table(tmp_path):
    """The README's table is what `star-dss demo` (seed 0) prints; re-run it here (about 1.5 min on 2 cores)."""
    table = run_demo(str(tmp_path), seed=0)
    section = (Path(__file__).parents[1] / "README.md").read_text().split("## The demo")[1].split("\n#")[0]
    cells = [re.findall(r"\d+\.\d / \d+\.\d", line) for line in section.splitlines() if line.startswith("| ")]
    readme = [row for row in cells if row]  # the four attack rows, methods in the order of METHODS
    assert readme == [[f"{table[a][m][0]:.1f} / {table[a][m][1]:.1f}" for m in METHODS] for a in ATTACKS]
    safety, capability = table["aligned model"]["-"]
    assert f"The aligned model before any attack: safety {safety:.1f}, capability {capability:.1f}." in section
