"""The drivers of drive.py: ablate, bench, budget, families, sweep and figures, their one-line
errors and their help, and .ci/gpu: on a machine without CUDA, and its report and exit code on
faked steps.

The tiny model of conftest.py runs in this process; where a test checks only what a driver makes
of known figures, ref_train.train and the README's commands are stood in for.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import drive
import flags
import memcheck
import ref_train
from conftest import HANG_SECONDS, ROOT, assert_markdown_tables, help_text, one_error_line, run_main
from memcheck import MiB

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")


# ---------------------------------------------------------------- ablate

def in_process_runner(argv, report_path):
    """ablate's runner, in this process: the real one starts a process per variant (slow in tests)."""
    try:
        report = ref_train.train(ref_train.parse_args([*argv, "--report", report_path]),
                                 log=lambda *a: None)
        return report, None
    except (ref_train.UsageError, torch.OutOfMemoryError) as e:
        return None, str(e)


def test_ablate_runs_every_suspect_and_writes_the_table(tiny_model, tmp_path):
    rows = drive.ablate(["--model", tiny_model, "--device", "cpu"], log=lambda *a: None,
                           run=in_process_runner)
    names = [r["variant"] for r in rows]
    assert names[0] == "baseline"
    for suspect in ("added tokens + resize off", "checkpointing hf", "checkpointing none",
                    "einsum implementation", "1 expert", "LoRA dropout 0.1", "precision 16-mixed",
                    "bf16 weights under 16-mixed", "item injection off", "targets all-linear",
                    "injected leak"):
        assert suspect in names
    # On CPU, 16-bit precision runs at this size (it was skipped as "minutes a step", true only of
    # large models); bf16 weights under it cannot run: a row says so and gives the prediction.
    [bf16] = [r for r in rows if r["variant"] == "bf16 weights under 16-mixed"]
    assert bf16["error"] == f"skipped: {drive.NOT_ON_CPU}" and bf16["budget_peak_bytes"] > 0
    assert all(r["error"] is None and r["peak_bytes"] > 0 for r in rows if r is not bf16), rows
    deltas = [r["delta_bytes"] for r in rows[1:] if r["delta_bytes"] is not None]
    assert deltas == sorted(deltas, reverse=True)
    assert next(r for r in rows if r["variant"] == "injected leak")["leak_bytes_per_step"] > 0
    # The tiny model's tokenizer is smaller than its embeddings: not resizing keeps 4,200 rows for
    # the baseline's 560, and the table said nothing of it ("3.49x" for what costs nothing at
    # opt-125m, whose few rows' difference gets no note).
    [note] = drive.vocabulary_notes(rows)
    assert note.startswith("note: 'added tokens + resize off' trains 4,200 embedding rows, the baseline 560")
    assert drive.vocabulary_notes([{"vocab_rows": 50276}, {"variant": "v", "vocab_rows": 50272}]) == []
    header, table = drive.ablation_table(rows)
    assert len(table) == len(rows)
    assert_markdown_tables(memcheck.markdown_block("ablate", [(header, table)]))
    path = tmp_path / "ablate.json"
    memcheck.write_report(path, rows)
    for row in json.loads(path.read_text()):
        assert {"variant", "flags", "peak_bytes", "leak_bytes_per_step", "budget_peak_bytes"} <= set(row)


def test_a_16_bit_variant_is_budgeted_instead_of_run_on_cpu_only_where_it_would_take_minutes():
    args = ref_train.parse_args(["--precision", "16-mixed", "--weights-dtype", "fp32", "--device", "cpu"])
    opt_125m = {"terms": {"params": 478 * MiB}}
    assert drive._not_run_on_cpu(args, opt_125m) == drive.SLOW_ON_CPU
    assert drive._not_run_on_cpu(args, {"terms": {"params": MiB}}) is None


def test_a_failing_variant_is_a_row_that_says_so(tiny_model):
    # r 2 with one expert: the variants with 4 experts (the leak needs a gate, so it takes 4 too)
    # cannot split rank 2 four ways.
    rows = drive.ablate(["--model", tiny_model, "--device", "cpu", "--experts", "1", "--lora-r", "2"],
                           log=lambda *a: None, steps=1, run=in_process_runner)
    failed = [r for r in rows if r["error"] and not r["error"].startswith("skipped")]
    assert sorted(r["variant"] for r in failed) == ["4 experts", "injected leak"]
    assert all("--lora-r 2" in r["error"] for r in failed)
    assert "failed" in drive.ablation_table(rows)[1][-1]
    skipped = 1   # (bf16 weights under 16-mixed)
    assert sum(r["peak_bytes"] is not None for r in rows) == len(rows) - 2 - skipped   # the others went on


def test_ablate_variant_runs_in_its_own_process_whose_last_line_is_the_rows_error(tiny_model, tmp_path):
    # (a value refused before torch is imported: the process, not a training, is what is tested; the
    # in-process runner above trains every variant)
    report, error = drive._run_reference(["--model", tiny_model, "--steps", "1", "--lora-r", "0"],
                                         str(tmp_path / "one.json"))
    assert report is None and error == "ref_train.py: error: --lora-r 0: must be 1 or more", error


def test_ablate_rows_carry_the_load_peak_and_the_reentrant_variant(tiny_model, train_tiny):
    report = train_tiny("--steps", 1)
    rows = drive.ablate(["--model", tiny_model, "--device", "cpu"], log=lambda *a: None,
                        run=lambda argv, path: (report, None))   # the same report for every variant
    assert "checkpointing reentrant" in [r["variant"] for r in rows]
    load = report["phases"]["load"]["peak_bytes"]
    assert load > 0 and all(r["load_peak_bytes"] == load for r in rows if not r["error"])
    header, table = drive.ablation_table(rows)
    column = header.index("load peak MiB")
    assert header[column - 1] == "peak MiB"
    assert table[0][column] == memcheck.mib(load)


def _promised(name):
    """{config key: value} that an ablate variant's name promises, read from the name alone."""
    words = name.split()
    if name == "baseline":
        return {}
    if name.startswith("added tokens"):   # (+ resize, but for a base that sets --vocab)
        return {"add_tokens": words[-1] == "on"}
    if name == "checkpointing every layer":
        return {"ckpt_every": 1}
    if name.startswith("checkpointing "):
        return {"ckpt": words[1], "ckpt_every": 1}
    if name.endswith(" implementation"):
        return {"impl": words[0]}
    if name.endswith(("expert", "experts")):
        return {"experts": int(words[0])}
    if name.startswith("LoRA dropout "):
        return {"dropout": float(words[-1])}
    if name.startswith("precision "):
        return {"precision": words[1], "weights_dtype": "fp32"}
    if name == "bf16 weights under 16-mixed":
        return {"precision": "16-mixed", "weights_dtype": "bf16"}
    if name.startswith("item injection "):
        return {"inject_items": words[-1] == "on"}
    if name.startswith("targets "):
        return {"targets": tuple(words[1].split(","))}
    if name == "injected leak":
        return {"inject_leak": True}
    raise AssertionError(f"a variant whose name says nothing known: {name!r}")


@pytest.mark.parametrize("base", [
    [],
    ["--no-add-tokens", "--ckpt", "none", "--impl", "einsum", "--experts", "1", "--dropout", "0.1",
     "--no-inject-items", "--targets", "all-linear", "--precision", "bf16-mixed"],
    ["--ckpt-every", "2"],
    ["--vocab", "4200"],
], ids=["defaults", "every-switch-flipped", "every-2nd-layer-checkpointed", "vocabulary-set"])
def test_each_ablate_variant_changes_exactly_what_its_name_says(tiny_model, base):
    # Mistake: a variant whose flags do not match its name ('resize off' passing no flag).
    base = ["--model", tiny_model, "--device", "cpu", *base]
    baseline = vars(ref_train.parse_args(base))
    variants = drive.ablation_variants(ref_train.parse_args(base))
    assert variants[0] == ("baseline", [])
    for name, variant_flags in variants:
        try:
            changed = vars(ref_train.parse_args([*base, *variant_flags]))
        except ref_train.UsageError:   # reentrant needs injected items: ablate's row says so
            assert name == "checkpointing reentrant" and "--no-inject-items" in base
            continue
        differences = {k: v for k, v in changed.items() if v != baseline[k]}
        promised = {k: v for k, v in _promised(name).items() if v != baseline[k]}
        if name == "injected leak" and baseline["experts"] == 1:
            promised["experts"] = 4   # the leak keeps the gate, which takes experts
        assert promised or name == "baseline", f"{name!r} changes nothing its name promises ({variant_flags})"
        assert differences == promised, (name, variant_flags, differences)


def test_ablate_variants_move_the_peak_the_way_their_names_say(tiny_model):
    # The same mistake seen in the figures: each change moves the peak in the direction it must.
    # Without checkpointing, at bs 4 x seq 128 of the tiny OPT, whose vocabulary shrinks from
    # 4200 rows to 560 when the tokens are added and the embeddings resized.
    rows = drive.ablate(["--model", tiny_model, "--device", "cpu", "--ckpt", "none", "--bs", "4",
                         "--seq", "128", "--steps", "2"], log=lambda *a: None, run=in_process_runner)
    by_name = {r["variant"]: r for r in rows}
    up = ("added tokens + resize off", "einsum implementation", "LoRA dropout 0.1",
          "targets all-linear")
    down = ("checkpointing manual", "checkpointing hf", "checkpointing reentrant", "1 expert",
            "item injection off")
    for name in up:
        assert by_name[name]["delta_bytes"] > 0.01 * rows[0]["peak_bytes"], (name, by_name[name])
    for name in down:
        assert by_name[name]["delta_bytes"] < 0, (name, by_name[name])
    assert by_name["injected leak"]["leak_bytes_per_step"] == 4 * 4 * 4   # bs x experts fp32
    assert all(r["leak_bytes_per_step"] == 0 for r in rows if r["variant"] != "injected leak"
               and r["error"] is None)


# ---------------------------------------------------------------- bench

@pytest.fixture(scope="module")
def bench_rows(tiny_model):
    """drive.bench's rows on the tiny model, 2 steps: one run for the tests of this section."""
    return drive.bench(["--model", tiny_model, "--device", "cpu"], steps=2, log=lambda *a: None)


def test_bench_runs_end_to_end_on_a_tiny_model(bench_rows):
    rows = bench_rows
    by_name = {r["comparison"]: r for r in rows}
    assert by_name["reference / PEFT: peak"]["ratio"] > 0
    assert by_name["tracker / torch.profiler: peak above start"]["met"]
    # the overhead on a PEFT loop with HF checkpointing: a row with a ratio (its value is a time)
    peft = by_name["probe overhead, PEFT + HF checkpointing: tracked / untracked step"]
    assert peft["ratio"] > 0 and peft["target"] == 1.10 and peft["unit"] == "s"
    assert any(name.startswith("reference --loss-chunks") and name.endswith("/ PEFT: peak")
               for name in by_name)
    assert all(r["a"] > 0 and r["b"] > 0 for r in rows)
    header, table = drive.bench_table(rows)
    assert len(table) == len(rows)


def test_bench_figures_meet_their_memory_targets_on_a_tiny_model(bench_rows):
    rows = bench_rows
    by_name = {r["comparison"]: r for r in rows}
    # The reference is as lean as PEFT (its target, 1.0), and not by leaving something out.
    assert by_name["reference / PEFT: peak"]["met"]
    assert by_name["reference / PEFT: peak"]["ratio"] >= 0.9
    # With checkpointing the einsum form's outputs live only in one recomputed layer.
    assert by_name["E=4 lean / einsum: peak"]["ratio"] <= 1.0
    assert abs(by_name["tracker / torch.profiler: peak above start"]["ratio"] - 1) <= 0.01
    chunks = drive.BENCH_LOSS_CHUNKS
    assert by_name[f"reference --loss-chunks {chunks} / PEFT: peak"]["met"]
    floor = by_name[f"reference --loss-chunks {chunks} / memory floor"]["ratio"]
    assert 1.0 <= floor <= 1.1, floor   # never under the floor, and near it
    for r in rows:   # times are machine-dependent: positive, and no target claimed on them here
        assert r["a"] > 0 and r["b"] > 0


def test_bench_times_the_tracker_and_the_fused_loss_in_turn(tiny_model):
    args = ref_train.parse_args([*drive.BENCH_BASE, "--model", tiny_model, "--device", "cpu"])
    chunked = ref_train.parse_args([*drive.BENCH_BASE, "--model", tiny_model, "--device", "cpu",
                                    "--loss-chunks", "8"])
    seconds = drive._interleaved(args, chunked, steps=1)
    assert set(seconds) == {"untracked", "tracked", "chunked", "peft untracked", "peft tracked"}
    assert all(s > 0 for s in seconds.values())


# ---------------------------------------------------------------- budget

def test_budget_command_prints_lora_and_full_side_by_side_and_writes_them_where_asked(tiny_model, capsys,
                                                                                      tmp_path):
    # --report and --markdown were taken (the path even checked), and ignored
    done = run_main(drive.main, capsys, "budget", "--model", tiny_model, "--bs", 2, "--seq", 64,
                    "--full", "--report", tmp_path / "budget.json", "--markdown")
    assert done.returncode == 0, done.stderr
    assert "LoRA (this config)" in done.stdout and "full fine-tuning" in done.stdout
    assert "predicted peak" in done.stdout
    assert "### drive.py budget" in done.stdout and "| predicted peak |" in done.stdout
    written = json.loads((tmp_path / "budget.json").read_text())
    assert written["lora"]["peak_bytes"] < written["full"]["peak_bytes"]
    assert f"| predicted peak | {memcheck.mib(written['lora']['peak_bytes'])} |" in done.stdout


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


def test_the_families_command_refuses_what_it_sets_and_what_ref_train_refuses(capsys):
    # (each in one line, exit 2, before any model is saved)
    for argv, said in ((["--model", "x"], "--model: families sets it"),
                       (["--ckpt=none"], "--ckpt: families sets it"),
                       (["--precision", "bogus"], "invalid choice: 'bogus'")):
        assert drive.main(["families", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


# ---------------------------------------------------------------- sweep

# bs -> (measured, budget) in MiB: 25% over the budget, then 25% under it
SWEEP_POINTS = {1: (125.0, 100.0), 2: (150.0, 200.0)}


def fake_sweep_run(args, log):
    measured, budget = SWEEP_POINTS[args.bs]
    return {"peak_bytes": int(measured * MiB), "budget": {"peak_bytes": int(budget * MiB)}}


def test_a_sweep_keeps_the_users_steps_in_either_form_and_adds_two_only_without_them():
    for given in (["--steps", "5"], ["--steps=5"]):
        assert drive._point_argv({"bs": 4}, given, steps=2) == [*given, "--bs", "4"]
    assert drive._point_argv({"bs": 4}, [], steps=2) == ["--steps", "2", "--bs", "4"]


def test_a_sweep_points_rank_is_ref_trains_lora_r():
    assert drive._point_argv({"r": 4, "bs": 2}, [], 2) == ["--steps", "2", "--lora-r", "4", "--bs", "2"]


def test_a_sweep_point_that_runs_out_of_python_memory_is_a_failed_row(monkeypatch):
    def out_of_memory(args, log):
        raise MemoryError()
    monkeypatch.setattr(ref_train, "train", out_of_memory)
    rows = drive.sweep([{"bs": 1}], [], log=lambda *_: None)
    assert rows[0]["peak_bytes"] is None and "failed" in rows[0]


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


def test_sweep_fits_more_memory_for_more_tokens_and_samples(tiny_model, tmp_path):
    points = [{"bs": bs, "seq": seq} for bs in (1, 3) for seq in (32, 96, 160)]
    rows = drive.sweep(points, ["--model", tiny_model, "--device", "cpu"], log=lambda *a: None)
    assert all(abs(r["error"]) <= 0.10 for r in rows), rows
    growth = drive.fit_growth(rows)
    per_token, per_sample = growth["mib_per_unit"]["seq"], growth["mib_per_unit"]["bs"]
    assert per_token > 0 and per_sample > 0
    # A sample is 32..160 tokens, so it must cost more than a token and less than 200 of them.
    assert per_token < per_sample < 200 * per_token
    assert growth["seq"]["law"] == "linear"
    header, table = drive.sweep_table(rows)
    assert_markdown_tables(memcheck.markdown_block("sweep", [(header, table)]))


def test_a_sweep_of_two_seq_values_says_the_law_needs_three():
    # The law was left out in silence: docs/diagnosing.md promises it for a sweep over seq.
    rows = [{"seq": seq, "peak_bytes": peak, "error": 0.0} for seq, peak in ((32, 10 * MiB), (64, 12 * MiB))]
    assert drive.growth_lines(drive.fit_growth(rows))[-1] == (
        "sequence length: linear or quadratic needs 3 or more --seq values")


def test_sweep_sees_quadratic_growth_with_eager_attention(tiny_model):
    points = [{"seq": seq} for seq in (64, 128, 192, 256)]
    rows = drive.sweep(points, ["--model", tiny_model, "--device", "cpu", "--attn", "eager",
                                   "--ckpt", "none", "--bs", "4"], log=lambda *a: None)
    assert drive.fit_growth(rows)["seq"]["law"].startswith("quadratic")


def test_sweep_plot_without_matplotlib_is_refused_before_any_point_is_measured(monkeypatch, tmp_path,
                                                                                capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if it were not installed
    monkeypatch.setattr(drive, "sweep", lambda *a, **k: pytest.fail("a point was measured"))
    done = run_main(drive.main, capsys, "sweep", "--bs", "1,2", "--plot", tmp_path / "sweep.png")
    assert one_error_line(done) == ("drive.py sweep: error: --plot needs matplotlib, which is "
                                    "optional: pip install matplotlib")


def test_sweep_command_writes_json_and_a_plot_where_matplotlib_is(tiny_model, tmp_path, capsys):
    path, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    drawing = importlib.util.find_spec("matplotlib") is not None   # optional
    done = run_main(drive.main, capsys, "sweep", "--model", tiny_model, "--bs", "1,2",
                    "--seq", "32,64,96", "--report", path, "--markdown", *(("--plot", plot) if drawing else ()))
    assert done.returncode == 0, done.stderr
    assert plot.exists() == drawing and (not drawing or plot.stat().st_size > 0)
    saved = json.loads(path.read_text())
    assert len(saved["points"]) == 6 and "mib_per_unit" in saved["growth"]
    assert "MiB per extra token" in done.stdout
    assert_markdown_tables(done.stdout[done.stdout.index("### drive.py sweep"):])


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


def test_the_figures_command_finds_every_block_it_checks_in_the_readme():
    blocks = drive.readme_figures()
    baseline = blocks["baseline"]
    assert baseline["command"] == "python ref_train.py --bs 2 --seq 128"
    assert len(baseline["figures"]) >= 30
    assert any(f["kind"] == "time" for f in baseline["figures"])
    assert any(f["kind"] == "loss" for f in baseline["figures"])
    assert all(f["value"] for f in baseline["figures"])
    for name in ("ablate", "careless diff", "budget grid", "bench"):
        assert blocks[name]["figures"], name


# ---------------------------------------------------------------- failures named in one line, and help

# (flags, what the one stderr line must name); "{tiny}" is the tiny model
FAILURES = {
    "ablate-report-under-proc": (["ablate", "--model", "{tiny}", "--report", "/proc/report.json"],
                                 ["--report /proc/report.json", "/proc"]),
    "ablate-report-in-missing-dir": (["ablate", "--model", "{tiny}", "--report", "/no/such/dir/r.json"],
                                     ["/no/such/dir/r.json", "does not exist"]),
    "ablate-unknown-target": (["ablate", "--model", "{tiny}", "--targets", "foo"],
                              ["--targets foo", "q_proj"]),
    "sweep-report-under-proc": (["sweep", "--model", "{tiny}", "--bs", "1,2", "--report",
                                 "/proc/report.json"], ["--report /proc/report.json", "/proc"]),
    "sweep-plot-under-proc": (["sweep", "--model", "{tiny}", "--bs", "1,2", "--plot", "/proc/sweep.png"],
                              ["--plot /proc/sweep.png", "/proc"]),
    "sweep-plot-in-missing-dir": (["sweep", "--model", "{tiny}", "--bs", "1,2", "--plot",
                                   "/no/such/dir/p.png"], ["--plot /no/such/dir/p.png", "does not exist"]),
    "bench-report-under-proc": (["bench", "--model", "{tiny}", "--report", "/proc/report.json"],
                                ["--report /proc/report.json", "/proc"]),
    "budget-beyond-what-a-step-can-make": (["budget", "--model", "{tiny}", "--strategy", "fsdp",
                                            "--world-size", str(10 ** 11)],
                                           [f"--world-size {10 ** 11} with --bs 2 --seq 128",
                                            "at most 16,777,216"]),
    "budget-world-size-0": (["budget", "--model", "{tiny}", "--strategy", "ddp", "--world-size", "0"],
                            ["--world-size 0", "1 or more"]),
    "budget-report-under-proc": (["budget", "--model", "{tiny}", "--report", "/proc/report.json"],
                                 ["--report /proc/report.json", "/proc"]),
    "figures-only-nothing": (["figures", "--only", ""], ["--only ''", "unknown ''", "baseline"]),
    **{f"{command}-under-a-strategy": ([command, "--model", "{tiny}", *bs, "--strategy", "ddp"],
                                       ["--strategy ddp", f"{command} runs each",
                                        "drive.py budget --strategy ddp"])
       for command, bs in (("ablate", []), ("sweep", ["--bs", "1,2"]), ("bench", []))},
    "sweep-bad-listed-value": (["sweep", "--model", "{tiny}", "--ckpt", "bogus"], ["--ckpt", "'bogus'"]),
    "sweep-unknown-base-flag": (["sweep", "--model", "{tiny}", "--bs", "1", "--bogus"], ["--bogus"]),
    "sweep-unknown-target": (["sweep", "--model", "{tiny}", "--bs", "1", "--targets", "nosuch"],
                             ["--targets nosuch", "q_proj"]),
    "sweep-empty-listed-value": (["sweep", "--model", "{tiny}", "--bs", "1,,2"], ["--bs '1,,2'", "distinct"]),
    "sweep-repeated-value": (["sweep", "--model", "{tiny}", "--lora-r", "8,08"], ["--lora-r '8,08'", "distinct"]),
    "sweep-renamed-rank": (["sweep", "--model", "{tiny}", "--bs", "1,2", "--r", "8,16"], ["--r: renamed --lora-r"]),
    "sweep-rank-not-an-integer": (["sweep", "--model", "{tiny}", "--lora-r", "8,x"], ["--lora-r x", "integers"]),
    # the first point is good: it must not train before the second is refused
    "sweep-bad-second-point": (["sweep", "--model", "{tiny}", "--bs", "1,0"], ["--bs 0", "1 or more"]),
    "ablate-16-bit-weights-on-cpu": (["ablate", "--model", "{tiny}", "--device", "cpu", "--precision",
                                      "16-mixed", "--weights-dtype", "bf16"],
                                     ["--weights-dtype bf16", "--device cuda"]),
    "sweep-16-bit-weights-on-cpu": (["sweep", "--model", "{tiny}", "--bs", "1", "--device", "cpu",
                                     "--precision", "16-mixed", "--weights-dtype", "bf16"],
                                    ["--weights-dtype bf16", "--device cuda"]),
}
# (flags, what the help must mention): every command explains its own flags
HELPS = {
    "drive-sweep": (["sweep", "--help"], ["drive.py sweep", "--plot", "--bs"]),
    "drive-budget": (["budget", "--help"], ["drive.py budget", "--full", "--world-size N (default 1)"]),
    "drive-ablate": (["ablate", "--help"], ["drive.py ablate", "--report", "--markdown"]),
    "drive-bench": (["bench", "--help"], ["drive.py bench", "--steps", "--report"]),
}


def no_variant_runs(monkeypatch):
    """Make starting a variant's process, or training in this one, fail the test."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("a variant ran")
    monkeypatch.setattr(drive, "_run_reference", must_not_run)
    monkeypatch.setattr(ref_train, "train", must_not_run)


@pytest.mark.parametrize("case", FAILURES)
def test_a_failure_before_training_is_one_line_naming_the_value_with_exit_code_2(case, tiny_model,
                                                                                  monkeypatch, capsys):
    no_variant_runs(monkeypatch)
    values = {"tiny": tiny_model}
    done = run_main(drive.main, capsys, *(f.format(**values) for f in FAILURES[case][0]))
    line = one_error_line(done)
    for value in FAILURES[case][1]:
        assert value.format(**values) in line, (value, line)
    assert "step" not in done.stdout   # nothing trained, no variant ran


def test_ablate_checks_the_targets_once_before_any_variant_runs(tiny_model, monkeypatch, capsys):
    # One model built on the meta device, not a process per variant.
    no_variant_runs(monkeypatch)
    builds = []
    build = ref_train.build
    monkeypatch.setattr(ref_train, "build", lambda *a, **kw: builds.append(kw) or build(*a, **kw))
    done = run_main(drive.main, capsys, "ablate", "--model", tiny_model, "--targets", "foo")
    assert "--targets foo" in one_error_line(done)
    assert builds == [{"meta": True}]
    assert "peak" not in done.stdout, done.stdout


@pytest.mark.parametrize("case", HELPS)
def test_every_command_has_its_own_help(case, capsys):
    argv, mentioned = HELPS[case]
    out = help_text(drive.main, capsys, *argv)
    assert [flag for flag in mentioned if flag not in out] == []


# ---------------------------------------------------------------- the CUDA check

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: .ci/gpu measures here")
def test_gpu_script_on_a_machine_without_cuda_says_so_in_one_line_and_exits_0():
    import subprocess
    import sys
    # .ci/gpu asks the interpreter that runs the tests whether it sees CUDA
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".ci", "gpu")],
                          capture_output=True, text=True, timeout=HANG_SECONDS, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], done.stdout
    assert done.stderr == ""


def load_ci_gpu():
    """.ci/gpu.py as a module: a script in a folder that is no package."""
    spec = importlib.util.spec_from_file_location("ci_gpu", os.path.join(ROOT, ".ci", "gpu.py"))
    ci_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ci_gpu)
    return ci_gpu


class FinishedJob:
    """What .ci/gpu.py's sections read of a finished Job, without running one."""

    def __init__(self, status, tail=()):
        self.shown, self.status, self.ok = "python -c <the check>", status, status == "ok"
        self.name, self.seconds = self.shown, None
        self.stdout_tail = lambda n=40: list(tail)[-n:]

    def wait(self):
        return self


def test_gpu_scripts_compiled_check_is_a_table_with_its_two_targets_or_how_far_it_got(tmp_path):
    ci_gpu = load_ci_gpu()
    path = tmp_path / "compiled.json"
    path.write_text(json.dumps({"model": "an MLP", "pairs": 20, "unprobed_peak_bytes": 1000 * MiB,
                                "probed_peak_bytes": 1005 * MiB, "eager_peak_bytes": 1200 * MiB,
                                "tracked_peak_bytes": 1200 * MiB, "unprobed_s": 0.010, "probed_s": 0.0106}))
    md = "\n".join(ci_gpu.compiled_section(FinishedJob("ok"), str(path)))
    assert_markdown_tables(md)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith("| ")}
    peak = rows["allocator-only probe / unprobed: peak"]
    assert peak[1:4] == ["1005.0 MiB", "1000.0 MiB", "1.0050"] and peak[-1].startswith("yes"), peak
    step = rows["allocator-only probe / unprobed: median step (20 pairs in turn)"]
    assert step[1:4] == ["10.6 ms", "10.0 ms", "1.060"] and step[-1].startswith("NO"), step   # over 1.05
    failed = ci_gpu.compiled_section(FinishedJob("FAILED: exit 1: boom", ["Traceback", "boom"]), str(path))
    assert "FAILED: exit 1: boom" in failed[3] and "boom" in failed   # its last lines, no table
    assert not any(line.startswith("|") for line in failed)


# ---------------------------------------------------------------- the command line's help

HEAVY = ("torch", "transformers", "ref_train", "memcheck", "data", "ilora")
# Runs drive.main with argv, then prints which heavy modules were imported by then.
IMPORTED_AFTER_MAIN = f"""
import sys
import drive
try:
    drive.main(sys.argv[1:])
except SystemExit:
    pass
print([m for m in {HEAVY!r} if m in sys.modules])
"""


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in
                                                  ("budget", "ablate", "sweep", "bench", "families", "figures")]],
                         ids=" ".join)
def test_help_imports_nothing_heavy(argv):
    done = subprocess.run([sys.executable, "-c", IMPORTED_AFTER_MAIN, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


def test_figures_help_offers_only_its_own_flags_and_refuses_others_in_one_line(capsys):
    help_text = run_main(drive.main, capsys, "figures", "--help").stdout
    assert "--all" in help_text and "--only" in help_text
    assert "ref_train.py's" not in help_text and "--bs" not in help_text
    done = run_main(drive.main, capsys, "figures", "--bs", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["drive.py figures: error: unrecognized arguments: --bs 2"]


def test_gpu_script_runs_ddp_and_fsdp_under_torchrun_with_one_rank_and_the_rest_plainly(tmp_path, monkeypatch):
    ci_gpu = load_ci_gpu()
    launched = []

    class RecordedJob(FinishedJob):
        def __init__(self, name, argv, *args, **kwargs):
            super().__init__("ok")
            launched.append(argv)

    monkeypatch.setattr(ci_gpu, "Job", RecordedJob)
    ci_gpu.run_trainings({"runs": str(tmp_path), "logs": str(tmp_path)})
    under_torchrun = [argv for argv in launched if "torch.distributed.run" in argv]
    assert [argv[argv.index("--strategy") + 1] for argv in under_torchrun] == ["ddp", "fsdp"]
    for argv in under_torchrun:
        assert argv[argv.index("--nproc_per_node") + 1] == "1" and "cuda" in argv
    assert len(launched) == len(ci_gpu.RUNS) and all(
        argv[1] == "ref_train.py" for argv in launched if argv not in under_torchrun)


def ci_run_report(tracker_mib, budget_mib, allocator_mib=1000):
    """A run's report as ref_train.py writes it on CUDA, with only the fields .ci/gpu.py reads."""
    return {"status": "ok", "peak_bytes": int(allocator_mib * MiB), "peak_phase": "backward", "steps": [],
            "phases": {"backward": {"peak_bytes": int(allocator_mib * MiB), "untracked_bytes": 0,
                                    "tracked_peak_bytes": int(tracker_mib * MiB)}},
            "budget": {"peak_bytes": int(budget_mib * MiB)}}


# case -> (the first run's report, the compiled model's probed peak in MiB against 1000 unprobed,
# the lines .ci/gpu must end with). Every other run meets both: tracker 1% off, budget 5.3% off.
CI_TARGETS = {
    "all met": (ci_run_report(990, 950), 1005, []),
    "tracker": (ci_run_report(900, 1000), 1000,
                ["{run}: (tracker + untracked)/allocator 0.9000, target within 2%"]),
    "budget": (ci_run_report(1000, 500), 1000, ["{run}: budget error +100.0%, target within 10%"]),
    "compiled peak": (ci_run_report(1000, 1000), 1100,
                      ["torch.compile: allocator-only probe / unprobed peak 1.1000, target within 1%"]),
    "figures missing": ({"status": "ok"}, 1000, ["{run}: (tracker + untracked)/allocator -, target within 2%",
                                                 "{run}: budget error -, target within 10%"]),
}


@pytest.mark.parametrize("case", CI_TARGETS)
def test_gpu_script_exits_1_naming_each_missed_memory_target_and_still_writes_the_report(
        case, tmp_path, monkeypatch, capsys):
    ci_gpu = load_ci_gpu()
    first_report, probed_mib, expected = CI_TARGETS[case]
    # The compiled check's step is 5x slower probed in every case: a time target never fails it.
    compiled = {"model": "an MLP", "pairs": 20, "unprobed_peak_bytes": 1000 * MiB,
                "probed_peak_bytes": probed_mib * MiB, "eager_peak_bytes": 1000 * MiB,
                "tracked_peak_bytes": 1000 * MiB, "unprobed_s": 0.01, "probed_s": 0.05}

    def every_step_ok(files):
        with open(files["compiled"], "w") as f:
            json.dump(compiled, f)
        jobs = {name: FinishedJob("ok") for name in ("install", "pytest", "ablate", "families",
                                                     "snapshot", "bench", "compiled")}
        runs = [(name, flags, FinishedJob("ok"), first_report if i == 0 else ci_run_report(990, 950))
                for i, (name, flags) in enumerate(ci_gpu.RUNS)]
        return dict(jobs, check=None), runs

    monkeypatch.setattr(ci_gpu, "run_steps", every_step_ok)
    monkeypatch.setattr(ci_gpu, "describe_gpu", lambda: "a faked GPU, 1 MiB")
    monkeypatch.setattr(ci_gpu, "OUT", str(tmp_path))
    monkeypatch.setattr(ci_gpu, "BUNDLE", str(tmp_path / "ci-gpu-files.tar.gz"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # main's work dir, not the machine's /tmp
    assert ci_gpu.main() == (1 if expected else 0)
    out = capsys.readouterr().out.splitlines()
    missed = [line for line in out if line.startswith("ci/gpu: memory target missed: ")]
    run = "run " + ci_gpu.RUNS[0][0]
    assert missed == ["ci/gpu: memory target missed: " + line.format(run=run) for line in expected]
    assert out[len(out) - len(missed):] == missed   # at the end
    md = (tmp_path / "gpu.md").read_text()
    assert "## Runs" in md and "## torch.compile" in md and (tmp_path / "ci-gpu-files.tar.gz").exists()
