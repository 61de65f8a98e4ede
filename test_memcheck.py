"""The report's promises: a failed write keeps the previous report, a diff says what one side never
measured, and storages made before the probe started are never counted as new."""
import json

import pytest
import torch
from torch import nn

import memcheck
import ref_train

# ---------------------------------------------------------------- writing a report

OLD_REPORT = {"schema": memcheck.SCHEMA, "peak_bytes": 1234, "status": "ok"}
NEW_REPORT = {"schema": memcheck.SCHEMA, "peak_bytes": 5678, "status": "ok", "steps": list(range(500))}


def write_failing_part_way(path, monkeypatch):
    """write_report(path, NEW_REPORT) with the disk filling up after its first 100 characters."""
    def dump_part_way(obj, f, **kwargs):
        f.write(json.dumps(obj, **kwargs)[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memcheck.json, "dump", dump_part_way)
    with pytest.raises(OSError, match="No space left"):
        memcheck.write_report(path, NEW_REPORT)
    monkeypatch.undo()


def test_a_write_that_fails_part_way_leaves_the_previous_report_byte_for_byte(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    memcheck.write_report(path, OLD_REPORT)
    before = path.read_bytes()
    write_failing_part_way(path, monkeypatch)
    assert path.read_bytes() == before
    assert json.loads(before) == OLD_REPORT


def test_a_write_that_fails_part_way_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    memcheck.write_report(path, OLD_REPORT)
    write_failing_part_way(path, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# ---------------------------------------------------------------- diff against a run that stopped loading

@pytest.fixture(scope="module")
def stopped_and_full(tiny_model, tmp_path_factory):
    """Paths of two reports: one run out of memory while loading (nothing of training measured),
    and a full run of the same model."""
    tmp = tmp_path_factory.mktemp("stopped")
    stopped, full = tmp / "stopped.json", tmp / "full.json"
    flags = ["--model", tiny_model, "--device", "cpu", "--steps", "2"]
    with pytest.raises(torch.OutOfMemoryError):   # a limit the model's own weights pass
        ref_train.train(ref_train.parse_args([*flags, "--max-memory", "0.1", "--report", str(stopped)]),
                        log=lambda *a: None)
    ref_train.train(ref_train.parse_args([*flags, "--report", str(full)]), log=lambda *a: None)
    report = memcheck.read_report(stopped)
    assert report["categories"] == {} and report["steps"] == [] and list(report["phases"]) == ["load"]
    return str(stopped), str(full)


NOT_MEASURED = {"text": "not measured", "markdown": "not measured", "json": None}


def diff_rows(paths, output, capsys):
    """{row: (A's cell, B's cell)} of `memcheck.py diff A B` in one output format; a JSON row's
    cells are its bytes. Sub-rows and notes inside the table (no B cell) are left out."""
    flag = {"text": [], "markdown": ["--markdown"], "json": ["--json"]}[output]
    assert memcheck.main(["diff", *paths, *flag]) == 0
    out = capsys.readouterr().out
    if output == "json":
        return {r["row"]: (r["a_bytes"], r["b_bytes"]) for r in json.loads(out)["rows"]}
    if output == "markdown":
        lines = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    else:
        lines = [[cell for cell in line.split("  ") if cell] for line in out.split("\n\n")[1].splitlines()]
    cells = [[c.strip() for c in line] for line in lines[1:]]   # the header aside
    return {c[0]: (c[1], c[2]) for c in cells if len(c) >= 3 and c[2]}


@pytest.mark.parametrize("output", list(NOT_MEASURED))
def test_diff_against_a_run_stopped_while_loading_marks_its_phases_and_categories_not_measured(
        stopped_and_full, capsys, output):
    rows = diff_rows(stopped_and_full, output, capsys)
    never = [r for r in rows if r in ("forward peak", "backward peak", "optimizer peak")
             or r.startswith("at peak: ")]
    assert len(never) >= 3 + 4, rows
    for row in never:
        assert rows[row][0] == NOT_MEASURED[output], (row, rows[row])
    assert rows["load peak"][0] not in (None, "not measured", 0, "0.0")   # loading was measured


@pytest.mark.parametrize("output", list(NOT_MEASURED))
def test_diff_against_a_run_stopped_while_loading_marks_every_figure_it_never_measured(
        stopped_and_full, capsys, output):
    rows = diff_rows(stopped_and_full, output, capsys)
    wrong = {row: cells for row, cells in rows.items()
             if row != "load peak" and cells[0] != NOT_MEASURED[output]}
    assert not wrong


# ---------------------------------------------------------------- adoption

def test_storages_made_before_the_probe_started_are_never_counted_as_new():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [torch.randn(8, 16) for _ in range(4)]     # preloaded, each step a new one
    cached = torch.randn(8, 32)                          # one tensor reused by every step
    model(batches[0]).sum().backward()                   # the optimizer's state exists before attach
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    with memcheck.Probe(model, optimizer) as probe:
        for x in batches:
            with probe.phase("forward"):
                cached.mul_(1.0)                             # in place: still the same storage
                hidden = model[1](model[0](x)) * cached      # autograd saves x and the cached tensor
                loss = model[2](hidden).pow(2).mean()
            with probe.phase("backward"):
                loss.backward()
            with probe.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            probe.step(loss)
    live = probe.tracker.live
    record = lambda t: live.get(t.untyped_storage().data_ptr())
    assert all(record(t) is None for t in [*batches, cached])   # never tracked, never counted
    # The optimizer's state is counted, as what it is and from before the first step: not as new.
    assert all(record(t).category == "optimizer_state" and record(t).phase is None for t in state)
    report = probe.report()
    assert report["categories"]["optimizer_state"] == sum(t.untyped_storage().nbytes() for t in state)
    ends = report["leak"]["step_end_bytes"]
    assert len(ends) == 4 and len(set(ends)) == 1 and not report["leak"]["detected"]
    assert report["warnings"] == []


# ---------------------------------------------------------------- verdicts and the diff's cells

def synthetic(ratio, warnings=(), leak_per_step=0.0):
    """A report whose peak is `ratio` times its 100 MiB budget, the excess in activations."""
    cats = dict.fromkeys(memcheck.CATEGORIES, 0)
    peak = int(ratio * 100 * memcheck.MiB)
    return {"peak_bytes": peak, "peak_phase": "backward", "oom": None, "warnings": list(warnings),
            "categories": dict(cats, activations=peak), "phases": {}, "config": {}, "env": {},
            "steps": [{}, {}], "budget": {"peak_bytes": 100 * memcheck.MiB,
                                          "categories": dict(cats, activations=100 * memcheck.MiB)},
            "leak": {"detected": False, "bytes_per_step": leak_per_step, "step_end_bytes": [0, 0]}}


@pytest.mark.parametrize("ratio, expected", [
    (1.02, "measured peak 1.02x the budget: as expected"),
    (1.06, "measured peak 1.06x the budget, within 10%: the excess is in activations (+6.0 MiB) "
           "during backward"),
    (1.5, "measured peak 1.5x the budget: the excess is in activations (+50.0 MiB) during backward"),
    (0.95, "measured peak 0.95x the budget: below it, within 10%")])
def test_as_expected_means_within_three_percent_and_three_to_ten_names_the_excess(ratio, expected):
    assert memcheck.verdict(synthetic(ratio)) == expected


def test_a_warning_of_three_percent_of_the_peak_is_named_beside_a_peak_on_budget():
    kept = {"kind": "output_kept", "bytes": 4 * memcheck.MiB, "message": "..."}
    small = {"kind": "graph_kept", "bytes": memcheck.MiB, "message": "..."}
    assert memcheck.verdict(synthetic(1.0, [kept, small])) == (
        "measured peak 1.00x the budget: WARNING output_kept 4.0 MiB")


def test_a_negative_leak_prints_as_none():
    a, b = synthetic(1.0), synthetic(1.0, leak_per_step=-3072.0)
    row = next(line for line in memcheck.format_diff(a, b).splitlines() if line.startswith("leak per step"))
    assert row.split()[4:7] == ["0", "none", "+0"], row


def test_an_evaluation_forward_before_training_does_not_set_the_batch_shape():
    from conftest import TINY_OPT
    from transformers import OPTConfig, OPTForCausalLM
    model = OPTForCausalLM(OPTConfig(vocab_size=100, **TINY_OPT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with memcheck.Probe(model, optimizer) as probe:
        with probe.phase("eval"):
            model(input_ids=torch.zeros(8, 64, dtype=torch.long))
        with probe.phase("forward"):
            ids = torch.zeros(2, 16, dtype=torch.long)
            loss = model(input_ids=ids, labels=ids).loss
        with probe.phase("backward"):
            loss.backward()
        probe.step(loss)
    assert (probe.report()["config"]["bs"], probe.report()["config"]["seq"]) == (2, 16)
