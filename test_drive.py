"""The drivers' tables: families' rows, sweep's error sign, and figures against a README.

Nothing here trains: ref_train.train and the README's commands are stood in for in-process, so
each test checks what the driver makes of known figures.
"""
import os
import re
import shutil

import pytest

import drive
import flags
import ref_train
from memcheck import MiB

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")

# ---------------------------------------------------------------- families

FAILING = ("gemma2", "none")   # one family's run that raises: it must still be a row


def model_dir_in_name_only(family, directory):
    """What save_family leaves, to the flag checks: a config and a weights file, both empty."""
    os.makedirs(directory)
    for name in ("config.json", flags.WEIGHTS_FILES[0]):
        open(os.path.join(directory, name), "w").close()
    return str(directory)


def fake_family_run(args, log):
    family, ckpt = os.path.basename(args.model), args.ckpt
    if (family, ckpt) == FAILING:
        raise RuntimeError("shape mismatch in the stand-in")
    peak = (100 if ckpt == "manual" else 150) * MiB
    return {"peak_bytes": peak, "config": {"targets": ["q_proj", "v_proj"], "attn": "sdpa"},
            "budget": {"peak_bytes": peak, "method": "traced"}}


def test_families_gives_every_family_both_checkpointing_rows(monkeypatch, capsys):
    monkeypatch.setattr(drive, "save_family", model_dir_in_name_only)
    monkeypatch.setattr(ref_train, "train", fake_family_run)
    assert drive.main(["families"]) == 0
    table = capsys.readouterr().out.split("\n\n")[-1].splitlines()
    assert table[0].split()[:2] == ["family", "targets"]
    rows = [line.split() for line in table[1:] if line.strip()]
    expected = [(family, ckpt) for family in drive.FAMILIES for ckpt in ("manual", "none")]
    assert sorted((row[0], row[3]) for row in rows) == sorted(expected)
    failed = next(row for row in rows if (row[0], row[3]) == FAILING)
    assert failed[4:7] == ["-", "-", "-"] and "failed" in " ".join(failed)


# ---------------------------------------------------------------- sweep

# bs -> (measured, budget) in MiB: 25% over the budget, then 25% under it
SWEEP_POINTS = {1: (125.0, 100.0), 2: (150.0, 200.0)}


def fake_sweep_run(args, log):
    measured, budget = SWEEP_POINTS[args.bs]
    return {"peak_bytes": int(measured * MiB), "budget": {"peak_bytes": int(budget * MiB)}}


def test_sweeps_error_is_measured_over_budget_minus_one(monkeypatch, capsys):
    monkeypatch.setattr(ref_train, "train", fake_sweep_run)
    logged = []
    rows = drive.sweep([{"bs": 1}, {"bs": 2}], [], log=logged.append)
    assert [r["error"] for r in rows] == pytest.approx([0.25, -0.25])
    assert "error +25.0%" in logged[0] and "error -25.0%" in logged[1]
    assert drive.main(["sweep", "--bs", "1,2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^1\s+125\.0\s+100\.0\s+\+25\.0%$", out, re.M), out
    assert re.search(r"^2\s+150\.0\s+200\.0\s+-25\.0%$", out, re.M), out
    assert "worst budget error 25.0% over 2 points" in out


# ---------------------------------------------------------------- figures

# Lines of the README's baseline block, and what a copy changes them to: a figure changed, a line
# the rerun prints missing from the README, an extra line the rerun does not print.
README_BLOCK_LINES = {
    "changed": ("backward      492.4     644.9       644.7", "backward      492.4     645.0       644.7"),
    "missing": ("parameters: 935,684 trainable, 125,332,288 frozen\n", ""),
    "extra": ("parameters: 935,684 trainable", "peak 999.9 MiB in optimizer\nparameters: 935,684 trainable"),
}
NAMED = {  # what the failure must name, and how many figures disagree
    "changed": ("DIFFERS  backward [peak MiB]: quoted 645.0, now 644.9", 1),
    "missing": ("EXTRA    parameters: _ trainable, _ frozen [#1]: now 125,332,288, not quoted", 2),
    "extra": ("MISSING  peak _ MiB in optimizer [#0]: quoted 999.9, not in the output", 1),
}


@pytest.fixture
def baseline_rerun(monkeypatch):
    """The README's baseline block, as what rerunning its command prints (no training)."""
    block = next(lines for _, lines in drive._blocks(open(README).read())   # only read
                 if any(line.startswith("step   1 | loss") for line in lines))
    monkeypatch.setattr(drive, "_run", lambda cmd, cwd, timeout=3600: "\n".join(block) + "\n")


def readme_copy(tmp_path, change=None):
    path = tmp_path / "README.md"
    shutil.copy(README, path)
    if change:
        old, new = README_BLOCK_LINES[change]
        text = path.read_text()
        assert text.count(old) == 1, old
        path.write_text(text.replace(old, new))
    return str(path)


def test_figures_agree_with_an_unchanged_readme(tmp_path, baseline_rerun):
    logged = []
    assert drive.figures(["baseline"], paths=[readme_copy(tmp_path)], log=logged.append) == 0
    assert "every figure agrees with the docs" in logged


@pytest.mark.parametrize("change", list(README_BLOCK_LINES))
def test_figures_fail_naming_a_figure_changed_missing_or_extra_in_the_readme(change, tmp_path,
                                                                             baseline_rerun):
    logged = []
    assert drive.figures(["baseline"], paths=[readme_copy(tmp_path, change)], log=logged.append) > 0
    named, count = NAMED[change]
    assert any(named in line for line in logged), logged
    assert logged[-1] == f"{count} figures disagree with the docs"
