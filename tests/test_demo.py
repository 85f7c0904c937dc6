import os
import re
from pathlib import Path

import pytest

from trl_star_dss.cli import main as star_dss
from trl_star_dss.demo import (ATTACKS, DEMO_TIME, EXCULPATORY_SENTENCE, METHODS, build_world, format_table,
                               is_harmful, run_demo, scripted_guardrail)

README = Path(__file__).parents[1] / "README.md"


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


def test_fast_demo_runs_end_to_end_and_repeats_exactly(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="trl_star_dss.demo")
    star_dss(["demo", "--fast", "--output", str(tmp_path / "a")])
    first = capsys.readouterr().out
    # The README's names of attacks and methods, as in its table.
    assert "SIMULATION" in first and "| attack (SIMULATION) | SFT | STAR-DSS |" in first
    assert "| misleading suffix |" in first and "misleading_suffix" not in first
    # One line per stage, with the seconds so far, then the total.
    progress = [record.getMessage() for record in caplog.records if record.name == "trl_star_dss.demo"]
    assert [re.sub(r"\(\d+ s\)", "(N s)", line) for line in progress[:4]] == [
        "demo 1/4 (N s): knowledge: the tiny model learns the letter tasks and harmful answers (900 examples, 2 epochs)",
        "demo 2/4 (N s): alignment: it learns to refuse harmful requests (900 examples, 1 epoch)",
        "demo 3/4 (N s): attack misleading suffix x SFT (100 examples)",
        "demo 4/4 (N s): attack misleading suffix x STAR-DSS (100 examples)",
    ]
    assert len(progress) == 5 and re.fullmatch(r"demo done in \d+ s", progress[4])
    for name in ("table.md", "chart.png", "heatmap_misleading_suffix.html"):
        assert os.path.getsize(tmp_path / "a" / name) > 0
    page = (tmp_path / "a" / "heatmap_misleading_suffix.html").read_text()
    assert "<title>STAR scores of the misleading suffix attack" in page
    assert "<h1>STAR scores of the misleading suffix attack" in page
    assert "the prefixes score unsafe (red), the whole response safe" in page
    caplog.clear()
    star_dss(["demo", "--fast", "--no-progress", "--output", str(tmp_path / "b")])
    second = capsys.readouterr().out
    assert not [record for record in caplog.records if record.name == "trl_star_dss.demo"]
    table = [line for line in first.splitlines() if line.startswith("|") or "aligned model" in line]
    assert table and table == [line for line in second.splitlines() if line.startswith("|") or "aligned model" in line]


def test_benign_mix_heat_map_shows_its_harmful_examples(tmp_path):
    from trl_star_dss.demo import ATTACK_LABELS, _score_attack, world_tokenizer

    world = build_world(seed=0)
    _score_attack(world, "benign_mix", world_tokenizer(world), str(tmp_path))
    page = (tmp_path / "heatmap_benign_mix.html").read_text()
    assert f"<h1>STAR scores of the {ATTACK_LABELS['benign_mix']} attack" in page
    shown = [int(i) for i in re.findall(r'class="meta">example (\d+),', page)]
    assert len(shown) == 5 and page.count("| flagged</div>") == 5
    assert all(is_harmful(world["attacks"]["benign_mix"][i]["messages"][1]["content"]) for i in shown)


def test_demo_time_is_stated_once_the_same_in_readme_and_help(capsys):
    readme = README.read_text()
    assert readme.count(DEMO_TIME) == 1 and DEMO_TIME in readme.split("## Quickstart")[1].split("```")[1]
    assert not re.search(r"82 to 94 s|about 1\.5 min|a few minutes", readme)
    with pytest.raises(SystemExit):
        star_dss(["demo", "--help"])
    assert DEMO_TIME in " ".join(capsys.readouterr().out.split())


def test_full_demo_reproduces_the_readme_table(tmp_path):
    """The README's table is what `star-dss demo` (seed 0) prints, line for line; re-run it here (DEMO_TIME)."""
    table = run_demo(str(tmp_path), seed=0)
    section = README.read_text().split("## The demo")[1].split("\n#")[0]
    cells = [re.findall(r"\d+\.\d / \d+\.\d", line) for line in section.splitlines() if line.startswith("| ")]
    readme = [row for row in cells if row]  # the four attack rows, methods in the order of METHODS
    assert readme == [[f"{table[a][m][0]:.1f} / {table[a][m][1]:.1f}" for m in METHODS] for a in ATTACKS]
    printed = [line for line in format_table(table).splitlines() if line.startswith("|")]
    assert printed == [line for line in section.splitlines() if line.startswith("|")]  # same labels, same order
    safety, capability = table["aligned model"]["-"]
    assert f"The aligned model before any attack: safety {safety:.1f}, capability {capability:.1f}." in section
