"""The instrument, memcheck.py: the tracker, categories and modules, leaks, the probe in a user's
loop, its warnings, the callbacks in real trainers (Lightning, the HF Trainer), the verdict, the
report and diff.

The tiny OPT of conftest.py, or a PEFT stack built on the same configuration, runs in this
process; a process of its own only where the process is the point (a closed pipe, an interpreter
without torch, memcheck.py copied alone beside a user's code).
"""
import contextlib
import copy
import gc
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import sys
import warnings

import pytest
import torch
from torch import nn

import budget
import ilora
import memcheck
import ref_train
from conftest import (HANG_SECONDS, OptimizersAsOne, TINY_OPT, assert_markdown_tables, help_text,
                      hf_train, lightning_fit, one_error_line, peft_opt, phased_loop, run_main, token_batches,
                      user_loop)
from memcheck import MiB


# ---------------------------------------------------------------- the tracker

def test_cpu_tracker_is_exact_on_known_allocations():
    with memcheck.Tracker("cpu") as tracker:
        start = tracker.live_bytes
        x = torch.empty(1000, dtype=torch.float32)
        assert tracker.live_bytes - start == 4000
        views = (x.view(10, 100), x[10:], x.t())
        assert tracker.live_bytes - start == 4000  # views share the storage: nothing new
        y = torch.empty(250, dtype=torch.float64)
        assert tracker.live_bytes - start == 6000
        torch.empty(1000, device="meta")  # another device: not counted, and nothing to free
        del x
        assert tracker.live_bytes - start == 6000  # the views still hold x's storage
        del views
        assert tracker.live_bytes - start == 2000
        del y
        assert tracker.live_bytes - start == 0
        assert tracker.peak_bytes - start == 6000


def test_tracker_counts_every_output_of_a_tuple_and_names_records_when_asked():
    x = torch.randn(1000)
    with memcheck.Tracker("cpu") as tracker:
        start = tracker.live_bytes
        values, indices = torch.sort(x)         # a tuple of two new storages
        assert tracker.live_bytes - start == 1000 * 4 + 1000 * 8
        views = (values.view(10, 100), values[1:], indices[:5])
        values.add_(1)                          # in place: nothing new
        assert tracker.live_bytes - start == 1000 * 4 + 1000 * 8
        records = [r for r in tracker.window if r.created > 0 and r.nbytes in (4000, 8000)]
        assert {(r.op, r.shape, r.dtype) for r in records} == {("sort", (1000,), "float32"),
                                                               ("sort", (1000,), "int64")}
        del values, indices, views
        assert tracker.live_bytes == start
    assert all(r.freed is not None for r in records)


def test_the_tracker_allows_live_bytes_up_to_its_limit_and_fails_one_byte_past_it():
    with memcheck.Tracker("cpu", limit_bytes=4000) as tracker:
        x = torch.empty(1000)                       # exactly the limit: not over it
        assert tracker.live_bytes == 4000
        with pytest.raises(torch.OutOfMemoryError, match="over the --max-memory / max_memory_mib limit"):
            torch.empty(1, dtype=torch.uint8)
        assert tracker.live_bytes == 4000
    del x


def test_an_allocation_under_a_tenth_of_a_mib_that_fails_is_said_in_bytes():
    # not "allocating 0.0 MiB"
    with memcheck.Tracker("cpu", limit_bytes=4000):
        with pytest.raises(torch.OutOfMemoryError, match=r"allocating 16,384 bytes \(\[64, 64\] float32"):
            torch.empty(64, 64)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_sigterm_or_a_hangup_ends_a_probed_loop_as_ctrl_c_does_with_the_report_written(
        tmp_path, signum, default_stop_signals):
    # a scheduler's stop, `timeout`, a closed SSH session: the process died there, with no report
    model, optimizer = peft_opt()
    path = tmp_path / "stack.json"
    with pytest.raises(KeyboardInterrupt):
        with memcheck.Probe(model, optimizer, path=path, log=lambda *a: None) as probe:
            for step, ids in enumerate(token_batches(3, bs=1, seq=16)):
                with probe.phase("forward"):
                    loss = model(input_ids=ids, labels=ids).loss
                if step == 1:
                    os.kill(os.getpid(), signum)
                with probe.phase("backward"):
                    loss.backward()
                probe.step(loss)
    report = memcheck.read_report(path)
    assert report["status"] == "interrupted" and report["error"] == f"terminated ({signum.name})"
    assert len(report["steps"]) == 1 and report["phases"]["backward"]["peak_bytes"] > 0
    assert signal.getsignal(signum) == signal.SIG_DFL   # put back


def test_a_stop_handler_the_loop_sets_while_probed_is_left_in_place(default_stop_signals):
    def users_own(signum, frame):
        pass
    with memcheck.Probe(nn.Linear(2, 2), log=lambda *a: None):
        signal.signal(signal.SIGTERM, users_own)
    assert signal.getsignal(signal.SIGTERM) is users_own
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_a_stop_by_signal_crosses_processes_as_the_signal_it_was():
    stop = pickle.loads(pickle.dumps(memcheck.Terminated(signal.SIGHUP)))   # (spawned workers pickle it)
    assert stop.signum == signal.SIGHUP and str(stop) == "SIGHUP"


def test_the_peak_is_the_first_moment_live_bytes_reach_it():
    # Two temporaries of the same size, one after the other: what was alive at the peak is the first.
    with memcheck.Tracker("cpu") as tracker:
        first = torch.zeros(1000)
        del first
        second = torch.ones(1000)
        _, _, temporaries = tracker.at(tracker.peak_event)
    assert tracker.peak_bytes == 4000 and [t["op"] for t in temporaries] == ["zeros"]
    del second


def test_a_storage_with_two_roles_is_counted_in_the_higher_one():
    # Parameters, then gradients and optimizer state, over what a step saves, over temporaries:
    # a gradient a loop's forward uses (and autograd saves) is still a gradient.
    order = ["trainable_params", "frozen_params", "gradients", "optimizer_state", "activations",
             "temporaries"]
    with memcheck.Tracker("cpu") as tracker:
        for higher, lower in itertools.combinations(order, 2):
            t = torch.empty(10)
            for first, then in ((lower, higher), (higher, lower)):
                tracker.tag([t], first, adopt=True)
                tracker.tag([t], then)
                assert tracker.track(t, "x").category == higher, (first, then)
                tracker.track(t, "x").category = "temporaries"


def test_the_temporaries_at_the_peak_are_the_largest_largest_first():
    with memcheck.Tracker("cpu") as tracker:
        alive = [torch.empty(n) for n in (10, 1000, 100, 1, 10000, 50, 5)]
        _, _, temporaries = tracker.at(tracker.peak_event)
    assert [t["bytes"] for t in temporaries] == [40000, 4000, 400, 200, 40]
    del alive


def test_cpu_tracker_matches_the_profiler_on_a_training_step(tiny_model):
    from torch.profiler import ProfilerActivity, profile

    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--ckpt", "none",
                                 "--bs", "4", "--seq", "128"])
    model, items, batches, _ = ref_train.build(args)
    trainable = [p for m in (model, items) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batch = next(batches)
    tracker = memcheck.Tracker("cpu")
    # Garbage of earlier tests freed during the step would count as negative in the profiler
    # (allocated before it started) and not at all in the tracker: collect it first, then hold gc.
    gc.collect()
    gc.disable()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, tracker:
        # What exists before the step is adopted, so that its frees are not counted as negative.
        tracker.tag([*model.parameters(), *model.buffers(), *items.parameters(), *items.buffers(),
                     *batch.values()], "frozen_params")
        start = tracker.live_bytes
        gate = items.gate(batch["history"], batch["history_len"])
        with ilora.use_gate(gate):
            loss = ref_train.forward_loss(model, items, batch, args)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, gate
        tracked_peak, tracked_end = tracker.peak_bytes - start, tracker.live_bytes - start
    gc.enable()

    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if events and hasattr(events[0], "device_type"):
        assert {str(e.device_type()) for e in events} == {"DeviceType.CPU"}
    assert len(events) > 100  # a real step, not an empty trace
    running = list(itertools.accumulate(e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())))
    profiled_peak, profiled_end = max(running), running[-1]

    assert tracked_peak > 1_000_000  # activations of bs 4 x seq 128: megabytes, not bookkeeping
    assert abs(tracked_peak - profiled_peak) <= 0.01 * profiled_peak, (tracked_peak, profiled_peak)
    # What the step leaves (AdamW's state) agrees as well.
    assert abs(tracked_end - profiled_end) <= 0.01 * profiled_end, (tracked_end, profiled_end)


def test_torch_compile_runs_under_the_tracker_without_tracing_it():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    linear = nn.Linear(8, 8)
    compiled = torch.compile(lambda x: torch.relu(linear(x)).sum(), backend="eager")
    x = torch.randn(4, 8)
    with memcheck.Tracker("cpu") as tracker:
        start = tracker.live_bytes
        compiled(x).backward()
        assert tracker.peak_bytes > start
    # dynamo skips frames under a dispatch mode; the tracker's own code is marked to be skipped too
    assert not torch._dynamo.utils.counters["frames"], dict(torch._dynamo.utils.counters)
    assert torch._dynamo.utils.counters["unimplemented"] == {}


# ---------------------------------------------------------------- categories and modules

def probe_loop(steps=3, width=32, in_forward=lambda: None, batch_sizes=None, load=None, **probe_kwargs):
    """A hand-written loop measured by a Probe; load(), if given, runs in a load phase first,
    in_forward() inside every forward phase. A batch that runs out of memory in forward is skipped,
    as a loop that shrinks its batch would."""
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    probe = memcheck.Probe(model, optimizer, **probe_kwargs)
    with probe:
        if load:
            with probe.phase("load"):
                load()
        for bs in batch_sizes or [64] * steps:
            try:
                with probe.phase("forward"):
                    loss = model(torch.randn(bs, width)).square().mean()
                    in_forward()
            except torch.OutOfMemoryError:
                continue
            with probe.phase("backward"):
                loss.backward()
            with probe.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad()
            probe.step(loss)
    return probe


def test_categories_add_up_to_the_peak_in_every_phase(train_tiny):
    report = train_tiny("--steps", 2)
    assert sum(report["categories"].values()) == report["peak_bytes"]
    for name, phase in report["phases"].items():
        assert sum(phase["categories"].values()) == phase["peak_bytes"], name
    # Each kind of memory is where it should be, not lumped into one bucket.
    backward = report["phases"]["backward"]["categories"]
    assert backward["frozen_params"] > 0 and backward["activations"] > 0
    assert report["phases"]["optimizer"]["categories"]["gradients"] > 0
    assert report["phases"]["optimizer"]["categories"]["optimizer_state"] > 0


def test_a_temporary_of_known_size_is_in_the_temporaries_at_the_peak():
    # The categories omitting temporaries, caught by a second test: a loop whose forward makes a
    # 4,000,000-byte tensor that nothing saves; at the forward peak it is a temporary, and the
    # categories still add up to the peak.
    made = []
    probe = probe_loop(steps=2, in_forward=lambda: made.append(torch.empty(1_000_000)) or made.clear())
    forward = probe.report()["phases"]["forward"]
    assert forward["categories"]["temporaries"] >= 4_000_000
    assert forward["categories"]["activations"] > 0
    assert sum(forward["categories"].values()) == forward["peak_bytes"]
    report = probe.report()
    assert set(report["categories"]) == set(memcheck.CATEGORIES)
    assert sum(report["categories"].values()) == report["peak_bytes"]


def test_what_forward_leaves_alive_for_backward_is_counted_as_activations():
    # Not saved by autograd, yet alive when forward ends: the forward's output and the loss (a
    # mistake would leave them among the temporaries).
    layer, x = nn.Linear(256, 1024), torch.randn(64, 256)   # x made before the probe: not counted
    with memcheck.Probe(layer, torch.optim.SGD(layer.parameters(), lr=0.1)) as probe:
        with probe.phase("forward"):
            out = layer(x)       # 64 x 1024 fp32; addmm saves x and the weight, not its output
            loss = out.sum()     # sum saves no tensor
        with probe.phase("backward"):
            loss.backward()
        probe.step(loss)
    forward = probe.phases["forward"]["categories"]
    assert forward["activations"] == 64 * 1024 * 4 + 4 and forward["temporaries"] == 0


def test_saved_activations_are_attributed_to_modules(train_tiny):
    report = train_tiny("--ckpt", "none", "--steps", 1)
    modules = [m["module"] for m in report["modules"]]
    assert any(".layers." in m for m in modules), modules
    assert [m["bytes"] for m in report["modules"]] == sorted((m["bytes"] for m in report["modules"]),
                                                             reverse=True)


def test_saved_activations_by_module_have_the_sizes_of_what_autograd_keeps(train_tiny):
    # The module attribution, with amounts: without checkpointing at bs 2 x seq 128, the log-softmax
    # of bs x (seq - 1) x vocab fp32 logits is kept outside any module, each layer keeps its MLP
    # activation (bs x seq x ffn fp32) in activation_fn and k (bs x seq x hidden) in k_proj.
    bs, seq, vocab = 2, 128, 560
    report = train_tiny("--ckpt", "none", "--bs", bs, "--seq", seq, "--steps", 1)
    by_module = {m["module"]: m for m in report["modules"]}
    assert by_module["(op _log_softmax, outside any module)"]["bytes"] == bs * (seq - 1) * vocab * 4
    for layer in range(TINY_OPT["num_hidden_layers"]):
        prefix = f"model.decoder.layers.{layer}"
        assert by_module[f"{prefix}.activation_fn"]["bytes"] == bs * seq * TINY_OPT["ffn_dim"] * 4
        assert by_module[f"{prefix}.self_attn.k_proj"]["bytes"] == bs * seq * TINY_OPT["hidden_size"] * 4


def mlp_and_adamw(width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    return model, torch.optim.AdamW(model.parameters())


@pytest.mark.parametrize("warm_up", [0, 1], ids=["fresh", "stepped before the probe"])
@pytest.mark.parametrize("optimizers", [1, 2])
def test_a_probe_given_no_optimizer_counts_the_state_of_those_that_step_its_model(optimizers, warm_up):
    # without them, AdamW's state was temporaries and what it stepped beside the model was not counted
    reports = {}
    for given in (True, False):
        model, _ = mlp_and_adamw(64)
        projector = nn.Linear(16, 64)   # made before the probe, trained beside the model
        stepped = [*model[2].parameters(), *projector.parameters()]
        parts = ([torch.optim.AdamW([*model[0].parameters(), *stepped])] if optimizers == 1 else
                 [torch.optim.AdamW(model[0].parameters()), torch.optim.AdamW(stepped)])
        unrelated = torch.optim.SGD(nn.Linear(4, 4).parameters(), momentum=0.9)

        def loss_of(batch):
            unrelated.step()   # (steps nothing of the model: not the loop's)
            return model(projector(batch)).square().mean()
        for _ in range(warm_up):   # (its state, made before the probe, was not counted)
            loss_of(torch.randn(8, 16)).backward()
            OptimizersAsOne(parts).step()
            OptimizersAsOne(parts).zero_grad()
        with memcheck.Probe(model, parts if given else None) as probe:
            phased_loop(probe, OptimizersAsOne(parts), [torch.randn(8, 16) for _ in range(3)], loss_of)
        reports[given] = probe.report()
    trained = [p for optimizer in parts for group in optimizer.param_groups for p in group["params"]]
    moments = sum(2 * p.numel() * 4 for p in trained)   # exp_avg, exp_avg_sq
    counts = 4 * len(trained) * warm_up   # (AdamW's steps, made by torch.tensor(): seen if made before)
    assert reports[False]["phases"]["optimizer"]["categories"]["optimizer_state"] == moments + counts
    for key in ("peak_bytes", "phases", "categories", "params"):
        assert reports[False][key] == reports[True][key], key
    assert reports[False]["config"]["optimizer"] == reports[True]["config"]["optimizer"] == "AdamW"
    assert reports[False]["params"] == {"trainable": sum(p.numel() for p in trained), "frozen": 0}


def test_gradients_freed_inside_a_step_without_phases_are_still_gradients_at_its_peak():
    # A hand-written callback that calls only probe.step(), after zero_grad(set_to_none=True).
    model, optimizer = mlp_and_adamw(256)
    with memcheck.Probe(model, optimizer) as probe:
        for _ in range(2):
            model(torch.randn(64, 256)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            probe.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert probe.report()["categories"]["gradients"] == weights   # AdamW's first step holds them all


# ---------------------------------------------------------------- leaks

def test_injected_leak_is_flagged_with_the_gate_bytes_per_step(train_tiny):
    leaky = train_tiny("--inject-leak", "--steps", 4, "--bs", 2, "--experts", 4)
    leak = leaky["leak"]
    assert leak["detected"]
    # Each step keeps its gate: bs x experts fp32 values, and nothing else of its graph.
    assert leak["bytes_per_step"] == 2 * 4 * 4
    assert leak["survivors"] and all(s["shape"] == [2, 4] and s["dtype"] == "float32"
                                     for s in leak["survivors"])
    assert {s["step"] for s in leak["survivors"]} == {1, 2, 3}

    # backward freed what the gate's graph saved: the gate alone is kept, and only the leak is named
    assert [w["kind"] for w in leaky["warnings"]] == ["leak"]
    clean = train_tiny("--steps", 4, "--bs", 2, "--experts", 4)
    assert clean["warnings"] == []
    clean = clean["leak"]
    assert not clean["detected"] and clean["bytes_per_step"] == 0 and clean["survivors"] == []


def test_a_leak_that_grows_every_step_is_found_in_a_hand_written_loop():
    kept = []
    probe = probe_loop(steps=4, in_forward=lambda: kept.append(torch.randn(1000)))  # 4000 B a step
    leak = probe.report()["leak"]
    assert leak["detected"] and leak["bytes_per_step"] == 4000
    assert leak["survivors"][0]["bytes"] == 4000 and leak["survivors"][0]["op"] == "randn"


@pytest.mark.parametrize("steps", [2, 3])
def test_a_leak_is_found_from_three_steps_and_two_are_said_not_to_measure_one(steps):
    kept = []
    report = probe_loop(steps=steps, in_forward=lambda: kept.append(torch.randn(1000))).report()
    assert report["leak"]["detected"] == (steps == 3)
    said = "leak: not measured (it takes three finished steps or more)"
    assert (said in memcheck.format_report(report).splitlines()) == (steps == 2)


@pytest.mark.parametrize("kept_steps, leaks", [(2, False), (3, True)])
def test_with_batches_that_grow_only_what_three_steps_kept_is_a_leak(kept_steps, leaks):
    # sorted by length: a step's batch and the next one read ahead grow with them; a running loss
    # made in step 1 beside them survives from two steps, a list that keeps one a step from three
    steps = [{"live_bytes": 1000 * n, "tokens": 64 * n} for n in range(1, 5)]
    leak = memcheck.find_leak(steps, ["a survivor"], kept_steps)
    assert (leak["detected"], leak["batches_grew"]) == (leaks, not leaks)
    assert leak["survivors"] == (["a survivor"] if leaks else [])


@pytest.mark.parametrize("kept", ["losses-without-phases", "made-between-phases", "gradients",
                                  "outputs-concatenated", "batches"])
def test_a_leak_is_found_in_three_steps_whatever_holds_it(kept):
    # one tensor that grows, gradients, tensors made outside phases or in a loop without them: a
    # loop's batch is no leak, a list of them is
    model, held = nn.Linear(32, 32), []
    optimizer = torch.optim.AdamW(model.parameters())
    probe = memcheck.Probe(model, optimizer)
    phase = (lambda name: contextlib.nullcontext()) if kept == "losses-without-phases" else probe.phase
    with probe:
        for _ in range(3):
            batch = torch.randn(8, 32)
            with phase("forward"):
                output = model(batch)
                loss = output.square().mean()
            with phase("backward"):
                loss.backward()
            held += {"gradients": [model.weight.grad], "batches": [batch]}.get(kept, [])
            with phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            held += {"losses-without-phases": [loss],
                     "made-between-phases": [output.detach() * 2]}.get(kept, [])
            if kept == "outputs-concatenated":
                held = [torch.cat([*held, output.detach()])]
            probe.step()
    assert probe.report()["leak"]["detected"], probe.report()["leak"]


@pytest.mark.parametrize("loss, value", [(2, 2.0), (torch.tensor(1.5, requires_grad=True) * 1, 1.5),
                                         ([1.5], 1.5), ("1.5", None), (torch.ones(2), None)])
def test_a_steps_loss_is_any_one_number_and_anything_else_none(loss, value):
    with memcheck.Probe() as probe, warnings.catch_warnings():
        warnings.simplefilter("error")   # (float() of a tensor that requires grad warns)
        assert probe.step(loss)["loss"] == value


def test_a_peak_between_phases_is_a_phase_of_its_own():
    # (a callback's work between the optimizer's step and the next forward, say)
    assert "between phases" not in probe_loop(steps=2).report()["phases"]
    model = nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    with memcheck.Probe(model, optimizer) as probe:
        for step in range(2):
            if step:
                with probe.phase("load"):   # (loading keeps its own entry, wherever it comes)
                    torch.ones(4 * MiB, dtype=torch.uint8).sum()
            with probe.phase("forward"):
                loss = model(torch.randn(4, 8)).sum()
            with probe.phase("backward"):
                loss.backward()
            torch.ones(MiB, dtype=torch.uint8).sum()   # made and freed between phases
            with probe.phase("optimizer"):
                optimizer.step()
            probe.step()
    report = probe.report()
    assert report["peak_phase"] == "between phases" and MiB < report["peak_bytes"] < 2 * MiB, report["phases"]


def test_a_leaks_survivors_are_recorded_while_it_grows_not_when_the_report_is_written():
    model, optimizer = peft_opt()
    batches = token_batches(4)
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, batches, "outputs_in_a_list")
    leak = probe.report()["leak"]   # the list was cleared after the last step
    assert leak["detected"] and leak["bytes_per_step"] == 4  # one fp32 loss a step
    assert len(leak["survivors"]) == 3 and {s["step"] for s in leak["survivors"]} == {1, 2, 3}
    assert all(s["shape"] == [] and s["dtype"] == "float32" for s in leak["survivors"])


def test_a_leaks_weight_is_what_it_holds_by_the_last_step():
    kept = []
    probe = probe_loop(steps=6, in_forward=lambda: kept.append(torch.ones(MiB // 4)))
    leak = next(w for w in probe.report()["warnings"] if w["kind"] == "leak")
    assert (leak["bytes_per_step"], leak["bytes"]) == (MiB, 5 * MiB)   # grown over 5 steps after the first


# ---------------------------------------------------------------- the probe in a user's loop

class Unprobed:
    """The same loop measured by the tracker alone: no saved-tensor hooks, no module hooks."""

    def __init__(self, model):
        self.tracker, self.model, self.ends = memcheck.Tracker("cpu"), model, []

    def __enter__(self):
        self.tracker.__enter__()
        self.tracker.tag(list(self.model.parameters()), "frozen_params", adopt=True)
        return self

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)

    def phase(self, name):
        return contextlib.nullcontext()

    def step(self):
        self.ends.append(self.tracker.live_bytes)


@pytest.mark.parametrize("pattern", ["clean", "retain_graph", "eval_without_no_grad"])
def test_the_probe_does_not_change_what_it_measures(pattern):
    batches = token_batches(4)
    model, optimizer = peft_opt()
    with Unprobed(model) as unprobed:
        user_loop(unprobed, model, optimizer, batches, pattern)
    model, optimizer = peft_opt()
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, batches, pattern)
    ends = [s["live_bytes"] for s in probe.steps]
    assert len(ends) == 4 and ends == unprobed.ends   # to the byte: the tracker is exact
    assert probe.peak["peak_bytes"] == unprobed.tracker.peak_bytes
    assert unprobed.ends[-1] == unprobed.ends[1]   # the loop itself does not grow ...
    assert not probe.report()["leak"]["detected"]  # ... and the probe does not say it does


def test_a_phase_inside_a_phase_is_refused_in_one_line_and_the_report_still_written(tmp_path):
    # an inner phase ended the outer one where it began: forward read 0.7 MiB against 2.6 budgeted
    model, optimizer = peft_opt()
    path = tmp_path / "stack.json"
    with pytest.raises(memcheck.ReportError, match="phase 'loss' inside phase 'forward': phases do not nest"):
        with memcheck.Probe(model, optimizer, path=path, log=lambda *a: None) as probe:
            with probe.phase("forward"), probe.phase("loss"):
                model(input_ids=token_batches(1)[0])
    assert memcheck.read_report(path)["status"] == "error"


def test_a_probe_inside_a_probe_is_refused_and_probes_one_after_another_measure_alike(tmp_path):
    # the outer probe's tracker saw nothing of the inner's loop: "peak: not measured", and no word
    model, optimizer = peft_opt()
    with memcheck.Probe(model, optimizer, path=tmp_path / "outer.json", log=lambda *a: None):
        with pytest.raises(memcheck.ReportError, match="outer.json\\): measure with one at a time"):
            with memcheck.Probe(model, optimizer):
                pass
    peaks = []
    for _ in range(2):
        with memcheck.Probe(model, optimizer) as probe:
            user_loop(probe, model, optimizer, token_batches(2))
        peaks.append(probe.report()["peak_bytes"])
    assert peaks[1] == pytest.approx(peaks[0], abs=64)   # (AdamW's step counts: made in the first)


def test_a_phase_or_a_step_outside_the_probes_scope_is_refused_in_one_line(tmp_path):
    # never entered, its report read: every phase at 0.0 MiB and "leak: none"; after its scope: stale
    model, optimizer = mlp_and_adamw(32)
    probe = memcheck.Probe(model, optimizer, path=tmp_path / "stack.json", log=lambda *a: None)
    for call, outside in [("probe.phase('forward')", lambda: probe.phase("forward").__enter__()),
                          ("probe.begin('forward')", lambda: probe.begin("forward")),
                          ("probe.step()", probe.step)]:
        with pytest.raises(memcheck.ReportError, match=re.escape(f"{call} outside the probe's scope: ")):
            outside()
    with probe:
        with probe.phase("forward"):
            model(torch.randn(4, 32)).sum().backward()
        probe.step()
    closed = r"outside the probe's scope \(closed, its report written to .*stack.json\): nothing"
    with pytest.raises(memcheck.ReportError, match=closed):
        with probe.phase("eval"):
            pass
    assert list(probe.report()["phases"]) == ["forward"] and len(probe.steps) == 1
    probe.close(RuntimeError("a later run's"))   # (Lightning's on_exception after fit() ended)
    assert probe.report()["status"] == "ok"
    with probe:   # (entered again, it measures on)
        with probe.phase("forward"):
            model(torch.randn(4, 32)).sum().backward()
        probe.step()
    assert len(probe.steps) == 2


def test_a_phases_figures_are_its_largest_steps_not_its_last():
    large_first, large_only = (probe_loop(batch_sizes=sizes).report() for sizes in ([512, 16], [512]))
    for phase in ("forward", "backward"):
        figures = [{k: v for k, v in report["phases"][phase].items() if k != "live_bytes"}  # (the last step's)
                   for report in (large_first, large_only)]
        assert figures[0] == figures[1], phase


def test_the_first_steps_peak_is_trainings_not_the_loads():
    report = probe_loop(steps=2, load=lambda: torch.ones(4 * MiB).sum()).report()   # 16 MiB
    assert report["phases"]["load"]["peak_bytes"] >= 16 * MiB
    assert report["steps"][0]["peak_bytes"] < 16 * MiB


def test_a_step_with_only_a_load_phase_peaks_at_what_it_leaves_alive():
    # Loading is no part of training's peak: such a step's peak is its live bytes, never 0.
    layer = nn.Linear(32, 32)
    with memcheck.Probe(layer) as probe:
        with probe.phase("load"):
            weights = torch.randn(1000)
        step = probe.step()
    assert step["peak_bytes"] == step["live_bytes"] > 4000
    del weights


def test_an_inplace_change_to_a_saved_tensor_fails_backward_under_the_probe_as_without_it():
    def backward():
        x = torch.randn(3, 4, requires_grad=True)
        y = x.sigmoid()    # sigmoid saves its output for backward
        y.mul_(2)          # changed in place: its gradient would be wrong
        y.sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        backward()
    with memcheck.Probe(nn.Linear(4, 4)), pytest.raises(RuntimeError, match="modified by an inplace operation"):
        backward()


def test_the_report_is_on_disk_as_the_allocation_fails_before_the_scope_closes(tmp_path):
    path = tmp_path / "stack.json"
    with memcheck.Probe(nn.Linear(32, 32), path=path, max_memory_mib=1, log=lambda *a: None) as probe:
        with probe.phase("forward"), pytest.raises(torch.OutOfMemoryError):
            torch.empty(MiB // 2)   # 2 MiB, over the limit
        assert memcheck.read_report(path)["oom"]["phase"] == "forward"   # the process may not live on


def test_a_loop_that_recovers_from_an_oom_ends_ok_and_says_where_it_ran_out(tmp_path, capsys):
    path = tmp_path / "recovered.json"
    # The first batch's 4 MiB input is over the limit; the loop goes on with smaller ones.
    probe_loop(width=256, batch_sizes=(4096, 64, 64, 64), path=path, max_memory_mib=2, log=lambda *a: None)
    report = memcheck.read_report(path)
    assert (report["status"], report["oom"], len(report["steps"])) == ("ok", None, 3)
    assert report["recovered_oom"]["phase"] == "forward" and report["recovered_oom"]["recovered_at_step"] == 1
    assert "and the loop went on: step 1 finished after it" in memcheck.format_report(report)
    done = run_main(memcheck.main, capsys, "diff", path, path, "--max-ratio", "1")
    assert done.returncode == 0 and "A out of memory in forward at step 1" in done.stdout


@pytest.mark.parametrize("given, said", [(1.35, "1.35"), (0.3, "0.3"), (3, "3.0")])
def test_the_max_memory_limit_is_said_with_the_decimals_it_was_given(given, said):
    # (one decimal would read "1.3 MiB live ... over the limit of 1.3 MiB"; 0.3 read 0.299999)
    with memcheck.Probe(nn.Linear(4, 4), max_memory_mib=given) as probe, probe.phase("forward"):
        with pytest.raises(torch.OutOfMemoryError, match=rf"limit of {re.escape(said)} MiB$"):
            torch.ones(MiB)


def test_an_allocation_over_max_memory_is_not_made_so_a_smaller_one_fits_after_it():
    with memcheck.Probe(nn.Linear(4, 4), max_memory_mib=3) as probe:
        with probe.phase("forward"):
            kept = torch.ones(MiB // 2)   # 2 MiB
            live = probe.tracker.live_bytes
            with pytest.raises(torch.OutOfMemoryError, match=r"allocating 2\.0 MiB .* with 2\.0 MiB live: "
                               r"1,048,\d+ bytes over .* limit of 3\.0 MiB"):
                torch.ones(MiB // 2 + 1)
            assert probe.tracker.live_bytes == live   # as a real allocator: nothing was allocated
            refused = [o for o in gc.get_objects() if type(o) is torch.Tensor and o.numel() == MiB // 2 + 1]
            assert not refused   # nor held by the error's frames
            small = torch.zeros(16)
    assert probe.phases["forward"]["peak_bytes"] == live + small.untyped_storage().nbytes() < 3 * MiB
    del kept


def careless(layer):
    """`layer` with the forward of a fork that catches any error inside it and returns zeros."""
    forward = layer.forward

    def catching(x):
        try:
            return forward(x)
        except Exception as e:
            print(f"layer error: {e}")
        return torch.zeros_like(x)
    layer.forward = catching
    return layer


def test_an_oom_a_layer_catches_is_named_and_so_is_the_error_it_leads_to(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), careless(nn.Linear(16, 4096)))
    path = tmp_path / "caught.json"
    with pytest.raises(RuntimeError, match="does not require grad"):
        with memcheck.Probe(model, path=path, max_memory_mib=1, log=lambda *a: None) as probe:
            with probe.phase("forward"):
                loss = model(torch.randn(64, 16)).sum()   # its [64, 4096] output is over the limit
            with probe.phase("backward"):
                loss.backward()   # of the zeros the layer returned instead
    report = memcheck.read_report(path)
    assert report["status"] == "error" and report["oom"] is None
    assert [(c["module"], c["caught_in"], c["step"]) for c in report["caught_ooms"]] == [("1", "1", 1)]
    shown = memcheck.format_report(report)
    assert "before it, memory ran out inside the model, and its code caught it (WARNING oom_caught)" in shown
    assert "WARNING oom_caught: memory ran out once inside the model, and the forward of 1 caught it" in shown


@pytest.mark.parametrize("zeros", ["after its except clause", "in its except clause"])
def test_an_oom_a_layer_catches_then_runs_out_again_making_its_zeros_names_the_first(zeros, tmp_path):
    # the report named only the zeros' allocation: the first OOM was in no caught_ooms, no warning and
    # no line, and only the layer's own print said it
    layer = nn.Linear(16, 4096)

    def catching(x):   # (iLoRA's fork makes them in its except clause: the first error still in flight)
        try:
            return nn.Linear.forward(layer, x)
        except Exception:
            if zeros == "in its except clause":
                return torch.zeros(x.shape[0], 4096)
        return torch.zeros(x.shape[0], 4096)
    layer.forward = catching
    path = tmp_path / "again.json"
    with pytest.raises(torch.OutOfMemoryError, match=r"from zeros in 1\)"):
        with memcheck.Probe(nn.Sequential(nn.Linear(16, 16), layer), path=path, max_memory_mib=1,
                            log=lambda *a: None) as probe:
            with probe.phase("forward"):
                probe._stack.model(torch.randn(64, 16))
    report = memcheck.read_report(path)
    assert report["status"] == "oom" and "from zeros in 1" in report["oom"]["message"]
    shown = memcheck.format_report(report)
    if zeros == "after its except clause":   # its code went on: it caught it
        [caught] = report["caught_ooms"]
        assert caught["caught_in"] == "1" and "from addmm in 1" in caught["message"]
        assert "before it, memory ran out inside the model, and its code caught it (WARNING oom_caught)" \
            in shown and [w["kind"] for w in report["warnings"]] == ["oom_caught"]
    else:   # still handling it (an except or a finally clause): no catch, but said
        assert report["caught_ooms"] == [] and report["warnings"] == []
        assert "it came as the code of 1 handled an earlier one, raised in it (an except or finally clause " \
               "that allocates): DefaultCPUAllocator" in shown and "from addmm in 1" in shown


def _runs_out_in_cleanup(layer):
    """`layer` whose forward runs out of memory, and so does what runs as its error leaves it."""
    def forward(x):
        try:
            return nn.Linear.forward(layer, x)
        finally:
            torch.empty(1024, 1024)
    layer.forward = forward
    return layer


@pytest.mark.parametrize("cleanup", ["a finally clause", "a forward hook"])
def test_an_oom_nothing_catches_is_not_said_caught_however_much_runs_as_it_leaves(cleanup):
    layer = nn.Linear(16, 4096)
    if cleanup == "a finally clause":
        _runs_out_in_cleanup(layer)
    else:   # (after the forward returned: the hook's own OOM, which the module did not catch)
        layer.register_forward_hook(lambda *_: torch.empty(1024, 1024))
        layer.weight.data = torch.zeros(4096, 16)   # (a forward that fits: the hook runs out alone)
    model = nn.Sequential(nn.Linear(16, 16), layer)
    with pytest.raises(torch.OutOfMemoryError):
        with memcheck.Probe(model, max_memory_mib=1 if cleanup == "a finally clause" else 3,
                            log=lambda *a: None) as probe:
            with probe.phase("forward"):
                model(torch.randn(64 if cleanup == "a finally clause" else 8, 16))
    report = probe.report()
    assert report["status"] == "oom" and report["caught_ooms"] == [] and report["warnings"] == []


class _Halves(nn.Module):
    """A layer that, out of memory, does its work again on halves: itself, inside its except clause."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 4096)

    def forward(self, x):
        try:
            return self.linear(x).sum(1)
        except torch.OutOfMemoryError:
            if len(x) == 1:
                raise
            return torch.cat([self(half) for half in x.chunk(2)])


@pytest.mark.parametrize("where", ["a layer", "the whole model"])
def test_a_layer_that_catches_an_oom_and_calls_itself_on_halves_caught_it(where):
    # its calls on halves, ending while the first error was still handled, were taken for that error
    # leaving them (a hook's): no catch, and a run that finished read as the loop's OOM
    model = nn.Sequential(nn.Linear(16, 16), _Halves()) if where == "a layer" else _Halves()
    with memcheck.Probe(model, max_memory_mib=1, log=lambda *a: None) as probe:
        with probe.phase("forward"):
            assert model(torch.randn(64, 16)).shape == (64,)
    report = probe.report()
    assert report["status"] == "ok" and [w["kind"] for w in report["warnings"]][:1] == ["oom_caught"]
    assert report["caught_ooms"][0]["caught_in"] == ("1" if where == "a layer" else memcheck.NO_MODULE)


def test_an_oom_caught_in_one_layer_then_one_raised_in_the_next_are_both_named(tmp_path):
    model = nn.Sequential(careless(nn.Linear(16, 4096)), nn.Linear(16, 4096))
    path = tmp_path / "fatal.json"
    with pytest.raises(torch.OutOfMemoryError):
        with memcheck.Probe(model, path=path, max_memory_mib=1, log=lambda *a: None) as probe:
            with probe.phase("forward"):
                model(torch.randn(64, 16))
    report = memcheck.read_report(path)
    assert report["status"] == "oom" and report["oom"]["module"] == "1"
    assert [(c["module"], c["caught_in"]) for c in report["caught_ooms"]] == [("0", "0")]
    shown = memcheck.format_report(report)
    assert ("OUT OF MEMORY in forward at step 1, inside 1: DefaultCPUAllocator: can't allocate memory: "
            "allocating 1.0 MiB") in shown
    assert "WARNING oom_caught (1x, in 0)" in memcheck.verdict(dict(report, budget=None))


class CatchesTwice(nn.Module):
    """A forward that catches an error in each of its two children and goes on."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 4096), nn.Linear(16, 4096)

    def forward(self, x):
        for child in (self.a, self.b):
            try:
                x = x + child(x)[:, :16]
            except torch.OutOfMemoryError:
                pass
        return x


def test_every_oom_a_forward_catches_is_counted_and_the_report_is_written_once_a_step(tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(memcheck, "write_report", lambda path, report: writes.append(
        (report["status"], [w["kind"] for w in report["warnings"]], report.get("mid_run"))))
    model = nn.Sequential(nn.Linear(16, 16), CatchesTwice())
    optimizer = torch.optim.AdamW(model.parameters())
    with memcheck.Probe(model, optimizer, path=tmp_path / "twice.json", max_memory_mib=1) as probe:
        for _ in range(12):
            with probe.phase("forward"):
                loss = model(torch.randn(64, 16)).sum()
            with probe.phase("backward"):
                loss.backward()
            probe.step(loss)
    report = probe.report()
    [warning] = [w for w in report["warnings"] if w["kind"] == "oom_caught"]
    assert (warning["count"], warning["caught_in"]) == (24, ["1"])   # both children's, every step
    assert len(report["caught_ooms"]) == memcheck.TOP_SURVIVORS < 24 and report["status"] == "ok"
    # at the first OOM of each step, at its first catch (what the layer returned may hang the run), at the end
    assert len(writes) == 2 * 12 + 1 and writes[:2] == [("oom", [], True), ("ok", ["oom_caught"], True)]
    assert writes[-1][2] is None   # the last, as the run ended


def test_an_oom_caught_in_a_retry_after_the_loops_own_oom_is_caught_and_the_loops_recovered():
    model = nn.Sequential(nn.Linear(16, 64), careless(nn.Linear(64, 2048)))
    with memcheck.Probe(model, max_memory_mib=2) as probe:
        try:
            with probe.phase("forward"):
                model(torch.randn(8192, 16))   # the first layer's 2 MiB output is over the limit: the loop's
        except torch.OutOfMemoryError:
            with probe.phase("forward"):
                model(torch.randn(256, 16))   # retried smaller, in the except block; the layer catches
        probe.step()
    report = probe.report()
    assert report["recovered_oom"]["module"] == "0"
    assert [(c["module"], c["caught_in"]) for c in report["caught_ooms"]] == [("1", "1")]


class FallsBack(nn.Module):
    """Runs `inner`, and where it raises, a linear layer of its own weights instead."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.weight = inner, nn.Parameter(torch.ones(64, 16))

    def forward(self, x):
        try:
            return self.inner(x)
        except torch.OutOfMemoryError:
            return torch.nn.functional.linear(x, self.weight).relu()


def _fall_back_under_a_probe(model):
    """The probe of one step of `model` on a batch of 32, whose module stack is empty after it."""
    with memcheck.Probe(model) as probe:
        with probe.phase("forward"):
            loss = model(torch.randn(32, 16)).sum()
        with probe.phase("backward"):
            loss.backward()
        probe.step()
        assert probe.tracker.module_stack == []
    return probe


@pytest.mark.parametrize("hook", ["the module's", "global"])
def test_a_hook_that_raises_before_the_probes_leaves_the_modules_it_runs_in_named(hook):
    # a pre-hook registered before the probe's (accelerate's, say), or a global one, raising: the
    # probe's push never came, its pop did, and took the caller's name: the fallback's activation
    # was "(no module)"
    inner = nn.Linear(16, 64)

    def moving_the_weights(module, args):
        if module is inner:
            raise torch.OutOfMemoryError("raised by a pre-hook")

    model = nn.Sequential(nn.Linear(16, 16), FallsBack(inner))
    with contextlib.ExitStack() as hooks:
        if hook == "global":
            hooks.callback(torch.nn.modules.module.register_module_forward_pre_hook(moving_the_weights).remove)
        else:
            inner.register_forward_pre_hook(moving_the_weights)
        probe = _fall_back_under_a_probe(model)
    saved = {m["module"]: m["bytes"] for m in probe.report()["modules"]}
    assert saved["1"] == 32 * 64 * 4   # relu's output


def test_a_forward_that_raises_another_error_after_an_oom_did_not_go_on():
    layer = nn.Linear(16, 4096)

    def raises_another(x):
        failed = False
        try:
            return nn.Linear.forward(layer, x)
        except torch.OutOfMemoryError:
            failed = True
        if failed:   # outside the except clause: the new error has no context
            raise ValueError("the layer failed")
    layer.forward = raises_another
    with pytest.raises(ValueError), memcheck.Probe(layer, max_memory_mib=1) as probe:
        with probe.phase("forward"):
            layer(torch.randn(64, 16))
    report = probe.report()   # the run stopped: not caught
    assert (report["caught_ooms"], report["status"]) == ([], "oom")


def test_an_oom_that_leaves_the_model_for_the_loop_is_recovered_from_not_caught(tmp_path):
    model = nn.Sequential(nn.Linear(16, 4096))
    path = tmp_path / "recovered.json"
    with memcheck.Probe(model, path=path, max_memory_mib=1, log=lambda *a: None) as probe:
        for bs in (64, 8, 8, 8):   # the first batch's output is over the limit: the loop goes smaller
            try:
                with probe.phase("forward"):
                    loss = model(torch.randn(bs, 16)).sum()
            except torch.OutOfMemoryError:
                continue
            with probe.phase("backward"):
                loss.backward()
            probe.step(loss)
    report = memcheck.read_report(path)
    assert (report["status"], report["caught_ooms"], report["recovered_oom"]["module"]) == ("ok", [], "0")
    assert "oom_caught" not in [w["kind"] for w in report["warnings"]]


def test_pythons_own_memory_error_is_an_out_of_memory():
    with pytest.raises(MemoryError), memcheck.Probe(nn.Linear(2, 2)) as probe:
        [0] * (2 ** 62)   # more than any machine has: Python refuses it before asking
    assert probe.status == "oom" and probe.oom["phase"] == memcheck.BETWEEN_PHASES


def test_pythons_own_memory_error_inside_a_phase_is_an_out_of_memory_in_that_phase():
    # No op raised it (the tracker records those): the phase records it before it closes.
    with pytest.raises(MemoryError), memcheck.Probe(nn.Linear(2, 2)) as probe:
        with probe.phase("forward"):
            [0] * (2 ** 62)
    assert probe.status == "oom" and probe.oom["phase"] == "forward"


def test_a_report_folder_is_made_at_the_start_and_one_that_cannot_be_is_said_in_one_line(tmp_path):
    memcheck.Probe(nn.Linear(2, 2), path=tmp_path / "runs" / "a" / "stack.json")
    assert (tmp_path / "runs" / "a").is_dir()
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")   # a report would replace it (as it would /dev/null)
    for path, said in ((tmp_path / "file" / "stack.json", "cannot write in its folder"),
                       (tmp_path / "runs", "is a directory"), ("/proc/stack.json", "cannot write in its folder"),
                       (tmp_path / "fifo", "not a regular file")):
        with pytest.raises(memcheck.ReportError, match=f"report path '{path}': {said}"):
            memcheck.Probe(nn.Linear(2, 2), path=path)


def test_a_report_written_through_a_link_fills_its_target_and_the_link_stays(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "latest.json").symlink_to(tmp_path / "runs" / "stack.json")
    model, optimizer = mlp_and_adamw(8)
    with memcheck.Probe(model, optimizer, path=tmp_path / "latest.json", log=lambda *a: None) as probe:
        phased_loop(probe, optimizer, [torch.randn(4, 8)], lambda batch: model(batch).sum())
    assert (tmp_path / "latest.json").is_symlink()
    assert memcheck.read_report(tmp_path / "runs" / "stack.json")["peak_bytes"] == probe.report()["peak_bytes"]
    (tmp_path / "next.json").symlink_to(tmp_path / "later" / "stack.json")   # its folder made, as any
    with memcheck.Probe(model, optimizer, path=tmp_path / "next.json", log=lambda *a: None):
        pass
    assert (tmp_path / "next.json").is_symlink() and memcheck.read_report(tmp_path / "later" / "stack.json")


def test_preloaded_batches_are_not_allocations_of_later_steps():
    batches = token_batches(4)      # they exist before the probe, and each step touches a new one
    model, optimizer = peft_opt()
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, batches)
    report = probe.report()
    assert report["leak"]["bytes_per_step"] == 0 and not report["leak"]["detected"]
    assert report["warnings"] == []


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


def test_the_probe_infers_the_stack_and_prints_its_baseline_command():
    report = probed_report({"ckpt": "non-reentrant"}, "clean", False)
    config = report["config"]
    assert config["probe"] and config["model_class"] == "OPTForCausalLM"
    assert (config["bs"], config["seq"], config.get("autocast")) == (2, 32, None)
    assert (config["adapters"], config["r"], config["alpha"], config["experts"]) == ("peft_lora", 4, 8, 1)
    assert config["targets"] == ["q_proj", "v_proj"]
    assert config["checkpointing_enabled"] and config["checkpointing"]
    assert config["param_bytes_by_dtype"].keys() == {"float32"}
    command = ("python ref_train.py --bs 2 --seq 32 --vocab 500 --no-add-tokens --lora-r 4 --alpha 8 "
               "--experts 1 --dropout 0 --targets q_proj,v_proj --no-inject-items --precision 32 "
               "--ckpt manual")
    assert config["baseline_command"] == command
    assert f"the reference for this stack: {command}" in memcheck.format_report(report)
    assert not probed_report({}, "clean", False)["config"]["checkpointing"]
    assert ref_train.parse_args(command.split()[2:] + ["--device", "cpu"])  # a command that runs


class NotLora(nn.Linear):
    """A linear layer with some of LoRA's names, not PEFT's dicts of them."""

    def __init__(self):
        super().__init__(8, 8)
        self.lora_A, self.r = nn.Linear(8, 2), {"default": 2}


def test_only_a_layer_with_peft_loras_dicts_is_read_as_lora_and_one_gated_expert_is_gated_lora():
    ours = nn.Sequential(nn.Linear(8, 8))
    ilora.add_gated_lora(ours, targets=("0",), r=4, alpha=8, n_experts=1)
    assert memcheck._adapters(ours)["adapters"] == "gated_lora"
    assert memcheck._adapters(nn.Sequential(NotLora())) == {"adapters": None, "lora_outside": None}


def test_the_probe_sees_the_gated_lora_of_the_reference(tiny_model):
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--bs", "2", "--seq", "48"])
    model, items, batches, _ = ref_train.build(args)
    optimizer = torch.optim.AdamW([p for m in (model, items) for p in m.parameters() if p.requires_grad])
    modules = nn.ModuleDict({"lm": model, "ilora": items})
    with memcheck.Probe(modules, optimizer) as probe:
        for _ in range(2):
            ref_train.train_step(ref_train.ILoraModel(model, items, args), optimizer,
                                 torch.amp.GradScaler("cpu", enabled=False), next(batches), args, probe, [])
            probe.step()
    report = probe.report()
    config = report["config"]
    assert (config["adapters"], config["r"], config["alpha"], config["experts"]) == ("gated_lora", 8, 32, 4)
    assert (config["bs"], config["seq"], config["checkpointing"]) == (2, 48, True)
    assert report["warnings"] == []
    # Named from the language model down, as a PEFT stack's modules are: the rows of a diff align.
    assert any(m["module"].startswith("model.decoder.layers.") for m in report["modules"])


# ---------------------------------------------------------------- warnings

# (kind, the careless loop, its clean twin, what the message must name): each loop is
# (peft_opt's flags, user_loop's pattern, eval mode)
WARNINGS = [
    ("leak", ({}, "outputs_in_a_list", False), ({}, "clean", False), "[] float32 4 B from nll_loss_forward"),
    ("graph_kept", ({}, "retain_graph", False), ({}, "clean", False), "retain_graph=True"),
    ("output_kept", ({}, "output_kept", False), ({}, "clean", False), "from lm_head, were alive"),
    ("grad_in_eval", ({}, "eval_without_no_grad", False), ({}, "eval_under_no_grad", False),
     "during 'forward'"),
    ("no_grad", ({"ckpt": "reentrant", "input_grads": False}, "clean", False),
     ({"ckpt": "reentrant"}, "clean", False), "8 of 10 trainable parameters"),
    ("checkpointing_inactive", ({"ckpt": "non-reentrant"}, "clean", True),
     ({"ckpt": "non-reentrant"}, "clean", False), "e.g. model.decoder.layers."),
    ("graphs_together", ({}, "summed_micro_batches", False), ({}, "micro_batches", False),
     "the graphs of 2 training forwards were alive together as a backward began (step 1, 4 steps"),
    ("eval_mode", ({"dropout": 0.1}, "clean", True), ({"dropout": 0.1}, "clean", False),
     "trained in eval() mode, so its dropout (p 0.1) did not run"),
]


def _layers_and_own_loss(lm, ids, checkpointed_decoder=False):
    """A loop's own forward: the layers run by hand, or the decoder under non-reentrant checkpoint."""
    decoder = lm.get_decoder()
    if checkpointed_decoder:
        hidden = torch.utils.checkpoint.checkpoint(lambda e: decoder(inputs_embeds=e).last_hidden_state,
                                                   decoder.embed_tokens(ids), use_reentrant=False)
    else:
        hidden = decoder.embed_tokens(ids) + decoder.embed_positions(torch.ones_like(ids))
        for layer in decoder.layers:
            hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = decoder.final_layer_norm(hidden)
    logits = lm.get_output_embeddings()(hidden[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("loop", ["projector before the model", "decoder and own loss, summed",
                                  "a model that runs its first layer twice", "layers run by hand, summed",
                                  "the decoder checkpointed whole"])
def test_graphs_together_counts_forwards_through_the_layers_however_the_loop_calls_them(loop):
    # A trainable projector makes the next step's inputs before the model's forward: its saves were
    # taken for the last forward's (a false warning in the verdict, 0.5 MiB); a loop that runs the
    # decoder and its own loss, two micro-batches summed, was not seen at all; a model that reuses
    # its first layer was taken for two forwards; so was the whole decoder's recomputation in backward.
    model, optimizer = peft_opt()
    lm, projector = model.get_base_model(), torch.nn.Linear(64, 64)
    if loop.startswith("projector"):
        optimizer.add_param_group({"params": list(projector.parameters())})
    if loop.endswith("twice"):
        lm.model.decoder.layers = torch.nn.ModuleList([lm.model.decoder.layers[0]] * 2)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def loss_of(ids):
        if loop == "projector before the model":
            return model(inputs_embeds=projector(lm.get_input_embeddings()(ids)), labels=ids).loss
        if loop.startswith(("layers run by hand", "the decoder checkpointed")):
            return _layers_and_own_loss(lm, ids, checkpointed_decoder=loop.endswith("whole"))
        hidden = lm.get_decoder()(input_ids=ids).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    with memcheck.Probe(model, optimizer) as probe:
        summed = lambda ids: sum(map(loss_of, ids.split(1)))   # micro-batches of a row each
        phased_loop(probe, optimizer, token_batches(3), summed if loop.endswith("summed") else loss_of)
    kinds = [w["kind"] for w in probe.report()["warnings"]]
    assert kinds == (["graphs_together"] if loop.endswith("summed") else []), kinds


@pytest.mark.parametrize("ckpt, rows", [(None, 1), ("reentrant", 1), ("non-reentrant", 1), (None, 2)])
def test_graphs_together_sizes_what_the_graphs_beyond_the_largest_micro_batch_saved(ckpt, rows):
    # Counted independently: the floating-point tensors one micro-batch's forward and loss save,
    # parameters aside (the probe counts the saved inputs of checkpoint's layers, as autograd does).
    # Micro-batches of `rows` rows and one: beyond the largest, one row's graph was one too many.
    model, optimizer = peft_opt(ckpt=ckpt)
    loss_of = lambda ids: model(input_ids=ids, labels=ids).loss
    batches = token_batches(2, bs=rows + 1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.is_floating_point():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(batches[0][:1])
    with memcheck.Probe(model, optimizer) as probe:
        phased_loop(probe, optimizer, batches, lambda ids: sum(map(loss_of, ids.split(rows))))
    [warning] = probe.report()["warnings"]
    assert warning["kind"] == "graphs_together"
    assert warning["bytes"] == pytest.approx(sum(saved.values()), rel=0.01)


def test_a_full_fine_tune_gets_no_lora_baseline_and_the_report_says_why(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=500, **TINY_OPT))
    optimizer = torch.optim.AdamW(model.parameters())
    said = []
    with memcheck.Probe(model, optimizer, path=tmp_path / "ft.json", log=said.append) as probe:
        user_loop(probe, model, optimizer, token_batches(2))
    report = memcheck.read_report(tmp_path / "ft.json")
    assert report["config"]["bs"] == 2 and "baseline_command" not in report["config"]
    assert memcheck.format_report(report).endswith(memcheck.NO_LORA_BASELINE)
    assert said[0].endswith("\n" + memcheck.NO_LORA_BASELINE)
    assert os.listdir(tmp_path) == ["ft.json"]   # no config.json for a baseline there is not


def probed_report(flags, pattern, eval_mode):
    model, optimizer = peft_opt(**flags)
    if eval_mode:
        model.eval()
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, token_batches(4), pattern)
    return probe.report()


@pytest.mark.parametrize("kind, careless, clean, named", WARNINGS, ids=[w[0] for w in WARNINGS])
def test_each_warning_names_its_careless_loop_and_its_clean_twin_stays_silent(kind, careless, clean,
                                                                             named):
    report = probed_report(*careless)
    # (eval mode also stops OPT's own dropout: said beside what checkpointing did not do)
    also = ["eval_mode"] if kind == "checkpointing_inactive" else []
    assert sorted(w["kind"] for w in report["warnings"]) == sorted([kind, *also]), report["warnings"]
    [warning] = [w for w in report["warnings"] if w["kind"] == kind]
    assert named in warning["message"], warning["message"]
    assert f"WARNING {kind}: {warning['message']}" in memcheck.format_report(report).splitlines()
    if kind in ("no_grad", "eval_mode"):   # however its peak reads: a run that does not train as it should
        assert {"no_grad": "WARNING no_grad (8 of 10 trainable parameters got no gradient)",
                "eval_mode": "WARNING eval_mode (dropout off)"}[kind] in memcheck.verdict(report)
    assert probed_report(*clean)["warnings"] == []


def test_a_warning_about_saved_tensors_weighs_the_activations_not_the_weights_autograd_also_saves():
    model, optimizer = peft_opt()
    with memcheck.Probe(model, optimizer) as probe:
        with probe.phase("eval"):
            model(input_ids=token_batches(1)[0])   # not under no_grad; the output dropped at once
        probe.step()
    inactive = probed_report(*next(w for w in WARNINGS if w[0] == "checkpointing_inactive")[1])
    for report, phase in ((probe.report(), "eval"), (inactive, "forward")):
        (warning,) = [w for w in report["warnings"] if w["kind"] != "eval_mode"]   # (of no size)
        assert 0 < warning["bytes"] <= report["phases"][phase]["categories"]["activations"], warning


@pytest.mark.parametrize("train_from_step", [1, 2, None])
def test_eval_mode_is_said_only_when_no_training_step_ran_in_train_mode(train_from_step):
    model, optimizer = peft_opt(dropout=0.1)
    model.eval()   # (a sanity evaluation before fit leaves it so, until the loop calls train())
    with memcheck.Probe(model, optimizer) as probe:
        for step, ids in enumerate(token_batches(3), start=1):
            model.train(step == train_from_step or model.training)
            user_loop(probe, model, optimizer, [ids])
    said = [w["kind"] for w in probe.report()["warnings"]]
    assert said == ([] if train_from_step else ["eval_mode"]), said


def test_checkpointing_inactive_is_named_however_small_and_memory_held_once_is_not():
    saves = memcheck._Saves(memcheck.Tracker("cpu"))
    saves._event("checkpointing_inactive", 1, bytes=1, modules=["model.layers.0"])
    saves._event("grad_in_eval", 1, phase="eval", bytes=1)
    assert [w["kind"] for w in saves.warnings(peak_bytes=10 * MiB)] == ["checkpointing_inactive"]


@pytest.mark.parametrize("held, named", [(MiB - 1, False), (MiB, True), (101 * MiB, True)])
def test_memory_held_once_is_named_from_1_mib_on_a_large_peak_or_1_percent_of_it(held, named):
    saves = memcheck._Saves(memcheck.Tracker("cpu"))
    saves._event("grad_in_eval", 1, phase="eval", when="in step 1", bytes=held)
    assert bool(saves.warnings(peak_bytes=10 * 1024 * MiB)) is named   # 1% of 10 GiB: 102.4 MiB
    assert saves.warnings(peak_bytes=100 * held)                       # 1% of the peak, however small


def test_a_model_compiled_in_place_is_said_to_run_eager_under_the_probe():
    model, optimizer = mlp_and_adamw(64)
    model.compile()
    with memcheck.Probe(model, optimizer) as probe:
        with probe.phase("forward"):
            loss = model(torch.randn(8, 64)).square().mean()
        with probe.phase("backward"):
            loss.backward()
        probe.step()
    assert [w["kind"] for w in probe.report()["warnings"]] == ["compile_disabled"]


def test_a_kept_output_is_the_logits_not_the_loss_the_loop_keeps_anyway():
    (warning,) = probed_report({}, "output_kept", False)["warnings"]
    bs, seq = token_batches(1)[0].shape
    assert (warning["tensors"], warning["bytes"]) == (1, bs * seq * 500 * 4)   # peft_opt's fp32 logits


def test_a_graph_kept_with_its_hidden_states_is_not_also_a_kept_output():
    model, optimizer = peft_opt()
    model.config.output_hidden_states = True   # saved by the kept graph; 4 x 64 so they pass 1% of the peak
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, token_batches(3, bs=4, seq=64), "retain_graph")
    assert [w["kind"] for w in probe.report()["warnings"]] == ["graph_kept"], probe.report()["warnings"]


def test_the_no_grad_warning_counts_the_parameters_that_got_none():
    warning = probed_report({"ckpt": "reentrant", "input_grads": False}, "clean", False)["warnings"][0]
    # Reentrant checkpointing of frozen inputs: no LoRA weight inside the 2 layers gets a gradient,
    # the final layer norm after them does.
    assert (warning["count"], warning["of"]) == (8, 10)
    assert "lora_A" in warning["message"] and "8 of 10" in warning["message"]
    assert warning["message"].endswith("call model.enable_input_require_grads() or use use_reentrant=False")


@pytest.mark.parametrize("cause", ["a module never run", "a loss on the first layer's output",
                                   "torch's reentrant checkpoint_wrapper"])
def test_the_no_grad_warning_blames_reentrant_checkpointing_only_where_the_layers_got_none(cause):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    model, _ = peft_opt()
    lm = model.get_base_model()
    if cause == "a module never run":
        lm.unused = torch.nn.Linear(4, 4)   # trained, never run by the forward
    if cause.endswith("checkpoint_wrapper"):   # (as FSDP's apply_activation_checkpointing wraps them)
        layers = lm.model.decoder.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.REENTRANT)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def first_layers(ids):   # (the second layer's LoRA and the final norm get no gradient: no checkpointing)
        return lm.lm_head(model(input_ids=ids, output_hidden_states=True).hidden_states[1]).sum()
    with memcheck.Probe(model, optimizer) as probe:
        if cause.startswith("a loss"):
            phased_loop(probe, optimizer, token_batches(2), first_layers)
        else:
            user_loop(probe, model, optimizer, token_batches(2))
    [warning] = probe.report()["warnings"]
    assert warning["message"].endswith("use use_reentrant=False" if cause.endswith("checkpoint_wrapper") else
                                       "the loss does not depend on them: a module the forward does not run, "
                                       "or a detach()"), warning


def test_the_vocabulary_is_the_embeddings_rows_where_the_config_was_not_updated():
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(vocab_size=500, **TINY_OPT))
    lm.set_input_embeddings(torch.nn.Embedding(2000, 64))   # by hand: the config still says 500
    lm.lm_head = torch.nn.Linear(64, 2000, bias=False)
    model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    own_loss = lambda ids: torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                                             ids[:, 1:].flatten())
    with memcheck.Probe(model, optimizer) as probe:
        phased_loop(probe, optimizer, token_batches(2, vocab=2000), own_loss)
    assert probe.report()["config"]["vocab_rows"] == 2000


def test_a_forward_interrupted_inside_the_decoder_leaves_the_next_steps_forwards_counted():
    # KeyboardInterrupt runs no always_call hook: the decoder stayed entered, and no forward after it
    # was counted (graphs_together off for the rest of the run).
    model, optimizer = peft_opt()
    loss_of = lambda ids: model(input_ids=ids, labels=ids).loss
    layer = model.get_base_model().model.decoder.layers[1]
    with memcheck.Probe(model, optimizer) as probe:
        hook = layer.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt), probe.phase("forward"):
            loss_of(token_batches(1)[0])
        hook.remove()
        probe.step()   # (its saves no backward used: grad_in_eval, rightly)
        phased_loop(probe, optimizer, token_batches(3), lambda ids: sum(map(loss_of, ids.split(1))))
    assert "graphs_together" in [w["kind"] for w in probe.report()["warnings"]]


class KeepsOnCtx(torch.autograd.Function):
    """A custom kernel that keeps what its backward needs as a ctx attribute, not saved: alive as
    long as its graph node is, which the loop's `loss` holds past backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.wide = x.repeat(1, 1, 8)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.wide[..., :grad.shape[-1]].sign().abs()


def test_evaluation_outputs_kept_in_a_list_are_not_taken_for_a_training_output():
    # (an evaluation's logits, kept under no_grad outside training's phases: the leak's business,
    # not output_kept's; the training steps after it keep only their loss)
    model, optimizer = peft_opt()
    kept = []
    with memcheck.Probe(model, optimizer) as probe:
        with probe.phase("eval"), torch.no_grad():
            kept.append(model(input_ids=token_batches(1, bs=8)[0]).logits)
        probe.step()
        user_loop(probe, model, optimizer, token_batches(3))
    assert [w["kind"] for w in probe.report()["warnings"]] == []


def test_what_a_custom_kernel_keeps_on_ctx_is_not_taken_for_the_models_output():
    model, optimizer = peft_opt()
    norm = model.get_base_model().model.decoder.final_layer_norm
    norm.register_forward_hook(lambda module, args, out: KeepsOnCtx.apply(out))
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, token_batches(4))
    report = probe.report()
    assert report["warnings"] == []
    # (what it keeps would be worth a warning, were it an output held: over 1% of the peak)
    assert 2 * 32 * 64 * 8 * 4 > memcheck.HELD_ONCE_SHARE * report["peak_bytes"]


# ---------------------------------------------------------------- callbacks in Lightning and the HF Trainer

def no_probe_left_behind(model):
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    assert _get_current_dispatch_mode() is None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any(p._backward_hooks or p._post_accumulate_grad_hooks for p in model.parameters())


STACKS = {"lightning": (memcheck.lightning_callback, lambda model, cb, tmp: lightning_fit(model, cb)),
          "hf_trainer": (memcheck.hf_callback, lambda model, cb, tmp: hf_train(model, [cb], tmp))}


@pytest.mark.parametrize("stack", STACKS)
def test_the_shipped_callback_measures_a_real_trainer(stack, tmp_path):
    make_callback, fit = STACKS[stack]
    model, _ = peft_opt()
    path = tmp_path / "stack.json"
    fit(model, make_callback(path, log=lambda *a: None), tmp_path)
    report = memcheck.read_report(path)
    assert report["status"] == "ok" and report["oom"] is None and len(report["steps"]) == 3
    assert report["peak_bytes"] > 0 and report["warnings"] == []
    assert report["config"]["adapters"] == "peft_lora" and report["config"]["bs"] == 2
    no_probe_left_behind(model)


@pytest.mark.parametrize("stack", STACKS)
def test_an_oom_inside_a_real_trainer_still_writes_the_report(stack, tmp_path):
    make_callback, fit = STACKS[stack]
    model, _ = peft_opt()
    path = tmp_path / "stack.json"
    with pytest.raises(torch.OutOfMemoryError):
        fit(model, make_callback(path, max_memory_mib=0.9, log=lambda *a: None), tmp_path)
    report = memcheck.read_report(path)
    assert report["status"] == "oom" and report["oom"]["step"] == 1
    assert report["oom"]["phase"] in ("forward", "forward+backward")
    assert report["warnings"] == []  # a forward cut short is not an evaluation without no_grad
    assert "max_memory_mib" in report["oom"]["message"]
    no_probe_left_behind(model)


def test_logits_returned_from_a_lightning_training_step_are_named_and_the_loss_alone_is_not(tmp_path):
    for return_logits in (True, False):
        model, _ = peft_opt()
        path = tmp_path / f"{return_logits}.json"
        lightning_fit(model, memcheck.lightning_callback(path, log=lambda *a: None),
                      return_logits=return_logits)
        warnings = memcheck.read_report(path)["warnings"]
        assert [w["kind"] for w in warnings] == (["output_kept"] if return_logits else []), warnings
        if return_logits:
            assert "from lm_head" in warnings[0]["message"] and warnings[0]["steps"] == 3


def test_the_lightning_callback_imports_where_lightning_is_installed_as_pytorch_lightning(monkeypatch):
    pytest.importorskip("pytorch_lightning")
    import pytorch_lightning
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning` now fails
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    assert isinstance(memcheck.lightning_callback("stack.json"), pytorch_lightning.Callback)


# ---------------------------------------------------------------- one drop-in file

def test_memcheck_is_one_drop_in_file_beside_a_users_data_package(tmp_path):
    import shutil
    import subprocess
    import sys
    shutil.copy(os.path.join(os.path.dirname(__file__), "memcheck.py"), tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("USERS_OWN = True\n")
    script = "\n".join([
        "import sys, torch, data, memcheck",
        "assert data.USERS_OWN",
        "model = torch.nn.Linear(8, 8); optimizer = torch.optim.SGD(model.parameters(), lr=0.1)",
        "with memcheck.Probe(model, optimizer, path='stack.json', log=print) as probe:",
        "    for _ in range(3):",
        "        with probe.phase('forward'): loss = model(torch.randn(4, 8)).square().sum()",
        "        with probe.phase('backward'): loss.backward()",
        "        with probe.phase('optimizer'): optimizer.step(); optimizer.zero_grad()",
        "        probe.step(loss)",
        "print(sorted(set(sys.modules) & {'ref_train', 'ilora', 'drive'}))"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert done.stdout.startswith("memcheck: peak ") and "report written to stack.json" in done.stdout
    report = memcheck.read_report(tmp_path / "stack.json")
    assert len(report["steps"]) == 3 and report["warnings"] == []


def test_imports_run_one_way_and_none_hides_inside_a_function():
    import ast
    trainer = {"flags", "models", "fused_loss", "distributed", "ilora", "data", "memcheck", "budget"}
    allowed = {"memcheck": {"budget"}, "budget": {"memcheck"}, "ilora": set(), "data": {"ilora"},
               "flags": set(), "fused_loss": set(), "models": {"data", "memcheck", "flags"},
               "distributed": {"memcheck", "models"}, "ref_train": trainer,
               "drive": {"budget", "data", "flags", "ref_train", "memcheck"}}
    # Only where it has a reason: memcheck.py imports budget.py late (budget.py imports memcheck),
    # and drive.py's commands import the trainer after parsing (its --help needs no torch).
    late = {"memcheck": {"budget"}, "drive": {"budget", "data", "ref_train", "memcheck"}}
    project = set(allowed)
    for name, may_import in allowed.items():
        tree = ast.parse(open(os.path.join(os.path.dirname(__file__), f"{name}.py")).read())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = ({a.name for a in node.names} if isinstance(node, ast.Import)
                           else {node.module})
                mine = modules & project
                assert mine <= may_import, (name, mine)
                where = "at the top" if node in top else "inside a function"
                assert node in top or mine <= late.get(name, set()), f"{name}.py imports {mine} {where}"
                assert node not in top or not mine & late.get(name, set()), f"{name}.py imports {mine} {where}"


# ---------------------------------------------------------------- the verdict

def test_verdict_names_the_category_in_excess():
    report = {"peak_bytes": 10 * memcheck.MiB, "peak_phase": "forward", "oom": None,
              "categories": dict(dict.fromkeys(memcheck.CATEGORIES, 0), activations=9 * memcheck.MiB,
                                 frozen_params=memcheck.MiB),
              "budget": {"peak_bytes": 2 * memcheck.MiB,
                         "categories": dict(dict.fromkeys(memcheck.CATEGORIES, 0),
                                            activations=memcheck.MiB, frozen_params=memcheck.MiB)}}
    assert memcheck.verdict(report) == ("measured peak 5.0x the budget: the excess is in activations "
                                        "(+8.0 MiB) during forward")


@pytest.mark.parametrize("ratio, expected", [(1.0, True), (1.02, True), (1.09, False), (0.91, False),
                                             (1.12, False), (1.3, False), (0.85, False)])
def test_the_verdict_says_as_expected_only_within_three_percent(ratio, expected):
    # Mistake: the verdict's tolerance widened (to the budget's 10%, or to 50%).
    cats = dict.fromkeys(memcheck.CATEGORIES, 0)
    report = {"peak_bytes": int(ratio * 100 * MiB), "peak_phase": "backward", "oom": None,
              "categories": dict(cats, activations=int(ratio * 100 * MiB)),
              "budget": {"peak_bytes": 100 * MiB, "categories": dict(cats, activations=100 * MiB)}}
    assert memcheck.verdict(report).endswith("as expected") == expected, memcheck.verdict(report)


def test_a_run_that_failed_before_its_first_step_ended_gets_no_verdict():
    cats = dict.fromkeys(memcheck.CATEGORIES, 0)
    report = {"peak_bytes": 10 * MiB, "peak_phase": "forward", "oom": None, "status": "error", "steps": [],
              "categories": cats, "budget": {"peak_bytes": 100 * MiB, "categories": cats}}
    assert memcheck.verdict(report) == "no verdict: the run stopped (error) before its first step ended"
    assert memcheck.verdict(dict(report, status="ok")).startswith("measured peak 0.10x the budget")
    caught = {"kind": "oom_caught", "count": 1, "caught_in": ["lora"], "message": "..."}
    assert memcheck.verdict(dict(report, warnings=[caught])).endswith(   # why it stopped, likely
        "before its first step ended; WARNING oom_caught (1x, in lora)")


def test_an_oom_caught_is_named_in_the_verdict_without_budget_py_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "budget", None)   # `import budget` now fails
    caught = {"kind": "oom_caught", "count": 2, "caught_in": ["lora"], "message": "..."}
    assert memcheck.verdict({"peak_bytes": MiB, "warnings": [caught], "no_budget": "no budget: ..."}) == (
        "no budget: ...; WARNING oom_caught (2x, in lora)")


def test_without_budget_py_beside_it_the_report_says_in_one_line_how_to_get_a_verdict(monkeypatch):
    model, optimizer = gated_opt()
    with_budget = probed(model, optimizer)
    assert with_budget["budget"]["peak_bytes"] > 0 and "no_budget" not in with_budget
    monkeypatch.setitem(sys.modules, "budget", None)   # `import budget` now fails
    model, optimizer = gated_opt()
    report = probed(model, optimizer)
    assert report["budget"] is None and report["no_budget"] == memcheck.NO_BUDGET
    assert report["config"]["baseline_command"] == with_budget["config"]["baseline_command"]
    said = [line for line in memcheck.format_report(report).splitlines() if "budget.py" in line]
    assert said == [f"peak {memcheck.mib(report['peak_bytes'])} MiB in {report['peak_phase']}; "
                    f"{memcheck.NO_BUDGET}"]
    assert memcheck.NO_BUDGET in memcheck.markdown_report(report).splitlines()[0]


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


def test_reports_are_written_with_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "r.json"
        memcheck.write_report(path, {"schema": memcheck.SCHEMA})
        assert path.stat().st_mode & 0o777 == 0o644
        memcheck.write_report(path, {"schema": memcheck.SCHEMA})   # replacing one keeps them
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_probe_report_has_the_schema_and_diff_reads_it(tmp_path):
    probe = probe_loop()
    path = tmp_path / "stack.json"
    probe.save(path)
    saved = memcheck.read_report(path)
    assert saved == json.loads(json.dumps(probe.report()))
    assert saved["schema"] == "memcheck/1" and len(saved["steps"]) == 3
    assert saved["peak_bytes"] > 0 and set(saved["phases"]) == {"forward", "backward", "optimizer"}
    assert saved["warnings"] == [] and saved["status"] == "ok"
    assert "forward peak" in memcheck.format_diff(saved, saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_comes_from_the_allocator_and_the_snapshot_is_written(tiny_model, tmp_path):
    snapshot = tmp_path / "snapshot.pickle"
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cuda", "--steps", "2",
                                 "--snapshot", str(snapshot)])
    report = ref_train.train(args, log=lambda *a: None)
    assert snapshot.stat().st_size > 0
    backward = report["phases"]["backward"]
    # The allocator rounds each block up to 512 bytes: its figure is at least the tracker's.
    assert backward["peak_bytes"] >= backward["tracked_peak_bytes"] > 0
    assert backward["reserved_bytes"] >= backward["peak_bytes"]
    # What the allocator holds beyond the tensors is cuBLAS's workspaces, and the budget has them.
    workspaces = report["budget"]["terms"]["cuda_workspaces"]
    assert workspaces > 0
    assert backward["untracked_bytes"] == pytest.approx(workspaces, rel=0.05)


# ---------------------------------------------------------------- diff

def test_diff_of_a_report_with_itself_shows_no_excess(train_tiny, tmp_path):
    report = json.loads(json.dumps(train_tiny("--steps", 2)))
    rows = memcheck.diff(report, report)
    assert rows and all(a == b for _, a, b in rows)
    assert memcheck.config_differences(report, report) == {}
    assert "same configuration" in memcheck.format_diff(report, report)


def test_diff_lists_configuration_differences_first_and_the_largest_excess_first(train_tiny):
    small = train_tiny("--steps", 2, "--seq", 64)
    large = train_tiny("--steps", 2, "--seq", 192, "--impl", "einsum")
    text = memcheck.format_diff(small, large)
    assert text.splitlines()[0].startswith("different configurations: ")
    assert "seq: 64 -> 192" in text
    excess = [abs(b - a) for what, a, b in memcheck.diff(small, large) if what.startswith("module ")]
    assert excess == sorted(excess, reverse=True)


def test_diff_orders_module_rows_of_equal_change_by_name(train_tiny):
    # The table shows the first module rows only: among equal changes, the order must not follow a
    # set's iteration order, which changes with the hash seed from one run of memcheck.py to the next.
    a = json.loads(json.dumps(train_tiny("--steps", 2)))
    b = copy.deepcopy(a)
    b["modules"] = b["modules"] + [{"module": f"model.decoder.layers.0.extra_{c}", "bytes": MiB,
                                    "ops": {"mul": MiB}} for c in "fedcba"]
    rows = [what for what, *_ in memcheck.diff(a, b) if "extra_" in what]
    assert len(rows) == 6 and rows == sorted(rows)


def test_diff_lines_up_the_references_item_modules_with_a_stack_that_holds_them_at_the_top(train_tiny):
    a = json.loads(json.dumps(train_tiny("--steps", 2)))
    assert any(m["module"].startswith("ilora.projector.") for m in a["modules"])
    b = copy.deepcopy(a)   # a LightningModule with self.projector beside its language model
    for m in b["modules"]:
        m["module"] = m["module"].removeprefix("ilora.")
    [(what, in_a, in_b)] = [row for row in memcheck.diff(a, b) if "projector" in row[0]]
    assert what.startswith("module projector.* ") and in_a == in_b > 0
    c = copy.deepcopy(b)   # a module whose name only ends like the other's is another module
    for m in c["modules"]:
        m["module"] = m["module"].replace("projector.", "item_projector.")
    rows = [row[0].split()[1] for row in memcheck.diff(b, c) if "projector" in row[0]]
    assert sorted(rows) == ["item_projector.*", "projector.*"], rows


def test_diff_markdown_is_a_valid_table(train_tiny):
    report = train_tiny("--steps", 2)
    assert_markdown_tables(memcheck.format_diff(report, report, markdown=True))


def gated_opt(dropout=0.0):
    """The tiny OPT of peft_opt() with the hand-written LoRA instead (one expert), no wrapper."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=500, **TINY_OPT))
    ilora.add_gated_lora(model, ("q_proj", "v_proj"), r=4, alpha=8, n_experts=1, dropout=dropout)
    model.get_decoder().final_layer_norm.requires_grad_(True)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def probed(model, optimizer, pattern="clean"):
    batches = token_batches(3)
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, batches, pattern)
    return json.loads(json.dumps(probe.report()))


def test_a_peft_wrapped_and_an_unwrapped_model_training_the_same_thing_diff_to_the_same():
    plain, wrapped = probed(*gated_opt()), probed(*peft_opt())
    rows = memcheck.diff(plain, wrapped)
    modules = [(what, a, b) for what, a, b in rows if what.startswith(("module ", "op "))]
    assert len(modules) >= 8 and any("lora_A" in what for what, _, _ in modules)
    assert all(abs(b - a) <= 0.01 * max(a, b) for _, a, b in modules), modules
    assert "module model.decoder.layers.*.self_attn (x2)" in [what for what, _, _ in modules]
    assert memcheck.format_diff(plain, wrapped).splitlines()[-1].startswith(
        "the two trainings cost the same (within 1%)")


def test_a_lora_training_diffed_with_a_full_fine_tune_names_the_adapters_as_the_difference(train_tiny):
    # "same configuration": a full fine-tune's config has no LoRA keys to compare
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=500, **TINY_OPT)).train()
    full = probed(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    lora = probed(*peft_opt())
    reference = json.loads(json.dumps(train_tiny("--steps", 2)))
    assert memcheck.config_differences(reference, full)["adapters"] == ["gated_lora", "none"]
    assert memcheck.config_differences(full, lora)["adapters"] == ["none", "peft_lora"]
    assert "adapters" not in memcheck.config_differences(reference, lora)
    on_the_head = dict(full, config=dict(full["config"], lora_outside=["lm_head"]))   # (LoRA, elsewhere)
    assert "adapters" not in memcheck.config_differences(reference, on_the_head)
    assert "adapters: 'peft_lora' -> 'none'" in memcheck.format_diff(lora, full)
    assert "parameters: 0 trainable" not in memcheck.format_report(full)
    assert full["params"]["frozen"] == 0 and full["params"]["trainable"] == model.num_parameters()


def test_both_loras_dropout_masks_are_one_row_of_the_diff():
    # The gated LoRA's dropout and PEFT's lora_dropout.default save the same mask.
    plain, wrapped = probed(*gated_opt(dropout=0.1)), probed(*peft_opt(dropout=0.1))
    rows = {what: (a, b) for what, a, b in memcheck.diff(plain, wrapped) if "dropout" in what}
    assert set(rows) == {f"module model.decoder.layers.*.self_attn.{p}.lora_dropout (x2)"
                         for p in ("q_proj", "v_proj")}
    assert all(a == b > 0 for a, b in rows.values()), rows


def test_module_groups_drop_wrappers_adapter_names_and_layer_indices_wherever_they_are():
    # DDP's and compile's wrappers, the base linear of PEFT's LoRA and the gated one's, PEFT's adapter
    # name (after lora_dropout too, which is the gated LoRA's dropout), and a layer's index at the end
    # of its name (what a checkpointed layer saves at its own level): rows of the same place in the
    # model, whatever wraps it, counted once a layer (the gated LoRA and its base read "x3" of 2 layers).
    names = {"module._orig_mod.model.decoder.layers.0": 1, "model.decoder.layers.1": 2,
             "model.decoder.layers.1.self_attn.q_proj": 256,
             "model.decoder.layers.0.self_attn.q_proj.base_layer": 4,
             "model.decoder.layers.1.self_attn.q_proj.base": 8,
             "model.decoder.layers.0.self_attn.q_proj.lora_dropout.default": 16,
             "model.decoder.layers.1.self_attn.q_proj.lora_dropout": 128,
             "model.decoder.layers.1.self_attn.q_proj.lora_A.default": 32,
             "model.decoder.layers.1.self_attn.q_proj.lora_A": 64}
    groups = memcheck._modules_by_group({"modules": [{"module": m, "bytes": b} for m, b in names.items()]})
    assert {g: (v["bytes"], v["count"]) for g, v in groups.items()} == {
        "model.decoder.layers.*": (3, 2), "model.decoder.layers.*.self_attn.q_proj": (268, 2),
        "model.decoder.layers.*.self_attn.q_proj.lora_dropout": (144, 2),
        "model.decoder.layers.*.self_attn.q_proj.lora_A": (96, 1)}   # one layer's, named two ways


def test_diff_puts_b_in_b_column_and_concludes_where_the_excess_is(train_tiny):
    short = json.loads(json.dumps(train_tiny("--steps", 2, "--seq", 64, "--ckpt", "none")))
    long = json.loads(json.dumps(train_tiny("--steps", 2, "--seq", 192, "--ckpt", "none")))
    peak = memcheck.diff(short, long)[0]
    assert peak == ("peak", short["peak_bytes"], long["peak_bytes"]) and peak[2] > peak[1]
    table = memcheck.format_diff(short, long, "short.json", "long.json").splitlines()
    peak_line = next(line.split() for line in table if line.startswith("peak "))
    assert peak_line[1:4] == [memcheck.mib(peak[1]), memcheck.mib(peak[2]),
                              f"{(peak[2] - peak[1]) / memcheck.MiB:+.1f}"]
    ending = table[-1]
    assert ending.startswith(f"B's peak is {peak[2] / peak[1]:.2f}x A's (+")
    assert "the excess is in activations" in ending
    assert ", mostly " in ending or ", the largest part in " in ending
    assert "the saving is in" in memcheck.format_diff(long, short).splitlines()[-1]


@pytest.mark.parametrize("status", ["oom", "error", "interrupted"])
def test_diff_says_first_when_a_side_did_not_finish(train_tiny, status):
    report = json.loads(json.dumps(train_tiny("--steps", 2)))
    failed = dict(report, status=status, error="it stopped")
    first = memcheck.format_diff(report, failed).splitlines()[0]
    assert first.startswith("WARNING: B ") and "it stopped" in first
    assert not memcheck.format_diff(report, report).startswith("WARNING")


# ---------------------------------------------------------------- diff on the command line

def test_diff_on_the_command_line_puts_the_longer_run_in_b_with_a_positive_b_minus_a(train_tiny,
                                                                                       tmp_path, capsys):
    # Mistake: diff swapping A and B (in diff(), in its table, or in reading the two files).
    short, long = tmp_path / "short.json", tmp_path / "long.json"
    memcheck.write_report(short, train_tiny("--steps", 2, "--seq", 64, "--ckpt", "none"))
    memcheck.write_report(long, train_tiny("--steps", 2, "--seq", 192, "--ckpt", "none"))
    a, b = memcheck.read_report(short), memcheck.read_report(long)
    assert b["peak_bytes"] > a["peak_bytes"]   # the oracle: more tokens, more memory

    out = json.loads(run_main(memcheck.main, capsys, "diff", short, long, "--json").stdout)
    rows = {r["row"]: (r["a_bytes"], r["b_bytes"]) for r in out["rows"]}
    assert rows["peak"] == (a["peak_bytes"], b["peak_bytes"])
    assert out["config_differences"]["seq"] == [64, 192]
    assert out["conclusion"].startswith(f"B's peak is {b['peak_bytes'] / a['peak_bytes']:.2f}x A's (+")

    text = run_main(memcheck.main, capsys, "diff", short, long).stdout.splitlines()
    header = next(line for line in text if "short.json MiB" in line)
    assert header.index("short.json MiB") < header.index("long.json MiB")
    peak = next(line.split() for line in text if line.startswith("peak "))
    assert peak[1:5] == [memcheck.mib(a["peak_bytes"]), memcheck.mib(b["peak_bytes"]),
                         f"{(b['peak_bytes'] - a['peak_bytes']) / MiB:+.1f}",
                         f"{b['peak_bytes'] / a['peak_bytes']:.2f}x"]
    assert float(peak[3]) > 0


def test_diff_json_and_the_max_ratio_gate(train_tiny, tmp_path, capsys):
    short, long = tmp_path / "short.json", tmp_path / "long.json"
    memcheck.write_report(short, train_tiny("--steps", 2, "--seq", 64))
    memcheck.write_report(long, train_tiny("--steps", 2, "--seq", 192))
    probe = tmp_path / "probe.json"
    memcheck.write_report(probe, probed(*peft_opt()))
    done = run_main(memcheck.main, capsys, "diff", short, probe, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["schema"] == "memcheck-diff/1"
    rows = {r["row"]: (r["a_bytes"], r["b_bytes"]) for r in out["rows"]}
    assert rows["load peak"][0] > 0 and rows["load peak"][1] is None   # not measured, never 0
    assert [r["row"] for r in out["rows"]][0] == "peak" and "leak per step (bytes)" in rows
    assert out["config_differences"]["seq"] == [64, 32] and "lr" not in out["config_differences"]
    assert out["warnings"] == {"a": [], "b": []} and out["conclusion"].startswith("B's peak is")
    text = run_main(memcheck.main, capsys, "diff", short, probe).stdout
    assert "B was measured by memcheck's probe" in text and "load peak" in text and "not measured" in text
    ratio = memcheck.read_report(long)["peak_bytes"] / memcheck.read_report(short)["peak_bytes"]
    gate = run_main(memcheck.main, capsys, "diff", short, long, "--max-ratio",
                    f"{ratio * 0.99:.4f}")
    assert gate.returncode == 1 and "over --max-ratio" in gate.stderr
    assert run_main(memcheck.main, capsys, "diff", short, long, "--max-ratio",
                    f"{ratio * 1.01:.4f}").returncode == 0
    stopped = tmp_path / "stopped.json"   # an OOM stops early, at a smaller peak: never a pass
    memcheck.write_report(stopped, dict(memcheck.read_report(short), status="oom"))
    for a, b, side in ((long, stopped, "B"), (stopped, long, "A")):   # the baseline's OOM as much
        gate = run_main(memcheck.main, capsys, "diff", a, b, "--max-ratio", "100")
        assert gate.returncode == 1 and f"{side} oom" in gate.stderr, side
    caught = tmp_path / "caught.json"   # a model that caught OOMs skipped work: never a pass either
    memcheck.write_report(caught, dict(memcheck.read_report(short), warnings=[CAUGHT]))
    gate = run_main(memcheck.main, capsys, "diff", long, caught, "--max-ratio", "100")
    assert gate.returncode == 1 and "B's model caught out-of-memory errors (oom_caught)" in gate.stderr
    written = tmp_path / "written.json"   # the report written as memory ran out, the run then killed
    memcheck.write_report(written, dict(memcheck.read_report(short), mid_run=True))
    gate = run_main(memcheck.main, capsys, "diff", long, written, "--max-ratio", "100")
    assert gate.returncode == 1 and "B never wrote its last report" in gate.stderr
    assert "WARNING: B's report was written during its run" in run_main(memcheck.main, capsys, "diff", long,
                                                                        written).stdout


def test_max_ratio_refuses_a_report_with_no_training_peak_in_one_line_naming_it(tmp_path, capsys):
    # A probe closed before any phase ends "ok" at 0 bytes: no ratio to or from it means anything.
    empty, run = tmp_path / "empty.json", tmp_path / "run.json"
    probe_loop(steps=0).save(empty)
    probe_loop(steps=1).save(run)
    assert memcheck.read_report(empty)["peak_bytes"] == 0 < memcheck.read_report(run)["peak_bytes"]
    for a, b in ((empty, run), (run, empty)):
        line = one_error_line(run_main(memcheck.main, capsys, "diff", a, b, "--max-ratio", "1.5"))
        assert line.startswith(f"memcheck.py: error: {empty}: measured no training peak"), line


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not JSON"),
    ('{"peak_bytes": 1}', "not a memcheck report"),
    ('{"schema": "memcheck/0", "peak_bytes": 1}', "schema 'memcheck/0'"),
    (b"\x80\x04\x95\x00pickle", "not JSON"),
    (lambda r: r.update(peak_bytes="645 MiB"), "field 'peak_bytes' is str"),
    (lambda r: r.update(peak_bytes=True), "field 'peak_bytes' is bool True, expected an integer"),
    (lambda r: r.update(peak_bytes=-4404019), "field 'peak_bytes' is int -4404019, expected an integer, 0 or"),
    (lambda r: r["categories"].update(gradients=-1), "field categories.gradients is int -1, expected an"),
    (lambda r: r["leak"].pop("detected"), "field leak.detected is missing, expected true or false"),
    (lambda r: r["phases"].update(forward=5), "field phases['forward'] is int 5, expected an object"),
    (lambda r: r.update(ranks=[1]), "(rank 0): the report is int 1, expected an object"),
    (lambda r: r.update(modules=[{"bytes": 3}]), "field modules[0].module is missing"),
    (lambda r: r.update(oom="x"), "field oom is str 'x', expected an object"),
    (lambda r: r.update(ranks=[{}, {}]), "(rank 0): field 'config' is missing"),
    (lambda r: r.update(rank_reports=[1]), "field 'rank_reports' is [1], expected file names"),
    (lambda r: r.update(status="done"), "status 'done', expected one of ok, oom, error, interrupted"),
])
def test_diff_rejects_files_that_are_not_reports_of_this_schema(tmp_path, content, message, capsys):
    good = tmp_path / "good.json"
    probe_loop(steps=1).save(good)
    bad = tmp_path / "bad.json"
    if callable(content):   # a good report with one field spoilt
        report = memcheck.read_report(good)
        content(report)
        content = json.dumps(report)
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    done = run_main(memcheck.main, capsys, "diff", good, bad)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "bad.json" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "no command; expected diff A.json B.json"),
    (["frob"], "unknown command 'frob'; expected diff"),
    (["diff", "a.json"], "the following arguments are required: B.json"),
    (["diff", "a.json", "b.json", "--max-ratio", "0"], "--max-ratio 0.0: must be a positive number"),
    (["diff", "a.json", "b.json", "--json", "--markdown"], "not allowed with argument --json"),
])
def test_the_command_line_refuses_bad_usage_in_one_line(argv, message, capsys):
    line = one_error_line(run_main(memcheck.main, capsys, *argv))
    assert line.startswith("memcheck.py: error: ") and message in line, line


def test_diff_of_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "r.json"
    probe_loop(steps=2).save(path)
    done = subprocess.Popen([sys.executable, "memcheck.py", "diff", path, path], cwd=os.path.dirname(__file__),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done.stdout.close()   # the reader is gone before the first line, as with `| head -0`
    errors = done.stderr.read()
    assert done.wait(timeout=HANG_SECONDS) == 0 and errors == ""


def test_diff_runs_where_torch_cannot_be_imported_and_help_imports_no_torch(tmp_path):
    import re
    import subprocess
    import sys
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    probe_loop(steps=2).save(a)
    probe_loop(steps=3, width=64).save(b)
    expected = memcheck.format_diff(memcheck.read_report(a), memcheck.read_report(b), "a.json", "b.json")
    no_torch = "import runpy, sys; sys.modules['torch'] = None; "   # `import torch` now fails
    scripts = {"as a script": no_torch + "sys.argv[0] = 'memcheck.py'; runpy.run_path('memcheck.py', "
                                          "run_name='__main__')",
               "imported": no_torch + "import memcheck; sys.exit(memcheck.main(sys.argv[1:]))"}
    here = os.path.dirname(__file__)
    for how, script in scripts.items():
        done = subprocess.run([sys.executable, "-c", script, "diff", str(a), str(b)], cwd=here,
                              capture_output=True, text=True, timeout=HANG_SECONDS)
        assert done.returncode == 0 and done.stdout == expected + "\n", (how, done.stderr)
    for flags in (["--help"], ["diff", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "memcheck.py", *flags], cwd=here,
                              capture_output=True, text=True, timeout=HANG_SECONDS)
        assert done.returncode == 0 and "memcheck" in done.stdout
        assert not re.search(r"\|\s+torch$", done.stderr, re.M), f"memcheck.py {flags} imported torch"


HELPS = {"memcheck-diff": (["diff", "--help"], ["memcheck.py diff", "--markdown", "--json"])}


@pytest.mark.parametrize("case", HELPS)
def test_every_command_has_its_own_help(case, capsys):
    argv, mentioned = HELPS[case]
    out = help_text(memcheck.main, capsys, *argv)
    assert [flag for flag in mentioned if flag not in out] == []


# ---------------------------------------------------------------- diff against a run that stopped loading

@pytest.fixture(scope="module")
def stopped_and_full(tiny_model, tmp_path_factory):
    """Paths of two reports: one run out of memory while loading (nothing of training measured),
    and a full run of the same model."""
    tmp = tmp_path_factory.mktemp("stopped")
    stopped, full = tmp / "stopped.json", tmp / "full.json"
    flags = ["--model", tiny_model, "--device", "cpu", "--steps", "2"]
    with pytest.raises(torch.OutOfMemoryError):   # a limit the model's own weights pass
        ref_train.train(ref_train.parse_args([*flags, "--max-memory", "0.3", "--report", str(stopped)]),
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


@pytest.mark.parametrize("b_ratio, stopped, expected", [
    (0.83, "B", "no saving to read: B ran out of memory in optimizer at step 1, its peak so far 0.83x "
                "the other's"),
    (1.5, "B", "B's peak is 1.50x A's (+50.0 MiB); the excess is in activations (+50.0 MiB); B ran out of "
               "memory in optimizer at step 1"),
    (1.25, "A", "no excess to read: A ran out of memory in optimizer at step 1, its peak so far 0.80x "
                "the other's")])
def test_the_diffs_conclusion_reads_no_saving_from_a_run_that_ran_out_of_memory(b_ratio, stopped, expected):
    # B's figures stop where memory ran out: "B's peak is 0.83x A's; the saving is in optimizer state"
    a, b = synthetic(1.0), synthetic(b_ratio)
    (a if stopped == "A" else b).update(status="oom", oom={"phase": "optimizer", "step": 1, "message": "..."})
    assert memcheck.conclusion(a, b, memcheck.diff(a, b)) == expected
    healthy = synthetic(0.83)
    assert "the saving is in activations" in memcheck.conclusion(a, healthy, memcheck.diff(a, healthy))


def test_rank_rows_are_by_rank_where_a_rank_wrote_no_report():
    # a skipped rank moved every later one up a row: rank 2's peak read as rank 1's, which was blamed
    ranked = lambda peaks: [dict(synthetic(p), rank=rank) for rank, p in peaks.items()]
    a = dict(synthetic(1.0), ranks=ranked({0: 1.0, 2: 3.0}), unreported_ranks=[1])
    b = dict(synthetic(1.0), ranks=ranked({0: 1.0, 1: 1.0, 2: 3.0}))
    rows = {row[0]: row[1:] for row in memcheck.diff(a, b) if row[0].startswith("rank ")}
    MiB = memcheck.MiB
    assert rows == {"rank 0 peak": (100 * MiB, 100 * MiB), "rank 1 peak": (None, 100 * MiB),
                    "rank 2 peak": (300 * MiB, 300 * MiB)}


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


def test_a_verdict_on_a_budget_estimated_per_token_says_so_and_why():
    report = synthetic(1.0)
    assert memcheck.verdict(report) == "measured peak 1.00x the budget: as expected"   # traced
    report["budget"]["method"] = "formula: the layer does not run on meta (KeyError: 'gate')"
    assert memcheck.verdict(report) == (
        "measured peak 1.00x the budget: as expected; the budget is a per-token estimate: the layer does "
        "not run on meta (KeyError: 'gate')")


def test_a_warning_of_exactly_three_percent_of_the_peak_is_weighty_and_one_byte_less_is_not():
    report = synthetic(1.0)
    three = 3 * report["peak_bytes"] // 100   # the peak is 100 MiB: 3% of it is a whole number of bytes
    report["warnings"] = [{"kind": "output_kept", "bytes": three, "message": "..."},
                          {"kind": "graph_kept", "bytes": three - 1, "message": "..."}]
    assert memcheck.weighty_warnings(report) == [f"output_kept {memcheck.mib(three)} MiB"]


def test_a_run_that_does_not_train_as_it_should_is_named_however_few_parameters_or_bytes():
    report = synthetic(1.0)
    report["warnings"] = [{"kind": "no_grad", "count": 1, "of": 10, "message": "..."},
                          {"kind": "oom_caught", "count": 1, "caught_in": ["model.layers.0"],
                           "message": "..."},
                          {"kind": "eval_mode", "message": "..."}]
    assert memcheck.weighty_warnings(report) == [
        "oom_caught (1x, in model.layers.0)", "no_grad (1 of 10 trainable parameters got no gradient)",
        "eval_mode (dropout off)"]


def evaluated_loop(monkeypatch, inside):
    """A Probe's report of two steps, each with an evaluation of 100 s on a fake clock (the steps'
    phases take 1 s each) after its step (`inside`: before probe.step(), as Lightning validates
    between accumulated micro-batches; else after, as the trainers' hooks do) that keeps 256 KiB
    of logits, then 4 MiB: out of memory at the 1 MiB limit."""
    now = [0.0]
    monkeypatch.setattr(memcheck.time, "perf_counter", lambda: now[0])
    model = nn.Linear(32, 32)
    optimizer = torch.optim.AdamW(model.parameters())
    probe = memcheck.Probe(model, optimizer, max_memory_mib=1, log=lambda *a: None)

    def evaluate(size):
        with probe.phase("eval"), torch.no_grad():
            now[0] += 100.0
            torch.empty(size)

    losses = []
    with pytest.raises(torch.OutOfMemoryError), probe:
        for size in (2**16, 2**20):
            for phase, work in (("forward", lambda: losses.append(model(torch.randn(4, 32)).sum())),
                                ("backward", lambda: losses[-1].backward()),
                                ("optimizer", lambda: (optimizer.step(), optimizer.zero_grad()))):
                with probe.phase(phase):
                    now[0] += 1.0
                    work()
            if inside:
                evaluate(size)
            probe.step(losses[-1])
            if not inside:
                evaluate(size)
    return probe.report()


def test_an_evaluation_between_steps_is_the_last_finished_steps_and_no_part_of_the_next(monkeypatch):
    # a trainer's evaluation after step 1: it was step 2's, in its time and peak, and an OOM in it
    # came "in eval at step 2"
    report = evaluated_loop(monkeypatch, inside=False)
    assert [s["seconds"] for s in report["steps"]] == [3.0, 3.0]
    assert report["phases"]["eval"]["step"] == 1
    assert report["steps"][1]["peak_bytes"] < 2**18 <= report["phases"]["eval"]["peak_bytes"]
    assert report["oom"]["phase"] == "eval" and report["oom"]["step"] == 2
    assert "OUT OF MEMORY in eval after step 2" in memcheck.format_report(report)


def test_an_evaluation_inside_a_step_is_that_steps_without_its_time_and_one_after_the_last_is_checked(
        monkeypatch):
    # (an evaluation inside a step was labelled with the step before; one after the last step, with
    # no step after it, was never checked)
    report = evaluated_loop(monkeypatch, inside=True)
    assert [s["seconds"] for s in report["steps"]] == [3.0]
    assert report["oom"]["step"] == 2 and "OUT OF MEMORY in eval at step 2" in memcheck.format_report(report)
    model = nn.Linear(32, 32)
    with memcheck.Probe(model, log=lambda *a: None) as probe:
        with probe.phase("forward"):
            loss = model(torch.randn(4, 32)).square().mean()
        with probe.phase("backward"):
            loss.backward()
        probe.step(loss)
        with probe.phase("eval"):   # after the last step, without torch.no_grad()
            model(torch.randn(64, 32)).sum()
    [warning] = probe.report()["warnings"]
    assert warning["kind"] == "grad_in_eval" and "during 'eval' after step 1 " in warning["message"]


def test_a_loop_without_phases_is_measured_whole_at_each_step_whatever_evaluation_runs_between(monkeypatch):
    # (an evaluation phase between steps made every later step "phased": not measured as a step,
    # and timed with the evaluation)
    now = [0.0]
    monkeypatch.setattr(memcheck.time, "perf_counter", lambda: now[0])
    model = nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memcheck.Probe(model, optimizer, log=lambda *a: None) as probe:
        for _ in range(3):
            now[0] += 1.0
            loss = model(torch.ones(2, 64)).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            probe.step(loss)
            with torch.no_grad(), probe.phase("eval"):
                now[0] += 100.0
                torch.empty(2**16)   # larger than anything the steps make
    report = probe.report()
    assert [s["seconds"] for s in report["steps"]] == [1.0, 1.0, 1.0]
    assert (report["phases"]["step"]["step"], report["peak_phase"]) == (3, "eval")
    assert all(0 < s["peak_bytes"] < 2**18 for s in report["steps"])


def test_a_negative_leak_prints_as_none_and_growth_that_is_no_leak_as_zero():
    # growth in a run whose report found no leak (a 4-byte evaluation loss kept from step 2 on)
    # read "1" in the leak row
    a, b = synthetic(1.0, leak_per_step=1.0), synthetic(1.0, leak_per_step=-3072.0)
    row = next(line for line in memcheck.format_diff(a, b).splitlines() if line.startswith("leak per step"))
    assert row.split()[4:7] == ["0", "none", "+0"], row


@pytest.mark.parametrize("a_leaks, flag", [(False, "LEAK in B"), (True, "-")])
def test_the_leak_row_flags_b_only_where_a_does_not_leak_as_well(a_leaks, flag):
    a, b = synthetic(1.0, leak_per_step=4096.0 * a_leaks), synthetic(1.0, leak_per_step=4096.0)
    a["leak"]["detected"], b["leak"]["detected"] = a_leaks, True
    row = next(line for line in memcheck.format_diff(a, b).splitlines() if line.startswith("leak per step"))
    assert row.endswith(f"  {flag}"), row


def test_the_reserved_row_is_trainings_not_the_loads():
    # CUDA's reserved bytes, per phase: loading (a resize_token_embeddings) keeps its own, not diff's.
    a, b = synthetic(1.0), synthetic(1.0)
    for report, load, forward in ((a, 900, 100), (b, 50, 200)):
        report["phases"] = {name: {"peak_bytes": 1, "live_bytes": 1, "reserved_bytes": n * MiB}
                            for name, n in (("load", load), ("forward", forward))}
    assert ("reserved", 100 * MiB, 200 * MiB) in memcheck.diff(a, b)


def test_a_run_stopped_while_loading_differs_only_by_what_it_was_given(stopped_and_full):
    # its targets were never resolved: "targets: ['auto'] -> ['q_proj', 'v_proj']"
    stopped, full = map(memcheck.read_report, stopped_and_full)
    assert memcheck.config_differences(stopped, full) == {"max_memory": [0.3, None]}


def test_where_the_results_went_is_no_configuration_difference():
    a, b = synthetic(1.0), synthetic(1.0)
    a["config"] = {"bs": 2, "report": "a.json", "snapshot": "a.pickle", "markdown": False,
                   "model_config": "/runs/a-model"}
    b["config"] = {"bs": 4, "report": "b.json", "snapshot": None, "markdown": True,
                   "model_config": "/runs/b-model"}
    assert memcheck.config_differences(a, b) == {"bs": [2, 4]}


@pytest.mark.parametrize("a_does", [[], ["DoRA"]])
def test_diff_says_what_a_probed_stack_does_that_the_other_run_does_not(a_does):
    # The reference has no key for DoRA: "same configuration" alone hid why B costs more.
    a, b = synthetic(1.0), synthetic(1.1)
    a["config"] = {"not_reproduced": a_does}
    b["config"] = {"probe": True, "not_reproduced": ["DoRA", "trainable tokens"]}
    said = "B does what the other does not, and ref_train.py has no flag for: "
    expected = ["DoRA", "trainable tokens"][len(a_does):]
    assert f"{said}{', '.join(expected)}; part of the difference may be that" in memcheck.format_diff(a, b)
    said = "; what only B does (ref_train.py has no flag for it): "
    assert concluded(a, b).endswith(said + ", ".join(expected))
    assert "does what the other" not in memcheck.format_diff(b, b)


def holding(fields=(), **categories):
    """A report like synthetic()'s whose peak is what `categories` hold (MiB each); `fields` replaced."""
    cats = dict(dict.fromkeys(memcheck.CATEGORIES, 0), **{c: n * MiB for c, n in categories.items()})
    return dict(synthetic(1.0), categories=cats, peak_bytes=sum(cats.values()), **dict(fields))


def concluded(a, b):
    return memcheck.conclusion(a, b, memcheck.diff(a, b))


@pytest.mark.parametrize("ratio, same", [(1.005, True), (0.995, True), (1.02, False), (0.98, False)])
def test_diff_says_two_trainings_cost_the_same_only_within_one_percent(ratio, same):
    # Mistake: "the same" widened (to the verdict's 3%, or 5%).
    said = concluded(synthetic(1.0), synthetic(ratio))
    assert said.startswith("the two trainings cost the same (within 1%)") == same, said


def test_the_excess_is_never_a_category_that_shrank():
    # B grows two categories and shrinks a third by more than either grew, 20 MiB over in all.
    a = holding(activations=100, temporaries=100, optimizer_state=100)
    b = holding(activations=135, temporaries=125, optimizer_state=60)
    assert "; the excess is in activations (+35.0 MiB)" in concluded(a, b), concluded(a, b)
    assert "; the saving is in activations (-35.0 MiB)" in concluded(b, a), concluded(b, a)


def test_a_change_that_one_decimal_of_mib_would_show_as_zero_is_said_in_kib():
    # A tiny model's diff read "B's peak is 1.03x A's (+0.0 MiB); the excess is in activations (+0.0 MiB)".
    a, b = synthetic(1.0), synthetic(1.0003)
    a["peak_bytes"] = a["categories"]["activations"] = 1 * MiB
    b["peak_bytes"] = b["categories"]["activations"] = 1 * MiB + 30 * 1024
    assert concluded(a, b) == "B's peak is 1.03x A's (+30.0 KiB); the excess is in activations (+30.0 KiB)"
    assert memcheck.signed_mib(0) == "+0.0 MiB" and memcheck.signed_mib(-MiB) == "-1.0 MiB"


def test_an_op_is_named_only_where_it_holds_most_of_a_modules_excess():
    mlp = lambda **ops: {"modules": [{"module": "layers.0.mlp", "bytes": sum(ops.values()) * MiB,
                                      "ops": {op: n * MiB for op, n in ops.items()}}]}
    a = holding(mlp(mm=30, relu=30, add=40), activations=100)
    most = holding(mlp(mm=60, relu=30, add=40), activations=130)     # all 30 MiB more in mm
    spread = holding(mlp(mm=40, relu=40, add=50), activations=130)   # 10 MiB more in each of three
    assert concluded(a, most).endswith(", mostly layers.*.mlp (x1) (+30.0 MiB, op mm)"), concluded(a, most)
    assert concluded(a, spread).endswith(", mostly layers.*.mlp (x1) (+30.0 MiB)"), concluded(a, spread)


def test_a_module_with_half_the_excess_or_less_is_named_its_largest_part_not_most_of_it():
    # fc1's +144.0 MiB of the careless diff's +585.7 MiB read "mostly"
    held = lambda **mib: holding({"modules": [{"module": f"layers.0.{name}", "bytes": n * MiB,
                                               "ops": {"mm": n * MiB}} for name, n in mib.items()]},
                                 activations=sum(mib.values()))
    assert concluded(held(attn=10, mlp=10, norm=10), held(attn=22, mlp=20, norm=18)).endswith(
        ", the largest part in layers.*.attn (x1) (+12.0 MiB, op mm)")
    assert concluded(held(attn=10, mlp=10), held(attn=20, mlp=20)).endswith(   # exactly half
        ", the largest part in layers.*.attn (x1) (+10.0 MiB, op mm)")


def test_bytes_made_a_level_lower_in_the_other_run_are_no_modules_excess():
    # A KV cache on in training: keys and values made by cat in self_attn, where the reference's
    # k_proj and v_proj make them; the stack's real excess (DoRA's) is elsewhere. The conclusion
    # named self_attn and its cat.
    modules = lambda **mib: {"modules": [
        {"module": "layers.0." + name.replace("__", "."), "bytes": n * MiB,
         "ops": {"cat" if name == "attn" else "mm": n * MiB}} for name, n in mib.items()]}
    a = holding(modules(attn=0, attn__k_proj=20, attn__v_proj=20, attn__q_proj__magnitude=0),
                activations=40)
    b = holding(modules(attn=40, attn__k_proj=0, attn__v_proj=0, attn__q_proj__magnitude=15),
                activations=55)
    assert concluded(a, b).endswith(", mostly layers.*.attn.q_proj.magnitude (x1) (+15.0 MiB, op mm)"), \
        concluded(a, b)
    # and a module whose own small change is opposite its contents' is not where they went
    layer = lambda own, inside: holding({"modules": [
        {"module": "layers.0", "bytes": own * MiB, "ops": {"add": own * MiB}},
        *({"module": f"layers.0.{name}", "bytes": inside * MiB, "ops": {"mm": inside * MiB}}
          for name in ("attn", "mlp"))]}, activations=own + 2 * inside)
    assert concluded(layer(10, 0), layer(9, 20)).endswith(", mostly layers.*.attn (x1) (+20.0 MiB, op mm)")
    # and where the moved bytes hide a real excess of the same module (a padding mask beside a KV
    # cache), its net excess and its op are named, not the cat of what moved
    attn = lambda k_v, **ops: holding({"modules": [
        {"module": "layers.0.attn", "bytes": sum(ops.values()) * MiB,
         "ops": {o: n * MiB for o, n in ops.items()}},
        *({"module": f"layers.0.attn.{name}", "bytes": k_v * MiB, "ops": {"mm": k_v * MiB}}
          for name in ("k_proj", "v_proj"))]}, activations=2 * k_v + sum(ops.values()))
    said = concluded(attn(20, sdpa=5), attn(0, sdpa=5, cat=40, where=15))
    assert said.endswith(", mostly layers.*.attn (x1) (+15.0 MiB, op where)"), said
    # and a small move (autocast's copy of lora_B's weight, made in q_proj where the einsum form reads
    # it) beside an op only A had leaves the op that made the excess named: it was left out, being
    # more than the net
    q_proj = lambda lora_b, **ops: holding({"modules": [
        {"module": "layers.0.q_proj", "bytes": sum(ops.values()) * MiB,
         "ops": {o: n * MiB for o, n in ops.items()}},
        {"module": "layers.0.q_proj.lora_B", "bytes": lora_b * MiB, "ops": {"_to_copy": lora_b * MiB}}]},
        activations=lora_b + sum(ops.values()))
    said = concluded(q_proj(2, mul=8), q_proj(0, _to_copy=2, bmm=256))
    assert said.endswith(", mostly layers.*.q_proj (x1) (+248.0 MiB, op bmm)"), said
    # (and moved bytes that two ops carry still leave the op of the real excess named)
    said = concluded(attn(20, sdpa=5), attn(0, sdpa=5, cat=20, stack=20, where=15))
    assert said.endswith(", mostly layers.*.attn (x1) (+15.0 MiB, op where)"), said


@pytest.mark.parametrize("forward, backward", [(80, 100), (120, 100)])
def test_a_forward_and_a_backward_stand_for_an_hf_trainers_forward_backward_by_the_larger_peak(
        forward, backward):
    # The two phases' peak taken together is the larger of their peaks, never their sum.
    phases = lambda **peaks: {"phases": {p.replace("_", "+"): {"peak_bytes": n * MiB, "live_bytes": 0}
                                         for p, n in peaks.items()}}
    reference = holding(phases(forward=forward, backward=backward), activations=100)
    trainer = holding(phases(forward_backward=100), activations=100)
    rows = {what: (x, y) for what, x, y in memcheck.diff(reference, trainer)}
    assert rows["forward+backward peak"] == (max(forward, backward) * MiB, 100 * MiB)


@pytest.mark.parametrize("heavier", ["A", "B"])
def test_the_conclusion_names_the_heavier_sides_largest_temporary_and_warnings(heavier):
    # The excess (or the saving) is the heavier side's: its tensor and its warnings explain it.
    big = holding({"temporaries": [{"bytes": 60 * MiB, "shape": [8, 2048, 1024], "dtype": "float32",
                                    "op": "mm", "module": "lm_head"}],
                   "warnings": [{"kind": "output_kept", "bytes": 40 * MiB, "message": "..."}]},
                  temporaries=100, activations=100)
    small = holding({"temporaries": [{"bytes": 10 * MiB, "shape": [2, 2048, 640], "dtype": "float32",
                                      "op": "mm", "module": "lm_head"}]},
                    temporaries=50, activations=100)
    said = concluded(big, small) if heavier == "A" else concluded(small, big)
    sign = "-" if heavier == "A" else "+"
    assert said.endswith(f"in temporaries ({sign}50.0 MiB), the largest part [8, 2048, 1024] float32 from mm "
                         f"in lm_head ({sign}50.0 MiB); {heavier} warns output_kept 40.0 MiB"), said


def test_the_conclusion_says_where_the_peaks_are_when_they_are_in_different_phases():
    # an evaluation that gathers its logits: B's peak in eval, its categories against A's backward's
    a, b = holding(activations=100), holding({"peak_phase": "eval"}, temporaries=150)
    assert concluded(a, b).startswith("B's peak is 1.50x A's (+50.0 MiB), in eval where A's is in backward; ")
    assert concluded(a, a).startswith("the two trainings cost the same")
    assert "where A's is in" not in concluded(a, holding(activations=150))
    for same in ("forward+backward", "step"):   # (the HF Trainer's one phase; a loop without phases)
        assert "where A's is in" not in concluded(a, holding({"peak_phase": same}, activations=150))


def test_the_conclusion_names_the_temporary_that_changed_not_the_largest():
    # The largest temporary, a gradient of the logits, grew 8 KiB; a new [4, 128, 64] one came.
    made = lambda *rows: [{"bytes": n, "shape": shape, "dtype": "float32", "op": op, "module": module}
                          for n, shape, op, module in rows]
    logits = (2 * MiB, [512, 1000], "nll_loss_backward", "(no module)")
    a = holding({"temporaries": made(logits)}, temporaries=2)
    b = holding({"temporaries": made((2 * MiB + 8192, [516, 1000], *logits[2:]),
                                     (MiB // 2, [4, 128, 64], "embedding", "embed_tokens"))},
                temporaries=2.5)
    assert concluded(a, b).endswith("the largest part [4, 128, 64] float32 from embedding in embed_tokens "
                                    "(+0.5 MiB)"), concluded(a, b)


def test_the_conclusion_says_a_difference_is_the_batch_shapes_when_each_run_is_as_budgeted(train_tiny):
    # two runs at seq 64 and 128 read "the excess is in activations, the largest part in
    # _log_softmax", as if something in B were to blame
    short, long = (train_tiny("--steps", 2, "--seq", seq) for seq in (64, 128))
    said = concluded(short, long)
    assert said.startswith("B's peak is ") and " at another batch shape (seq: 64 -> 128; each as its budget " \
        "expects); the excess is in " in said, said


@pytest.mark.parametrize("listed", [5, 6], ids=["every one listed", "one left out"])
def test_the_conclusion_names_a_temporary_that_grew_more_than_its_category(listed):
    # an evaluation's gathered logits, 7 MiB, where A's backward temporaries were gone: +6 MiB of
    # temporaries in all, and the rule "grew by no more than the category" named a 1 MiB one. One
    # missing from A's list counts as A's smallest listed, where the list leaves some out.
    made = lambda *rows: [{"bytes": int(n * MiB), "shape": shape, "dtype": "float32", "op": op,
                           "module": "(no module)"} for n, shape, op in rows]
    a = holding({"temporaries": made(*[(0.5, [128, 1000], f"op{i}") for i in range(5)])},
                temporaries=listed / 2)
    b = holding({"peak_phase": "eval",
                 "temporaries": made((7, [16, 64, 1790], "cat"), (1, [256, 1000], "mm"))},
                temporaries=listed / 2 + 6)
    grew = "+7.0" if listed == 5 else "+6.5"
    said = concluded(a, b)
    assert said.endswith("the excess is in temporaries (+6.0 MiB), the largest part [16, 64, 1790] float32 "
                         f"from cat in (no module) ({grew} MiB, others shrank)"), said
    said = concluded(b, a)   # the saving: the others grew
    assert said.endswith(f"from cat in (no module) (-{grew[1:]} MiB, others grew)"), said


def test_the_conclusion_names_either_sides_warnings_where_the_peaks_are_the_same():
    # an evaluation without no_grad between training steps: the training peak unchanged, its
    # grad_in_eval was named only beside an excess
    clean = holding({}, activations=100)
    warned = holding({"warnings": [{"kind": "grad_in_eval", "bytes": 40 * MiB, "message": "..."}]},
                     activations=100)
    same = "the two trainings cost the same (within 1%): 100.0 and 100.0 MiB"
    assert concluded(clean, warned) == same + "; B warns grad_in_eval 40.0 MiB"
    assert concluded(warned, clean) == same + "; A warns grad_in_eval 40.0 MiB"
    assert concluded(clean, clean) == same


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


def test_a_no_grad_evaluation_outside_any_phase_before_training_does_not_set_the_batch_shape():
    model, optimizer = peft_opt()
    with memcheck.Probe(model, optimizer) as probe:
        with torch.no_grad():
            model(input_ids=torch.zeros(8, 64, dtype=torch.long))
        user_loop(probe, model, optimizer, token_batches(2))
    assert (probe.report()["config"]["bs"], probe.report()["config"]["seq"]) == (2, 32)


def test_the_baseline_takes_the_checkpointing_that_ran_not_the_one_configured():
    model, optimizer = peft_opt(ckpt="non-reentrant")
    model.eval()   # checkpointing enabled, and never run
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, token_batches(2))
    assert probe.report()["config"]["baseline_command"].endswith("--ckpt none")


@pytest.mark.parametrize("flags, said, ckpt", [
    ([True] * 4, True, "--ckpt manual"), ([False] * 4, False, "--ckpt none"),
    ([True, False] * 2, 2, "--ckpt manual --ckpt-every 2"),
    ([True, False, False, False], 4, "--ckpt manual --ckpt-every 4"),
    ([True, False, False, True], 3, "--ckpt manual --ckpt-every 3"),
    ([True, True, False, True], [True, True, False, True], None),     # no every-N-th pattern
    ([False, True] * 2, [False, True] * 2, None),                      # not from the first layer
], ids=["all", "none", "every-2", "first-only", "every-3", "irregular", "from-the-second"])
def test_checkpointing_of_some_layers_is_said_every_nth_where_it_is_and_the_baseline_reproduces_it(
        flags, said, ckpt):
    assert memcheck._checkpointing(flags) == said
    config = {"bs": 2, "seq": 32, "adapters": "peft_lora", "param_bytes_by_dtype": {"float32": 4}, "r": 4,
              "alpha": 8, "experts": 1, "dropout": 0.0, "targets": ["q_proj"], "checkpointing": said}
    command = memcheck.baseline_command(config)
    if ckpt is None:   # ref_train picks every N-th layer from the first, or all, or none
        assert command is None
        layers = ", ".join(str(i) for i, c in enumerate(flags) if c)
        assert f"none; layers {layers} were checkpointed" in memcheck.reference_line(dict(config, probe=True))
    else:
        assert command.endswith(ckpt)
        args = ref_train.parse_args(command.split()[2:] + ["--device", "cpu"])
        assert budget._per_layer(args.ckpt != "none" and args.ckpt_every, len(flags)) == flags


def test_the_baseline_of_16_bit_base_weights_under_autocast_keeps_their_dtype():
    model, _ = peft_opt()
    model.get_base_model().to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:   # fp32 adapters beside bf16 base weights, as PEFT's autocast_adapter_dtype
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable)
    with memcheck.Probe(model, optimizer) as probe:
        user_loop(probe, model, optimizer, token_batches(2), autocast_dtype=torch.bfloat16)
    assert "--precision bf16-mixed --weights-dtype bf16 " in probe.report()["config"]["baseline_command"]


# ---------------------------------------------------------------- one report per rank

def test_a_rank_path_fills_in_rank_or_puts_rank_n_before_the_extension():
    assert memcheck.rank_paths("out/stack.json", 3) == ["out/stack.json", "out/stack.rank1.json",
                                                        "out/stack.rank2.json"]
    assert memcheck.rank_paths("run{rank}/stack.json", 2) == ["run0/stack.json", "run1/stack.json"]
    assert memcheck.rank_paths("stack.json", 1) == ["stack.json"]


def ranks_of_a_run(path, batch_sizes, log=lambda *a: None):
    """A PEFT loop run once per rank of len(batch_sizes), in this process (torch.distributed's rank
    and world size faked), rank r at batch size batch_sizes[r], each with a Probe writing to `path`."""
    with pytest.MonkeyPatch.context() as patch:
        for rank, bs in enumerate(batch_sizes):
            patch.setattr(memcheck, "rank_and_world", lambda rank=rank: (rank, len(batch_sizes)))
            model, optimizer = peft_opt()
            with memcheck.Probe(model, optimizer, path=path, log=log) as probe:
                user_loop(probe, model, optimizer, token_batches(2, bs=bs))


# (the launcher's name, the environment it gives process {rank} of 2)
LAUNCHED = {"torchrun": ("torchrun", {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "{rank}"}),
            "srun": ("srun", {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "{rank}", "SLURM_NTASKS": "2"}),
            "openmpi": ("mpirun", {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "{rank}"}),
            "hydra": ("mpirun", {"PMI_SIZE": "2", "PMI_RANK": "{rank}"}),
            # an interactive srun step's variables, inherited by the mpirun inside it
            "mpirun-in-an-srun-step": ("mpirun", {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0",
                                                  "OMPI_COMM_WORLD_SIZE": "2",
                                                  "OMPI_COMM_WORLD_RANK": "{rank}"})}


def no_launcher(patch):
    """No launcher's variables in the environment (a test run under srun or mpirun has some)."""
    for _, *variables in memcheck._LAUNCHERS:
        for name in variables:
            patch.delenv(name, raising=False)


def probed_under_a_launcher(path, rank, log, joins=False, launcher="torchrun"):
    """A PEFT loop under a Probe writing to `path` in process `rank` of 2 that `launcher` started (its
    environment), in no process group; `joins`: one comes up inside the probe's scope (faked)."""
    model, optimizer = peft_opt()
    with pytest.MonkeyPatch.context() as patch:
        no_launcher(patch)
        for name, value in LAUNCHED[launcher][1].items():
            patch.setenv(name, value.format(rank=rank))
        with memcheck.Probe(model, optimizer, path=path, log=log) as probe:
            if joins:
                patch.setattr(memcheck, "rank_and_world", lambda: (rank, 2))
            user_loop(probe, model, optimizer, token_batches(2, bs=2))


@pytest.mark.parametrize("launcher", LAUNCHED)
def test_processes_a_launcher_started_in_no_process_group_each_write_their_own_report(tmp_path, launcher):
    lines = []
    for rank in (0, 1):
        probed_under_a_launcher(str(tmp_path / "stack.json"), rank, lines.append, launcher=launcher)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".json")) == ["stack.json", "stack.rank1.json"]
    assert lines[1].endswith(f"{tmp_path}/stack.rank1.json (process 1 of the 2 {LAUNCHED[launcher][0]} "
                             "started; in no process group, each trains alone)"), lines[1]
    assert "\nthe reference for this stack: python ref_train.py" in lines[0]   # process 0 alone prints it
    reports = [memcheck.read_report(tmp_path / name) for name in ("stack.json", "stack.rank1.json")]
    assert all((r["rank"], r["world_size"], r["status"]) == (0, 1, "ok") for r in reports)
    os.remove(tmp_path / "stack.json")   # process 0 killed before it wrote: diff points at the other's
    with pytest.raises(memcheck.ReportError, match=re.escape(f"are there ({tmp_path}/stack.rank1.json)")):
        memcheck.read_report(tmp_path / "stack.json")


def test_a_process_group_that_comes_up_inside_the_scope_makes_the_report_a_ranks(tmp_path):
    lines = []
    for rank in (0, 1):
        probed_under_a_launcher(str(tmp_path / "stack.json"), rank, lines.append, joins=True)
    beside = f"; ranks but 0 add .rankN to {tmp_path}/stack.json, which has no {{rank}})"
    assert lines[1].endswith(f"{tmp_path}/stack.rank1.json (rank 1 of 2{beside}"), lines[1]
    for rank, name in enumerate(["stack.json", "stack.rank1.json"]):
        report = memcheck.read_report(tmp_path / name)
        assert (report["rank"], report["world_size"], report["config"]["world_size"]) == (rank, 2, 2)


def test_a_rank_in_the_environment_without_its_launcher_is_not_taken_for_one(tmp_path, monkeypatch):
    no_launcher(monkeypatch)
    monkeypatch.setenv("RANK", "1")   # a stale export, another launcher's
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")   # sbatch's one process, in a job of two tasks, not srun's
    monkeypatch.setenv("SLURM_NTASKS", "2")
    probe_loop(path=str(tmp_path / "stack.json"))
    assert os.listdir(tmp_path) == ["stack.json"]


@pytest.fixture(scope="module")
def two_runs_of_two_ranks(tmp_path_factory):
    """(balanced, imbalanced): rank 0 of each at batch size 2, rank 1 at 2 and 4; rank 0's path."""
    root = tmp_path_factory.mktemp("ranks")
    ranks_of_a_run(str(root / "balanced" / "stack.json"), (2, 2))
    ranks_of_a_run(str(root / "imbalanced" / "stack.json"), (2, 4))
    return str(root / "balanced" / "stack.json"), str(root / "imbalanced" / "stack.json")


def test_each_rank_writes_its_own_report_says_so_and_records_every_ranks_path(tmp_path, monkeypatch):
    from transformers import PretrainedConfig
    written, save = [], PretrainedConfig.save_pretrained
    monkeypatch.setattr(PretrainedConfig, "save_pretrained",
                        lambda self, folder, **kw: written.append(folder) or save(self, folder, **kw))
    lines = []
    ranks_of_a_run(str(tmp_path / "stack.json"), (2, 2), log=lines.append)
    ranks_of_a_run(str(tmp_path / "r{rank}.json"), (2, 2), log=lines.append)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".json")) == [
        "r0.json", "r1.json", "stack.json", "stack.rank1.json"]
    # the model's config once, beside rank 0's report, where every rank's baseline points
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith("-model")) == ["r0-model", "stack-model"]
    assert sorted(written) == [f"{tmp_path}/r0-model", f"{tmp_path}/stack-model"]   # by rank 0 alone
    assert all(memcheck.read_report(tmp_path / name)["config"]["model_config"] == f"{tmp_path}/{model}"
               for name, model in [("stack.rank1.json", "stack-model"), ("r1.json", "r0-model")])
    assert lines[0].count("\n") == 1 and lines[0].splitlines()[1].startswith(
        "the reference for this stack: torchrun --nproc_per_node 2 ref_train.py --strategy ddp --bs 2 ")
    beside = f"; ranks but 0 add .rankN to {tmp_path}/stack.json, which has no {{rank}})"
    assert lines[0].splitlines()[0].endswith(f"{tmp_path}/stack.json (rank 0 of 2{beside}"), lines[0]
    assert lines[1].endswith(f"{tmp_path}/stack.rank1.json (rank 1 of 2{beside}"), lines[1]
    assert "\n" not in lines[1]   # the baseline is in rank 0's line only
    assert lines[3].endswith(f"{tmp_path}/r1.json (rank 1 of 2)"), lines[3]
    for rank, name in enumerate(["stack.json", "stack.rank1.json"]):
        report = memcheck.read_report(tmp_path / name)
        assert (report["rank"], report["world_size"]) == (rank, 2)
        assert report["rank_reports"] == ["stack.json", "stack.rank1.json"]
        assert (report["config"]["strategy"], report["config"]["world_size"]) == ("ddp", 2)


def test_the_probes_line_is_one_write_so_that_ranks_sharing_a_terminal_do_not_run_together(
        tmp_path, monkeypatch):
    writes = []

    class Terminal:
        write, flush = writes.append, staticmethod(lambda: None)
    monkeypatch.setattr(sys, "stdout", Terminal())
    model, optimizer = peft_opt()
    with memcheck.Probe(model, optimizer, path=str(tmp_path / "stack.json")) as probe:
        user_loop(probe, model, optimizer, token_batches(1))
    [line] = [w for w in writes if w.startswith("memcheck: peak")]
    assert line.endswith("\n") and all(w.endswith("\n") for w in writes), writes


def test_a_probe_without_a_path_saved_by_each_rank_writes_the_config_its_baseline_names(tmp_path,
                                                                                        monkeypatch):
    for rank in range(2):
        monkeypatch.setattr(memcheck, "rank_and_world", lambda rank=rank: (rank, 2))
        model, optimizer = peft_opt()
        with memcheck.Probe(model, optimizer) as probe:
            user_loop(probe, model, optimizer, token_batches(1))
        report = probe.save(str(tmp_path / f"r{rank}.json"))
        assert os.path.isfile(os.path.join(report["config"]["model_config"], "config.json")), rank


def test_diff_compares_two_runs_rank_by_rank_and_names_the_rank_with_the_largest_excess(
        two_runs_of_two_ranks, capsys):
    balanced, imbalanced = two_runs_of_two_ranks
    result = run_main(memcheck.main, capsys, "diff", balanced, imbalanced)
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    peaks = [memcheck.read_report(p)["peak_bytes"] for p in memcheck.rank_paths(imbalanced, 2)]
    assert rows["rank 0 peak"][3:5] == [memcheck.mib(peaks[0]), memcheck.mib(peaks[0])]
    assert rows["rank 1 peak"][4] == memcheck.mib(peaks[1]) and peaks[1] > peaks[0]
    assert rows["peak"][2] == memcheck.mib(peaks[1])   # a run's peak is its largest rank's
    ending = result.stdout.splitlines()[-1]
    assert "; rank 1 has the largest excess (+" in ending, ending


CAUGHT = {"kind": "oom_caught", "count": 3, "caught_in": ["lora"], "message": "memory ran out 3 times ..."}


def test_an_oom_caught_on_one_rank_is_named_in_the_run_diff_reads_and_counted_over_ranks():
    clean = [holding({"rank": 0}, activations=100), holding({"rank": 1}, activations=100)]
    on_one = [holding({"rank": 0}, activations=100),
              holding({"rank": 1, "warnings": [CAUGHT]}, activations=99)]
    on_both = [holding({"rank": r, "warnings": [CAUGHT]}, activations=100) for r in (0, 1)]
    a, one, both = (memcheck.with_ranks(dict(ranks[0], ranks=ranks), "stack.json")
                    for ranks in (clean, on_one, on_both))
    assert one["rank"] == 0 and [w["kind"] for w in one["warnings"]] == ["oom_caught"]   # rank 0 is read
    assert concluded(a, one).endswith("; B warns oom_caught (3x, in lora, on rank 1)"), concluded(a, one)
    assert concluded(a, both).endswith("; B warns oom_caught (6x, in lora, on ranks 0, 1)")
    assert "only B warns: oom_caught: on rank 1: memory ran out" in "\n".join(memcheck._diff_notes(a, one))


def test_a_warning_of_another_rank_is_weighed_against_that_ranks_peak_and_names_it():
    stopped = {"rank": 0, "status": "oom", "oom": {"phase": "forward", "step": 1, "message": "out of memory"}}
    for kept_mib, named in ((20, []), (60, ["output_kept 60.0 MiB, on rank 1"])):   # 2% and 6% of rank 1's
        kept = {"kind": "output_kept", "bytes": kept_mib * MiB, "message": "..."}
        ranks = [holding(stopped, activations=100),
                 holding({"rank": 1, "warnings": [kept]}, activations=1000)]
        run = memcheck.with_ranks(dict(ranks[0], ranks=ranks), "stack.json")
        assert run["rank"] == 0 and memcheck.weighty_warnings(run) == named   # read at the rank that ran out


def test_the_rank_named_for_the_largest_excess_is_the_one_that_grew_most_not_the_heaviest():
    # Rank 0 grows by 40 MiB; rank 1, each run's heaviest (whose report diff reads), by 5 MiB.
    a_ranks = [holding(activations=100), holding(activations=150)]
    b_ranks = [holding(activations=140), holding(activations=155)]
    a, b = (dict(ranks[1], ranks=ranks) for ranks in (a_ranks, b_ranks))
    assert concluded(a, b).endswith("; rank 0 has the largest excess (+40.0 MiB)"), concluded(a, b)
    # an excess that rounds to nothing is not one
    b_ranks = [dict(r, peak_bytes=r["peak_bytes"] + 1000) for r in a_ranks]
    assert concluded(a, dict(b_ranks[1], ranks=b_ranks)).startswith("the two trainings cost the same")
    assert "largest excess" not in concluded(a, dict(b_ranks[1], ranks=b_ranks))


def test_two_reports_of_the_same_name_are_told_apart_by_their_paths(two_runs_of_two_ranks, tmp_path, capsys):
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        for rank, path in enumerate(memcheck.rank_paths(two_runs_of_two_ranks[0], 2)):
            shutil.copy(path, tmp_path / folder / ("stack.json" if rank == 0 else "stack.rank1.json"))
    a, b = str(tmp_path / "a" / "stack.json"), str(tmp_path / "b" / "stack.json")
    lines = run_main(memcheck.main, capsys, "diff", a, b).stdout.splitlines()
    header = next(line for line in lines if "B - A MiB" in line)
    assert f"{a} MiB" in header and f"{b} MiB" in header, header


def test_rank_imbalance_names_the_heaviest_rank_and_what_it_holds_more_of_and_balanced_ranks_get_none(
        two_runs_of_two_ranks, capsys):
    balanced, imbalanced = (memcheck.with_ranks(memcheck.read_report(p), p) for p in two_runs_of_two_ranks)
    assert not [w for w in balanced["warnings"] if w["kind"] == "rank_imbalance"]
    [warning] = [w for w in imbalanced["warnings"] if w["kind"] == "rank_imbalance"]
    light, heavy = imbalanced["ranks"]
    more = {c: heavy["categories"][c] - light["categories"][c] for c in memcheck.CATEGORIES}
    assert warning["rank"] == 1 and warning["category"] == max(more, key=more.get)
    assert warning["message"].startswith(f"rank 1's peak is {heavy['peak_bytes'] / light['peak_bytes']:.2f}x "
                                         "rank 0's"), warning["message"]
    result = run_main(memcheck.main, capsys, "diff", *two_runs_of_two_ranks)
    assert f"only B warns: rank_imbalance: {warning['message']}" in result.stdout


def test_a_diff_missing_a_ranks_report_names_it_in_one_line(two_runs_of_two_ranks, tmp_path, capsys):
    alone = tmp_path / "stack.json"
    alone.write_text(open(two_runs_of_two_ranks[0]).read())   # rank 0's report without rank 1's
    line = one_error_line(run_main(memcheck.main, capsys, "diff", alone, two_runs_of_two_ranks[1]))
    assert line.endswith(f"{alone}: rank 1's report is missing: {tmp_path}/stack.rank1.json"), line
    # renamed (a baseline kept under another name): read beside it by the new name, else the old one
    renamed = tmp_path / "baseline.json"
    shutil.copy(alone, renamed)
    line = one_error_line(run_main(memcheck.main, capsys, "diff", renamed, two_runs_of_two_ranks[1]))
    assert line.endswith(f"neither {tmp_path}/baseline.rank1.json nor {tmp_path}/stack.rank1.json"), line
    shutil.copy(memcheck.rank_paths(two_runs_of_two_ranks[0], 2)[1], tmp_path / "baseline.rank1.json")
    result = run_main(memcheck.main, capsys, "diff", renamed, two_runs_of_two_ranks[1])
    assert result.returncode == 0 and "rank 1 peak" in result.stdout, result.stderr
    # rank 0 stopped by torchrun as rank 1 failed: only rank 1 wrote, under {rank}/ or beside
    os.makedirs(tmp_path / "run" / "1")
    shutil.copy(alone, tmp_path / "run" / "1" / "stack.json")
    for missing, written in ((tmp_path / "run" / "0" / "stack.json", tmp_path / "run" / "1" / "stack.json"),
                             (tmp_path / "gone.json", tmp_path / "gone.rank1.json")):
        shutil.copy(alone, written)
        line = one_error_line(run_main(memcheck.main, capsys, "diff", missing, alone))
        assert f"{missing}: cannot read (No such file or directory); the reports of a run of ranks are " \
               f"there ({written}): a rank that its launcher stopped" in line, line
    # numbered folders of single-process runs, and names that only start like a rank's, are none
    os.makedirs(tmp_path / "exp" / "1")
    single = dict(memcheck.read_report(alone), world_size=1)
    memcheck.write_report(tmp_path / "exp" / "1" / "stack.json", single)
    shutil.copy(alone, tmp_path / "gone.rankings.json")
    for rank, world_size in ((2, True), (3, -3)):   # nor a report whose world size is no count
        memcheck.write_report(tmp_path / f"gone.rank{rank}.json", dict(single, world_size=world_size))
    for missing in (tmp_path / "exp" / "3" / "stack.json", tmp_path / "gone.json"):
        line = one_error_line(run_main(memcheck.main, capsys, "diff", missing, alone))
        assert "gone.rankings" not in line and "exp/1" not in line and "gone.rank2" not in line, line
        assert "gone.rank3" not in line, line


def test_a_run_of_ranks_is_read_at_the_rank_that_ran_out_of_memory_not_at_its_fallout(
        two_runs_of_two_ranks, tmp_path, capsys):
    # rank 1 runs out of memory; rank 0 then fails as its process group breaks, heavier by then
    reports = [memcheck.read_report(p) for p in memcheck.rank_paths(two_runs_of_two_ranks[0], 2)]
    reports[0].update(status="error", error="RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection "
                                            "closed by peer [127.0.0.1]:4242")
    reports[1].update(status="oom", peak_bytes=reports[1]["peak_bytes"] // 2,
                      oom={"phase": "forward", "step": 1, "message": "CUDA out of memory (rank 1)"})
    for report, path in zip(reports, memcheck.rank_paths(str(tmp_path / "stack.json"), 2)):
        memcheck.write_report(path, report)
    result = run_main(memcheck.main, capsys, "diff", two_runs_of_two_ranks[0], tmp_path / "stack.json")
    assert "WARNING: B ran out of memory on rank 1 (CUDA out of memory (rank 1))" in result.stdout
    assert "gloo" not in result.stdout and "rank_imbalance" not in result.stdout, result.stdout


# ---------------------------------------------------------------- allocator only: compiled models on CUDA

class FakeAllocator:
    """torch.cuda's counters on a CPU build: they count what the test says it allocates."""

    def __init__(self):
        self.live = self.peak = 0

    def allocate(self, n_bytes):
        self.live += n_bytes
        self.peak = max(self.peak, self.live)

    def free(self, n_bytes):
        self.live -= n_bytes

    def reset_peak(self, device=None):
        self.peak = self.live


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeAllocator()
    counters = {"synchronize": lambda device=None: None, "reset_peak_memory_stats": fake.reset_peak,
                "max_memory_allocated": lambda device=None: fake.peak,
                "memory_allocated": lambda device=None: fake.live,
                "max_memory_reserved": lambda device=None: 2 * fake.peak,
                "get_device_name": lambda device=None: "a faked GPU"}
    for name, fn in counters.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    return fake


def test_allocator_only_on_cpu_is_refused_in_one_line_naming_the_device_and_what_is_allowed():
    with pytest.raises(memcheck.ReportError) as refused:
        memcheck.Probe(nn.Linear(4, 4), allocator_only=True)
    message = str(refused.value)
    assert "\n" not in message and "device 'cpu'" in message and "CUDA" in message, message
    assert "allocator_only=False" in message
    with pytest.raises(memcheck.ReportError, match="max_memory_mib=10 needs the tracker"):
        memcheck.Probe(nn.Linear(4, 4), device="cuda", allocator_only=True, max_memory_mib=10)


@pytest.mark.parametrize("limit", [0, -3, float("nan"), float("inf"), 1e308, "5", True])
def test_a_memory_limit_that_is_not_a_positive_number_is_refused_in_one_line(limit):
    refused = "^" + re.escape(f"max_memory_mib={limit!r}: must be a positive number")
    with pytest.raises(memcheck.ReportError, match=refused):
        memcheck.Probe(nn.Linear(4, 4), max_memory_mib=limit)


def test_allocator_only_leaves_torch_compile_on_and_takes_its_figures_from_the_allocator(fake_cuda):
    import torch._dynamo
    torch._dynamo.reset()
    graphs = []   # a backend that counts what dynamo compiled: under a dispatch mode, nothing
    linear = nn.Linear(8, 8)
    compiled = torch.compile(lambda x: torch.relu(linear(x)).sum(),
                             backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    with memcheck.Probe(linear, optimizer, device="cuda", allocator_only=True, log=lambda *a: None) as probe:
        for _ in range(3):
            with probe.phase("forward"):
                loss = compiled(torch.randn(4, 8))
                fake_cuda.allocate(5000)           # activations
            with probe.phase("backward"):
                loss.backward()
                fake_cuda.allocate(2000)           # a temporary on top of them
                fake_cuda.free(7000)
            with probe.phase("optimizer"):
                optimizer.step()
                fake_cuda.allocate(100)            # kept: a leak of 100 bytes a step
            probe.step(loss)
    assert graphs, "dynamo compiled nothing under the probe"
    assert probe.tracker.live == {}                # the dispatch mode never ran
    report = probe.report()
    assert report["peak_bytes"] == 200 + 7000 and report["peak_phase"] == "backward"
    assert report["phases"]["forward"]["peak_bytes"] == 200 + 5000
    assert report["phases"]["backward"]["reserved_bytes"] == 2 * (200 + 7000)
    assert [s["live_bytes"] for s in report["steps"]] == [100, 200, 300]
    assert report["leak"]["detected"] and report["leak"]["bytes_per_step"] == 100
    [leak] = report["warnings"]
    assert leak["kind"] == "leak" and "tensors" not in leak["message"]   # which ones: not measured
    # what the allocator cannot see is absent, never a zero
    assert report["categories"] == {} and report["modules"] == [] and report["temporaries"] == []
    assert "categories" not in report["phases"]["forward"] and report["budget"] is None
    printed = memcheck.format_report(report)
    assert printed.splitlines()[0] == memcheck.ALLOCATOR_ONLY and "at the peak" not in printed


@pytest.mark.parametrize("stack", STACKS)
def test_allocator_only_runs_through_both_callbacks_with_no_dispatch_mode_and_no_autograd_hooks(
        stack, fake_cuda, tmp_path):
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    make_callback, fit = STACKS[stack]
    model, _ = peft_opt()
    seen = []

    def no_probe_inside(module, args):
        saved_tensor_hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        seen.append((_get_current_dispatch_mode(), saved_tensor_hooks))
        fake_cuda.allocate(1000)

    model.register_forward_pre_hook(no_probe_inside)
    path = tmp_path / "stack.json"
    fit(model, make_callback(path, device="cuda", allocator_only=True, log=lambda *a: None), tmp_path)
    report = memcheck.read_report(path)
    assert seen and set(seen) == {(None, None)}
    assert report["status"] == "ok" and len(report["steps"]) == 3 and report["allocator_only"]
    assert report["peak_bytes"] == 3000 and report["categories"] == {}
    assert "optimizer" in report["phases"] and report["warnings"][0]["kind"] == "leak"


def test_untracked_bytes_are_what_the_allocator_holds_live_beyond_the_tracked_tensors(fake_cuda):
    # The model trains on the CPU, where the tracker (watching "cuda") sees none of it: every byte the
    # faked allocator holds at a phase's end is untracked, and its peak, above that, is no part of it.
    linear = nn.Linear(8, 8)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    with memcheck.Probe(linear, optimizer, device="cuda", log=lambda *a: None) as probe:
        with probe.phase("forward"):
            loss = linear(torch.randn(4, 8)).sum()
            fake_cuda.allocate(5000)
            fake_cuda.free(2000)
        probe.step(loss)
    forward = probe.report()["phases"]["forward"]
    assert (forward["peak_bytes"], forward["live_bytes"], forward["untracked_bytes"]) == (5000, 3000, 3000)


def test_allocator_only_on_a_checkpointed_model_writes_its_report(fake_cuda, tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    model[0].gradient_checkpointing = True   # as Hugging Face's gradient_checkpointing_enable() marks it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memcheck.Probe(model, optimizer, device="cuda", allocator_only=True, path=tmp_path / "r.json",
                        log=lambda *a: None) as probe:
        for _ in range(2):
            loss = model(torch.randn(4, 8)).sum()
            loss.backward()
            fake_cuda.allocate(100)
            probe.step(loss)
    assert memcheck.read_report(tmp_path / "r.json")["steps"][-1]["live_bytes"] == 200


def test_what_an_allocator_only_side_never_measured_reads_not_measured_and_names_no_category(train_tiny):
    measured = train_tiny()
    counted = dict(measured, categories={}, modules=[], temporaries=[], allocator_only=memcheck.ALLOCATOR_ONLY)
    module_rows = [row for row in memcheck.diff(measured, counted) if row[0].startswith(("module ", "op "))]
    assert module_rows and all(row[1] is not None and row[2] is None for row in module_rows), module_rows
    light, heavy = (dict(counted, rank=rank, peak_bytes=peak) for rank, peak in ((0, 100 * MiB), (1, 120 * MiB)))
    warning = memcheck.rank_imbalance([light, heavy])
    assert warning["category"] is None and warning["message"].endswith("(120.0 and 100.0 MiB)"), warning


def test_a_probe_made_before_the_process_group_takes_its_rank_when_it_starts(tmp_path, monkeypatch):
    probe = memcheck.Probe(nn.Linear(4, 4), path=str(tmp_path / "stack.json"), log=lambda *a: None)
    monkeypatch.setattr(memcheck, "rank_and_world", lambda: (1, 2))   # init_process_group ran since
    with probe:
        probe.step()
    assert os.listdir(tmp_path) == ["stack.rank1.json"]


def test_a_failure_while_closing_still_removes_the_probes_hooks_and_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    model = nn.Sequential(nn.Linear(4, 4))
    probe = memcheck.Probe(model, log=lambda *a: None).__enter__()
    assert model[0]._forward_pre_hooks and _get_current_dispatch_mode() is probe.tracker

    def failing_end():
        raise RuntimeError("a device-side assert, say")
    probe.end = failing_end
    with pytest.raises(RuntimeError, match="device-side assert"):
        probe.close()
    assert not model[0]._forward_pre_hooks and _get_current_dispatch_mode() is None
