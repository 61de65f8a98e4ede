"""Drive the reference many times: budget, ablate, sweep, bench, families and figures.

    python drive.py budget --bs 2 --seq 128 [--full] [ref_train flags]   predict without training
    python drive.py ablate [ref_train flags]                              one run per suspect
    python drive.py sweep --bs 1,2,4 --seq 64,128,256 [ref_train flags]   measured against predicted
    python drive.py bench [ref_train flags]                               the reference against PEFT
    python drive.py families [ref_train flags]                            the budget on every family
    python drive.py figures [--all]                                       rerun the figures the docs quote

Every command but figures takes ref_train.py's flags for the baseline it varies, and its own flags,
listed by `python drive.py COMMAND --help`. The figures come from memcheck.py, the one file to copy
into your own stack; this file needs the whole project, and imports torch and the project's modules
only in the functions that use them, so that `--help` answers at once.
"""
import argparse
import contextlib
import functools
import gc
import glob
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import flags  # argparse only: the heavy imports wait until the arguments are parsed

# ---------------------------------------------------------------- ablate: one run per suspect

def ablation_variants(args):
    """(name, extra flags) for each suspect, one change from the baseline; the baseline first."""
    other_targets = "all-linear" if args.targets != ("all-linear",) else "auto"
    variants = [
        ("baseline", []),
        # (under --vocab the rows stay, whether tokens are added or not)
        (("added tokens " if args.vocab else "added tokens + resize ") + ("off" if args.add_tokens else "on"),
         ["--no-add-tokens" if args.add_tokens else "--add-tokens"]),
        *[(f"checkpointing {c}", ["--ckpt", c, "--ckpt-every", "1"])
          for c in flags.CKPT_MODES if c != args.ckpt],
        *([("checkpointing every layer", ["--ckpt-every", "1"])] if args.ckpt_every > 1 else []),
        *[(f"{i} implementation", ["--impl", i]) for i in ("lean", "einsum") if i != args.impl],
        ("1 expert" if args.experts != 1 else "4 experts", ["--experts", "1" if args.experts != 1 else "4"]),
        ("LoRA dropout " + ("0" if args.dropout else "0.1"), ["--dropout", "0" if args.dropout else "0.1"]),
        *[(f"precision {p}", ["--precision", p, "--weights-dtype", "fp32"])
          for p in ("32", "16-mixed") if (p, None) != (args.precision, args.weights_dtype)],
        ("bf16 weights under 16-mixed", ["--precision", "16-mixed", "--weights-dtype", "bf16"]),
        ("item injection " + ("off" if args.inject_items else "on"),
         ["--no-inject-items" if args.inject_items else "--inject-items"]),
        (f"targets {other_targets}", ["--targets", other_targets]),
        ("injected leak", ["--inject-leak"] if args.experts > 1 else ["--inject-leak", "--experts", "4"]),
    ]
    return variants


# 16-bit matmuls on a CPU without bf16/fp16 units are emulated: minutes a step at opt-125m's size
# (478 MiB of weights), a tenth of a second for a model of a few MiB. Such runs, and those CPU
# autocast cannot run at all, ablate budgets instead.
SLOW_ON_CPU = "16-bit precision on CPU takes minutes a step at this size: use --device cuda"
NOT_ON_CPU = "CPU autocast cannot mix these weights with 16-bit activations: use --device cuda"
SLOW_WEIGHTS_BYTES = 64 * 2 ** 20


def _sixteen_bit_on_cpu(args):
    return args.device == "cpu" and (args.precision != "32" or args.weights_dtype not in (None, "fp32"))


def _not_run_on_cpu(args, budget):
    """Why a 16-bit variant is budgeted instead of run on the CPU, or None where it runs."""
    import ref_train
    try:
        ref_train.check_runnable(args)
    except ref_train.UsageError:
        return NOT_ON_CPU
    return SLOW_ON_CPU if budget["terms"]["params"] > SLOW_WEIGHTS_BYTES else None


def _run_reference(argv, report_path, timeout=600, threads=None):
    """ref_train.py in its own process; (report or None, error line or None)."""
    from memcheck import read_report
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "ref_train.py"), *argv, "--report", report_path]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=here, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    report = read_report(report_path) if os.path.exists(report_path) else None
    if done.returncode != 0:
        lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        oom = [l for l in lines if "OUT OF MEMORY" in l]
        return report, (oom or lines or [f"exit code {done.returncode}"])[-1]
    return report, None


def ablate(base_argv, log=print, steps=3, run=None):
    """Run the reference once per suspect, each in its own process; returns the rows, sorted.

    run(argv, report_path) -> (report or None, error line or None) runs one variant; the default
    starts `python ref_train.py`, so that no variant inherits another's memory or state. Variants
    run side by side (_side_by_side), each on one thread: a process spends seconds starting up on
    one core, and the figures are per process, so running side by side changes none of them.
    """
    import ref_train
    from memcheck import mib, verdict
    args = _checked_args(base_argv)
    jobs = 1 if run else _side_by_side(args)
    run = run or functools.partial(_run_reference, threads=None if jobs == 1 else 1)
    base_argv = _with_steps(base_argv, steps)
    variants = ablation_variants(args)
    rows = [None] * len(variants)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        def one(i):
            name, flags = variants[i]
            started = time.perf_counter()
            try:
                variant_args = ref_train.parse_args([*base_argv, *flags])
            except ref_train.UsageError:
                variant_args = None   # a bad combination: the run below says why, in its row
            budget = (ref_train.plan(variant_args) if variant_args and _sixteen_bit_on_cpu(variant_args)
                      and not _sixteen_bit_on_cpu(args) else None)
            why = budget and _not_run_on_cpu(variant_args, budget)
            if why:
                report, error, planned = None, f"skipped: {why}", budget["peak_bytes"]
            else:
                report, error = run([*base_argv, *flags], os.path.join(tmp, f"{i}.json"))
                planned = (report.get("budget") or {}).get("peak_bytes") if report else None
            ok = report is not None and error is None
            rows[i] = {"variant": name, "flags": flags, "error": error,
                       "peak_bytes": report["peak_bytes"] if ok else None,
                       "load_peak_bytes": _load_peak(report) if ok else None,
                       "leak_bytes_per_step": report["leak"]["bytes_per_step"] if ok else None,
                       "budget_peak_bytes": planned,
                       "vocab_rows": report["config"].get("vocab_rows") if ok else None,
                       "verdict": verdict(report) if ok else None}
            log(f"{name:<34} " + (f"peak {mib(rows[i]['peak_bytes']):>8} MiB  "
                                  f"load {mib(rows[i]['load_peak_bytes'] or 0):>8} MiB  "
                                  f"({time.perf_counter() - started:.0f} s)" if ok
                                  else error if error.startswith("skipped") else f"FAILED: {error}"))
        list(pool.map(one, range(len(variants))))
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["delta_bytes"] = row["peak_bytes"] - base if row["peak_bytes"] is not None and base else None
    rows[1:] = sorted(rows[1:], key=lambda r: (r["delta_bytes"] is None, -(r["delta_bytes"] or 0)))
    return rows


def _checked_args(argv):
    """ref_train's flags for argv, or ref_train.UsageError naming the bad value. The model and
    --targets are checked against each other only when the model is built: it is built here on the
    meta device (no memory, seconds), so a typo fails before any run, not in every run's row; and
    so is a combination this device cannot run."""
    import ref_train
    args = ref_train.parse_args(argv)
    ref_train.build(args, meta=True)
    ref_train.check_runnable(args)
    return args


def _side_by_side(args):
    """How many variants run at once: one per core; on CUDA, no more than fit in the free memory
    at twice the baseline's budget each."""
    import torch

    import ref_train
    cores = max(1, os.cpu_count() or 1)
    if args.device != "cuda":
        return cores
    free_bytes, _ = torch.cuda.mem_get_info()
    return max(1, min(cores, int(free_bytes // (2 * ref_train.plan(args)["peak_bytes"]))))


def _load_peak(report):
    """Loading's peak (resize_token_embeddings included): the training peak leaves it out."""
    return (report["phases"].get("load") or {}).get("peak_bytes")


def vocabulary_notes(rows):
    """A line for each variant that trains another vocabulary than the baseline's (by over 1%): a
    tokenizer smaller than the model's embeddings, which the baseline's resize shrank."""
    base = rows[0].get("vocab_rows")
    return [f"note: '{r['variant']}' trains {r['vocab_rows']:,} embedding rows, the baseline {base:,}: this "
            "model's tokenizer has fewer tokens than its embeddings have rows, and resizing to it shrank "
            "them, and the logits with them" for r in rows[1:]
            if base and r.get("vocab_rows") and abs(r["vocab_rows"] - base) > 0.01 * base]


def ablation_table(rows):
    from memcheck import MiB, mib
    header = ("variant", "peak MiB", "load peak MiB", "change MiB", "ratio", "leak B/step",
              "budget MiB", "verdict")
    base = rows[0]["peak_bytes"]
    out = []
    for r in rows:
        if r["error"]:
            skipped = r["error"].startswith("skipped")
            out.append((r["variant"], "skipped" if skipped else "failed", "-", "-", "-", "-",
                        mib(r["budget_peak_bytes"]) if r["budget_peak_bytes"] else "-", r["error"][:90]))
            continue
        load = r.get("load_peak_bytes")
        out.append((r["variant"], mib(r["peak_bytes"]), mib(load) if load is not None else "-",
                    f"{r['delta_bytes'] / MiB:+.1f}" if base else "-",
                    f"{r['peak_bytes'] / base:.2f}x" if base else "-",
                    f"{r['leak_bytes_per_step']:,.0f}",
                    mib(r["budget_peak_bytes"]) if r["budget_peak_bytes"] else "-", r["verdict"]))
    return header, out


# ---------------------------------------------------------------- sweep: memory against each variable

SWEEP_VARIABLES = {"bs": "sample", "seq": "token", "r": "unit of rank"}


def _with_steps(argv, steps):
    """argv with --steps `steps` unless it gives --steps itself (--steps 5, --steps=5): a namespace
    that has `steps` already gets no default for it."""
    given = flags.build_parser().parse_known_args(argv, namespace=argparse.Namespace(steps=None))[0]
    return list(argv) if given.steps is not None else [*argv, "--steps", str(steps)]


def _point_argv(point, base_argv, steps):
    """ref_train's flags for one point of a sweep: the baseline's, then the point's values."""
    argv = _with_steps(base_argv, steps)
    for key, value in point.items():
        argv += [_flag_of(key), str(value)]
    return argv


def sweep(points, base_argv, log=print, steps=2):
    """Measure and predict each point ({flag: value}); returns one row per point."""
    import ref_train
    from memcheck import first_line, is_out_of_memory, mib
    argvs = [_point_argv(point, base_argv, steps) for point in points]
    # Every point's flags before the first is measured: a bad base flag or listed value is one
    # line (UsageError) now, not a FAILED row per point after minutes of the others training.
    for argv in argvs:
        _checked_args(argv)
    rows = []
    for point, argv in zip(points, argvs):
        row = dict(point)
        try:
            report = ref_train.train(ref_train.parse_args(argv), log=lambda *_: None)
            row.update(peak_bytes=report["peak_bytes"], budget_bytes=report["budget"]["peak_bytes"])
            row["error"] = row["peak_bytes"] / row["budget_bytes"] - 1
        except (ref_train.UsageError, RuntimeError, MemoryError) as e:
            if not isinstance(e, ref_train.UsageError) and not is_out_of_memory(e):  # only OOM
                raise
            row.update(peak_bytes=None, budget_bytes=None, error=None, failed=first_line(e))
        rows.append(row)
        log("  ".join(f"{k} {v}" for k, v in point.items()) + "  " + (
            f"measured {mib(row['peak_bytes'])} MiB, budget {mib(row['budget_bytes'])} MiB, "
            f"error {row['error']:+.1%}" if row["peak_bytes"] else f"FAILED: {row['failed']}"))
    return rows


def _slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


QUADRATIC_SHARE = 0.05  # seq^2 explaining more of the growth than this is a quadratic law


def fit_growth(rows):
    """MiB per unit of each swept variable (mean slope over the other variables held fixed), and
    whether the peak grows linearly or quadratically in sequence length."""
    from memcheck import MiB
    ok = [r for r in rows if r.get("peak_bytes")]
    growth = {}
    for var in SWEEP_VARIABLES:
        slopes = []
        others = lambda r: tuple((k, v) for k, v in r.items() if k != var and k in
                                 ("bs", "seq", "r", "targets", "experts", "ckpt", "impl"))
        groups = {}
        for r in ok:
            if var in r:
                groups.setdefault(others(r), []).append(r)
        for group in groups.values():
            slope = _slope([float(r[var]) for r in group], [r["peak_bytes"] / MiB for r in group])
            if slope is not None:
                slopes.append(slope)
        if slopes:
            growth[var] = sum(slopes) / len(slopes)
    # Quadratic in seq when peak/seq still rises with seq: a linear law has peak/seq falling
    # towards a constant, a quadratic one keeps climbing.
    shape = None
    by_seq = {}
    for r in ok:
        if "seq" in r:
            key = tuple((k, v) for k, v in r.items() if k in ("bs", "r", "targets", "experts", "ckpt", "impl"))
            by_seq.setdefault(key, []).append(r)
    curvatures = []
    for group in by_seq.values():
        if len({r["seq"] for r in group}) >= 3:
            group.sort(key=lambda r: r["seq"])
            xs = [float(r["seq"]) for r in group]
            ys = [float(r["peak_bytes"]) for r in group]
            curvatures.append(_quadratic_share(xs, ys))
    if curvatures:
        share = sum(curvatures) / len(curvatures)
        quadratic = "quadratic (a seq x seq term: eager attention's scores, or a padding mask)"
        shape = {"quadratic_share": share, "law": quadratic if share > QUADRATIC_SHARE else "linear"}
    elif len({r["seq"] for r in ok if "seq" in r}) == 2:   # (a line through two points says nothing of it)
        shape = {"quadratic_share": None, "law": None}
    return {"mib_per_unit": growth, "seq": shape}



def _quadratic_share(xs, ys):
    """Share of the peak's growth over the swept range that a seq^2 term explains (least squares)."""
    import torch
    a = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0]
    quad = abs(float(coef[2])) * (xs[-1] ** 2 - xs[0] ** 2)
    return quad / max(abs(ys[-1] - ys[0]), 1.0)


def sweep_table(rows):
    from memcheck import mib
    keys = [k for k in rows[0] if k not in ("peak_bytes", "budget_bytes", "error", "failed")]
    header = (*keys, "measured MiB", "budget MiB", "error")
    out = [(*[r[k] for k in keys],
            mib(r["peak_bytes"]) if r["peak_bytes"] else "failed",
            mib(r["budget_bytes"]) if r["budget_bytes"] else "-",
            f"{r['error']:+.1%}" if r["error"] is not None else r.get("failed", "-")[:60]) for r in rows]
    return header, out


def growth_lines(growth):
    lines = [f"{v:.2f} MiB per extra {SWEEP_VARIABLES[k]}" for k, v in growth["mib_per_unit"].items()]
    if growth["seq"] and growth["seq"]["law"] is None:
        lines.append("sequence length: linear or quadratic needs 3 or more --seq values")
    elif growth["seq"]:
        lines.append(f"sequence length: {growth['seq']['law']} "
                     f"(seq^2 explains {growth['seq']['quadratic_share']:.0%} of the growth)")
    return lines


def _pyplot():
    from memcheck import ReportError
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--plot needs matplotlib, which is optional: pip install matplotlib")
    return plt


def _plot(plt, rows, path):
    from memcheck import MiB
    ok = [r for r in rows if r.get("peak_bytes")]
    variables = [v for v in SWEEP_VARIABLES if len({r[v] for r in ok if v in r}) > 1]
    fig, axes = plt.subplots(1, max(len(variables), 1), figsize=(5 * max(len(variables), 1), 4))
    for ax, var in zip(axes if len(variables) > 1 else [axes], variables):
        for label, key, style in (("measured", "peak_bytes", "o"), ("budget", "budget_bytes", "x")):
            ax.plot([r[var] for r in ok], [r[key] / MiB for r in ok], style, label=label)
        ax.set_xlabel(var)
        ax.set_ylabel("peak MiB")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- bench: the reference against its peers

BENCH_BASE = ["--ckpt", "manual", "--impl", "lean", "--experts", "1", "--targets", "q_proj,v_proj",
              "--lora-r", "8", "--precision", "32", "--no-inject-items"]
BENCH_LOSS_CHUNKS = 8


class _Untracked:
    """Stands in for a Probe when only time is measured: no tracker, no overhead."""

    def phase(self, name):
        return contextlib.nullcontext()


def _reference_loop(args):
    """(step(probe) -> loss, modules, optimizer) for the reference trainer."""
    import torch

    import ref_train
    model, items, batches, _ = ref_train.build(args)
    trainable = [p for m in (model, items) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    scaler = torch.amp.GradScaler(args.device, enabled=False)
    trained = ref_train.ILoraModel(model, items, args)
    step = lambda probe: ref_train.train_step(trained, optimizer, scaler, next(batches), args, probe, [])
    return step, torch.nn.ModuleDict({"lm": model, "ilora": items}), optimizer


def _peft_loop(args):
    """The same model, data and shapes through PEFT's LoRA and the model's own checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model

    import ref_train
    model, batches, _, setup = ref_train.build_base(args)
    ref_train.enable_hf_checkpointing(model)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=list(setup["targets"])))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def step(probe):
        batch = {k: v.to(args.device) for k, v in next(batches).items()}
        with probe.phase("forward"):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
        with probe.phase("backward"):
            loss.backward()
        with probe.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, model, optimizer


def _held_bytes(device):
    """What the process holds before a loop is built: on CUDA the allocator's peak counts every
    tensor of the process (an earlier loop's garbage included) and cuBLAS's workspaces."""
    import torch
    gc.collect()
    if device != "cuda":
        return 0   # the tracker counts the loop's own tensors only
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _measure(make_loop, args, steps):
    """Peak bytes over `steps` tracked steps (above what the process held before), and the median
    seconds of `steps` untracked ones."""
    import torch

    from memcheck import Probe
    held = _held_bytes(args.device)
    step, model, optimizer = make_loop(args)
    with Probe(model, optimizer, device=args.device) as probe:
        for _ in range(steps):
            probe.step(step(probe))
    peak = probe.peak["peak_bytes"] - held
    tracked = _median([s["seconds"] for s in probe.steps[1:]])
    del probe
    untracked = []
    for i in range(steps + 1):   # the first step warms up
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(_Untracked())
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i:
            untracked.append(time.perf_counter() - started)
    return {"peak_bytes": peak, "seconds": _median(untracked), "tracked_seconds": tracked}


def _median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else float("nan")


def profiler_peak(fn):
    """fn()'s peak allocation above its start, from torch.profiler's CPU memory events."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def tracker_against_profiler(args):
    """One training step measured by both: (tracker's peak above start, the profiler's)."""
    from memcheck import Probe
    step, model, optimizer = _reference_loop(args)
    step(_Untracked())  # the optimizer state exists before the measured step, as in any later step
    # Garbage freed during the step that was allocated before it would count as negative in the
    # profiler and not at all in the tracker: collect it now and hold the collector off.
    gc.collect()
    gc.disable()
    try:
        with Probe(model, optimizer, device="cpu") as probe:
            start = probe.tracker.live_bytes
            by_profiler = profiler_peak(lambda: step(probe))
    finally:
        gc.enable()
    return probe.peak["peak_bytes"] - start, by_profiler


def bench(base_argv, steps=5, log=print):
    """Every comparison of the benchmark issue; returns rows (what, A, B, ratio, target, met)."""
    import ref_train
    from budget import cuda_workspaces
    args = ref_train.parse_args([*BENCH_BASE, *base_argv])
    rows = []
    # Every loop's peak is taken above what the process held: make cuBLAS's workspaces now, so
    # that the first loop does not pay for them alone.
    cuda_workspaces(args.device)

    def add(what, a, b, unit, target=None, unmet=""):
        ratio = a / b
        rows.append({"comparison": what, "a": a, "b": b, "unit": unit, "ratio": ratio,
                     "target": target, "met": None if target is None else ratio <= target})
        log(f"{what}: {ratio:.2f}" + (f" (target <= {target})" if target else "")
            + (f" ({unmet})" if unmet and not rows[-1]["met"] else ""))

    ref = _measure(_reference_loop, args, steps)
    peft = _measure(_peft_loop, args, steps)
    add("reference / PEFT: peak", ref["peak_bytes"], peft["peak_bytes"], "bytes", 1.0)
    add("reference / PEFT: median step", ref["seconds"], peft["seconds"], "s", 1.05)
    gated = ref_train.parse_args([*BENCH_BASE, *base_argv, "--experts", "4", "--inject-items"])
    lean = _measure(_reference_loop, gated, steps)
    einsum = _measure(_reference_loop, ref_train.parse_args(
        [*BENCH_BASE, *base_argv, "--experts", "4", "--inject-items", "--impl", "einsum"]), steps)
    add("E=4 lean / einsum: peak", lean["peak_bytes"], einsum["peak_bytes"], "bytes")
    add("E=4 lean / einsum: median step", lean["seconds"], einsum["seconds"], "s")
    chunked_args = ref_train.parse_args([*BENCH_BASE, *base_argv, "--loss-chunks", str(BENCH_LOSS_CHUNKS)])
    paired = _interleaved(args, chunked_args, steps)
    per_op = ("the tracker costs the same per op whatever its size: a step of small ops, a small model's, "
              "pays it in full; the target is opt-125m's")
    add("tracker overhead: tracked / untracked step", paired["tracked"], paired["untracked"], "s", 1.10,
        per_op)
    add("probe overhead, PEFT + HF checkpointing: tracked / untracked step", paired["peft tracked"],
        paired["peft untracked"], "s", 1.10, per_op)
    if args.device == "cpu":
        tracked, profiled = tracker_against_profiler(args)
        rows.append({"comparison": "tracker / torch.profiler: peak above start", "a": tracked,
                     "b": profiled, "unit": "bytes", "ratio": tracked / profiled, "target": "1 +- 0.01",
                     "met": abs(tracked / profiled - 1) <= 0.01})
        log(f"tracker / profiler: {tracked / profiled:.4f}" + ("" if rows[-1]["met"] else (
            f" ({profiled - tracked:+,} bytes: the profiler also sees kernels' scratch buffers, no "
            "tensor's storage: a few KiB, more than 1% of a peak under 1 MiB)")))
    chunked = _measure(_reference_loop, chunked_args, steps)
    add(f"reference --loss-chunks {BENCH_LOSS_CHUNKS} / PEFT: peak", chunked["peak_bytes"],
        peft["peak_bytes"], "bytes", 0.82)
    floor = memory_floor(chunked_args)
    add(f"reference --loss-chunks {BENCH_LOSS_CHUNKS} / memory floor", chunked["peak_bytes"], floor, "bytes")
    add(f"reference --loss-chunks {BENCH_LOSS_CHUNKS} / untracked reference: median step",
        paired["chunked"], paired["untracked"], "s", 1.10)
    return rows


def _interleaved(args, chunked_args, steps):
    """Median seconds of the reference's steps untracked, tracked, and untracked with the chunked
    loss, and of PEFT's (HF checkpointing) untracked and tracked, taken in turn (one of each,
    `steps` times, after a warm-up step of each), so that a machine shared with other work slows
    them alike. A tracked step is timed as a user pays for it, from before its forward to after
    probe.step(), each in a Probe of its own."""
    import torch

    from memcheck import Probe
    plain, model, optimizer = _reference_loop(args)
    chunked = _reference_loop(chunked_args)[0]
    peft = _peft_loop(args)

    def timed(fn):
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def tracked(step, model, optimizer):
        with Probe(model, optimizer, device=args.device) as probe:
            return timed(lambda: probe.step(step(probe)))

    runs = {"untracked": lambda: timed(lambda: plain(_Untracked())),
            "tracked": lambda: tracked(plain, model, optimizer),
            "chunked": lambda: timed(lambda: chunked(_Untracked())),
            "peft untracked": lambda: timed(lambda: peft[0](_Untracked())),
            "peft tracked": lambda: tracked(*peft)}
    seconds = {name: [] for name in runs}
    for i in range(steps + 1):
        for name, run in runs.items():
            took = run()
            if i:   # the first round warms up
                seconds[name].append(took)
    return {name: _median(s) for name, s in seconds.items()}


def memory_floor(args):
    """What this training cannot do with less: parameters, LoRA state (weights, gradients, Adam),
    the checkpointed layer inputs, one layer's recomputation and one chunk of logits."""
    import ref_train
    planned = ref_train.plan(args)
    t = planned["terms"]
    return (t["params"] + t["gradients"] + t["optimizer_state"] + t["checkpointed_inputs"]
            + t["activations_per_layer"] + t["logits"])


def bench_table(rows):
    from memcheck import MiB
    fmt = lambda v, unit: f"{v / MiB:.1f} MiB" if unit == "bytes" else f"{v * 1e3:.0f} ms"
    header = ("comparison", "A", "B", "A / B", "target", "met")
    return header, [(r["comparison"], fmt(r["a"], r["unit"]), fmt(r["b"], r["unit"]),
                     f"{r['ratio']:.3f}", r["target"] if r["target"] is not None else "-",
                     {True: "yes", False: "NO", None: "-"}[r["met"]]) for r in rows]


# ---------------------------------------------------------------- figures: rerun what README.md and docs/*.md quote

HERE = os.path.dirname(os.path.abspath(__file__))
QUOTING_FILES = ("README.md", "docs/*.md")   # where figures are quoted, relative to HERE
_NUMBER = re.compile(r"(?<![\w.\-])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")
_ID_COLUMNS = ("seq", "ckpt", "r", "experts", "targets", "impl")  # a row's name, with its first cell
TIME_RANGE = (1 / 3, 3.0)        # a time may be this many times the quoted one and still agree
TIME_RATIO_RANGE = (2 / 3, 1.5)  # a ratio of two times, likewise


def _blocks(text):
    """[(the paragraph before it, the block's lines)] for each fenced code block of a Markdown file."""
    out, before, inside, lines = [], [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                out.append(("\n".join(before[-6:]), lines))
                before, lines = [], []
            inside = not inside
        elif inside:
            lines.append(line)
        else:
            before.append(line)
    return out


def _table_keys(header, row):
    """{column: cell} of a text_table row: cells are right-aligned under their header but the first."""
    edges = [(m.end(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    cells = list(re.finditer(r"\S+(?: \S+)*", row))
    if not cells:
        return {}
    out = {"": cells[0].group().strip()}
    for cell in cells[1:]:
        column = next((name for end, name in edges if end == cell.end()), None)
        if column is not None:
            out[column] = cell.group()
    return out


def _figures(lines):
    """{key: (value, kind)} of every figure in a block's lines: table cells by (row, column), other
    lines by their text with the numbers taken out (and which such line it is) and each number's
    place. kind: "time" (a number of ms, machine-dependent), "loss", or "memory" (every other
    figure: MiB, bytes, ratios of memory, counts)."""
    figures, header, seen = {}, None, {}
    for line in lines:
        if not line.strip():
            header = None
            continue
        if "MiB" in line and not re.search(r"\d\.\d", line):
            header = line
            continue
        if header is not None:
            cells = _table_keys(header, line)
            label = " ".join([cells[""]] + [cells[c] for c in _ID_COLUMNS if c in cells])
            for column, value in cells.items():
                if column and column not in _ID_COLUMNS and _NUMBER.search(value):
                    figures[(label, column)] = (value, "memory")
            continue
        template = re.sub(r"\s+", " ", _NUMBER.sub("#", line.strip()))   # widths vary with the figures
        seen[template] = seen.get(template, 0) + 1
        if seen[template] > 1:
            template += f" (line {seen[template]} of this form)"
        for i, m in enumerate(_NUMBER.finditer(line)):
            after, before = line[m.end():m.end() + 3], line[max(0, m.start() - 5):m.start()]
            kind = "time" if after.startswith(" ms") else "loss" if before == "loss " else "memory"
            figures[(template, i)] = (m.group(), kind)
    return figures


def _markdown_rows(text, first_cell):
    """{(row, column): cell} of the Markdown table whose header starts with first_cell ({} if none)."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith(f"| {first_cell} |")), None)
    if start is None:
        return {}
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for column, cell in zip(header[1:], cells[1:]):
            out[(cells[0], column)] = cell
    return out


def quoting_files():
    """The paths of README.md and docs/*.md, the files whose figures `figures` checks."""
    return [path for pattern in QUOTING_FILES for path in sorted(glob.glob(os.path.join(HERE, pattern)))]


def _block_name(before, lines, commands):
    """(name, command) of a figure block, or (None, None): which rerun its figures come from."""
    body = "\n".join(lines)
    first = lines[0] if lines else ""
    if "step   1 | loss" in body and "printed" in before:
        return "baseline", re.search(r"`(python ref_train.py[^`]*)` printed", before).group(1)
    if first.startswith("variant ") and "drive.py ablate" in before:
        return "ablate", re.search(r"`(python drive.py ablate[^`]*)`", before).group(1)
    if "baseline.json MiB  stack.json MiB" in body and commands:
        return "careless diff", commands[-1]
    if first.split()[:4] == ["bs", "seq", "ckpt", "measured"]:
        return "budget grid", "python drive.py sweep"
    if first.startswith(("phase ", "the weights are")) and "careless line" in before:
        return "probe: careless", "python stack.py careless careless.json"
    if "clean.json MiB  careless.json MiB" in body:
        return "probe: clean vs careless", "python memcheck.py diff clean.json careless.json"
    if "ref.json MiB  clean.json MiB" in body:
        return "probe: reference vs clean", "python memcheck.py diff ref.json clean.json"
    return None, None


def readme_figures(paths=None):
    """The figure blocks of README.md and docs/*.md (or of paths):
    {name: {"command", "figures": [{key, value, kind}], ...}}; an output quoted twice (the README's
    excerpt, the docs' whole) is one block with the figures of both."""
    found, texts = {}, []
    for path in paths or quoting_files():
        texts.append(open(path).read())
        commands = []   # the last block of `python ...` lines: what the next output block is the output of
        for before, lines in _blocks(texts[-1]):
            if lines and lines[0].startswith("python "):
                commands = lines
            if lines and lines[0] == "import sys" and "memcheck.Probe" in "\n".join(lines):
                found["script"] = "\n".join(lines)
            name, command = _block_name(before, lines, commands)
            if name is None:
                continue
            kept = [l for l in lines if not l.startswith(("A was", "B was"))]
            figures = [{"key": k, "value": v, "kind": kind} for k, (v, kind) in _figures(kept).items()]
            block = found.setdefault(name, dict(command=command, figures=[]))
            block["figures"] += figures
            if name == "careless diff":
                block["commands"] = commands
            if name == "budget grid":
                block["points"] = [dict(zip(("bs", "seq", "ckpt"), l.split()[:3])) for l in lines[1:]]
    bench = {k: v for text in texts for k, v in _markdown_rows(text, "comparison").items()}
    found["bench"] = {"command": "python drive.py bench", "figures": [
        {"key": k, "value": v, "kind": "time" if re.search(r"step|tracked", k[0]) else "memory"}
        for k, v in bench.items() if k[1] in ("A", "B", "A / B")]}
    return found


def _compare(expected, actual_lines, log, whole=True):
    if os.environ.get("FIGURES_KEEP"):   # where to keep each rerun's output, to read what changed
        with open(os.path.join(os.environ["FIGURES_KEEP"], f"{len(os.listdir(os.environ['FIGURES_KEEP']))}.txt"), "w") as f:
            f.write("\n".join(actual_lines))
    return _check(expected, {k: v for k, (v, _) in _figures(actual_lines).items()}, log, whole)


def _where(key):
    return f"{key[0]} [{key[1]}]" if isinstance(key[1], str) else f"{key[0].replace('#', '_')} [#{key[1]}]"


def _check(expected, actual, log, whole=False):
    """Each quoted figure against the rerun's {key: value}; returns the number that disagree.
    Memory figures, counts and losses must be equal; times only within a range (machine-dependent).
    whole: the quoted block shows the whole output, so a figure of the rerun it lacks disagrees too."""
    bad = 0
    counts = {"memory": 0, "loss": 0, "time": 0}
    for f in expected:
        key, want = f["key"], f["value"]
        got = actual.get(key)
        where = _where(key)
        counts[f["kind"]] += 1
        if got is None:
            log(f"  MISSING  {where}: quoted {want}, not in the output")
            bad += 1
        elif f["kind"] == "time":
            low, high = TIME_RANGE if "ms" in want or "." not in want else TIME_RATIO_RANGE
            number = lambda v: float(_NUMBER.search(v).group().replace(",", ""))
            ratio = number(got) / number(want) if number(want) else float("nan")
            if not low <= ratio <= high:   # said, not counted: a busy or another machine
                log(f"  TIME     {where}: quoted {want}, now {got} (machine-dependent: outside "
                    f"{low:.2f}x..{high:.2f}x of the quoted one; is this machine busy, or another?)")
        elif got != want:
            log(f"  DIFFERS  {where}: quoted {want}, now {got}" + (
                " (bit for bit means the same machine and the same thread count)"
                if f["kind"] == "loss" else ""))
            bad += 1
    if whole:
        shown = {f["key"] for f in expected}
        for key in sorted((k for k in actual if k not in shown), key=str):
            log(f"  EXTRA    {_where(key)}: now {actual[key]}, not quoted")
            bad += 1
    log(f"  checked {counts['memory']} memory figures and counts exactly, {counts['loss']} losses "
        f"exactly, {counts['time']} times as ranges (machine-dependent, not counted); {bad} disagree")
    return bad


def _run(cmd, cwd, timeout=3600):
    from memcheck import ReportError
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        raise ReportError(f"{' '.join(map(str, cmd))} failed (exit {done.returncode}): "
                          + ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1])
    return done.stdout


def _run_as_written(command, cwd):
    """Run a `python SCRIPT FLAGS` line as the docs quote it, in cwd, with this Python and HERE's SCRIPT."""
    words = shlex.split(command)
    return _run([sys.executable, os.path.join(HERE, words[1]), *words[2:]], cwd)


def _check_baseline(blocks, tmp, log):
    block = blocks["baseline"]
    log(f"baseline: {block['command']}")
    out = _run_as_written(block["command"] + " --report baseline.json", tmp)
    return _compare(block["figures"], out.splitlines(), log)


def _check_careless_diff(blocks, tmp, log):
    block = blocks["careless diff"]
    log("careless diff: " + ", then ".join(block["commands"]))
    for command in block["commands"]:
        if command == blocks["baseline"]["command"] + " --report baseline.json" and \
                os.path.exists(os.path.join(tmp, "baseline.json")):
            continue   # the baseline check ran this very command
        out = _run_as_written(command, tmp)
    return _compare(block["figures"], out.splitlines(), log)


def _check_budget_grid(blocks, tmp, log, measure_grid=False):
    import ref_train
    from memcheck import text_table

    block = blocks["budget grid"]
    log("budget grid: " + ("python drive.py sweep, every point measured" if measure_grid
                           else "the budget column (--all measures every point)"))
    rows = []
    for p in block["points"]:
        argv = ["--bs", p["bs"], "--seq", p["seq"], "--ckpt", p["ckpt"], "--steps", "2"]
        if measure_grid:
            rows.append(sweep([{}], argv, log=lambda *a: None)[0] | p)
        else:
            args = ref_train.parse_args(argv)
            rows.append(dict(p, budget_bytes=ref_train.plan(args)["peak_bytes"], peak_bytes=None, error=None))
    header, table = sweep_table(rows)
    expected = block["figures"] if measure_grid else [f for f in block["figures"] if f["key"][1] == "budget MiB"]
    return _compare(expected, text_table(header, table).splitlines(), log)


def _check_ablate(blocks, tmp, log):
    block = blocks["ablate"]
    log(f"ablate: {block['command']}")
    out = _run([sys.executable, "drive.py", *block["command"].split()[2:]], HERE)
    return _compare(block["figures"], out.splitlines(), log, whole=False)  # the table, not its progress lines


def _check_bench(blocks, tmp, log):
    block = blocks["bench"]
    log(f"bench: {block['command']}")
    header, table = bench_table(bench([], log=lambda *a: None))
    return _check(block["figures"], {(r[0], c): v for r in table for c, v in zip(header[1:], r[1:])}, log)


def _check_probe(blocks, tmp, log):
    py = sys.executable
    script = os.path.join(tmp, "stack.py")
    with open(script, "w") as f:
        f.write(blocks["script"])
    for name in ("memcheck.py", "budget.py"):
        shutil.copy(os.path.join(HERE, name), tmp)
    careless = _run([py, script, "careless", "careless.json"], tmp)
    _run([py, script, "clean", "clean.json"], tmp)
    log("probe: the docs' script, careless")
    # (the docs show the report, not the probe's own lines about where it wrote it)
    bad = _compare(blocks["probe: careless"]["figures"], careless.splitlines(), log, whole=False)
    for name, a, b in (("probe: clean vs careless", "clean.json", "careless.json"),
                       ("probe: reference vs clean", "ref.json", "clean.json")):
        if a == "ref.json":
            command = re.search(r"the reference for this stack: python (ref_train.py .*)", careless).group(1)
            _run([py, *command.split(), "--report", os.path.join(tmp, "ref.json")], HERE)
        out = _run([py, os.path.join(HERE, "memcheck.py"), "diff", a, b], tmp)
        log(f"{name}: memcheck.py diff {a} {b}")
        bad += _compare(blocks[name]["figures"], out.splitlines(), log)
    return bad


FIGURE_CHECKS = {"baseline": _check_baseline, "budget grid": _check_budget_grid,
                 "careless diff": _check_careless_diff, "ablate": _check_ablate, "bench": _check_bench,
                 "probe": _check_probe}
QUICK_SECTIONS = ("baseline", "budget grid", "careless diff")


def figures(sections=QUICK_SECTIONS, measure_grid=False, log=print, paths=None):
    """Rerun each quoted block in `sections` (README.md's and docs/*.md's, or paths'), compare every
    figure; returns the number that disagree."""
    import torch

    blocks = readme_figures(paths)
    log(f"figures of {', '.join(QUOTING_FILES)}, rerun with torch {torch.__version__} on "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in FIGURE_CHECKS.items():
            if name in sections:
                bad += (functools.partial(check, measure_grid=measure_grid) if name == "budget grid"
                        else check)(blocks, tmp, log)
    log("every figure agrees with the docs" if not bad else f"{bad} figures disagree with the docs")
    return bad


# ---------------------------------------------------------------- command line

class CommandLineError(ValueError):
    """A bad drive.py flag: one line naming it, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (memcheck's OneLineParser, without importing torch)."""

    def error(self, message):
        raise CommandLineError(message)


BASELINE_FLAGS = ("Any other flag is ref_train.py's (python ref_train.py --help lists them) and sets the "
                  "baseline the command varies, e.g. --bs 2 --seq 128 --model DIR.")


def _parser(command, summary, *flags, epilog=BASELINE_FLAGS):
    """A command's own parser: its flags, then (the epilog says) every ref_train.py flag for the baseline."""
    p = _Parser(prog=f"drive.py {command}", description=summary, allow_abbrev=False, epilog=epilog)
    for args, kwargs in flags:
        p.add_argument(*args, **kwargs)
    return p


REPORT = (("--report",), dict(metavar="PATH", help="also write the rows as JSON here"))
MARKDOWN = (("--markdown",), dict(action="store_true", help="also print a block for a GitHub issue"))


def _print_and_save(title, table, rows, markdown, report_path):
    """The ending of ablate and bench: the table, the Markdown block if asked, the JSON if asked."""
    from memcheck import markdown_block, text_table, write_report
    header, body = table
    print()
    print(text_table(header, body))
    if markdown:
        print("\n" + markdown_block(title, [(header, body)]))
    if report_path:
        write_report(report_path, rows)


def budget_command(argv):
    p = _parser("budget", "Predict the run's memory without training: the model is built on the meta "
                "device, so nothing is allocated and --model needs only its config.json, and every "
                "term of the budget is printed. With --strategy ddp|fsdp --world-size N: the budget of "
                "the heaviest of N ranks (rank 0's shards, with any rank's padding), without starting them.",
                (("--full",), dict(action="store_true",
                                   help="add a column for full fine-tuning of the same model and shapes")),
                (("--report",), dict(metavar="PATH", help="also write each column's budget as JSON here")),
                MARKDOWN, epilog=BASELINE_FLAGS + " And --world-size N (default 1), the budget's own: the "
                "number of ranks to budget for, with --strategy ddp|fsdp (torchrun's WORLD_SIZE).")
    own, rest = p.parse_known_args(argv)
    flags.check_output_path("--report", own.report)
    import ref_train
    from memcheck import markdown_block, mib, text_table, write_report
    args = ref_train.parse_args(rest, budget_only=True)   # built on meta: a config.json will do
    model, items, batches, setup = ref_train.build(args, meta=True)
    padded = ref_train.has_padding(ref_train.first_batches(args, batches))
    lora = ref_train.plan(args, model, items, padded=padded)
    columns = [("LoRA (this config)", lora)]
    if own.full:
        columns.append(("full fine-tuning", ref_train.plan(args, full=True)))
    names = list(lora["terms"]) + [f"{p} peak" for p in lora["phases"]] + ["predicted peak"]
    rows = []
    for name in names:
        row = [name]
        for _, b in columns:
            value = (b["terms"].get(name) if name in b["terms"] else
                     b["peak_bytes"] if name == "predicted peak" else b["phases"][name.split()[0]])
            row.append(mib(value))
        rows.append(row)
    print(f"budget for --bs {args.bs} --seq {args.seq}, ckpt {flags.ckpt_label(args)}, "
          f"precision {args.precision}, "
          f"{args.experts} experts of rank {args.r // args.experts}, targets {','.join(setup['targets'])}")
    if args.strategy != "none":  # rank 0 holds the longest shards; any rank's padding is counted
        print(f"per rank of {args.world_size} under {args.strategy}: the heaviest rank's"
              + (", whose params, gradients and optimizer state are its shards" if args.strategy == "fsdp"
                 else ""))
    header = ("term (MiB)", *[c for c, _ in columns])
    print(text_table(header, rows))
    print("params by dtype: " + ", ".join(f"{k} {mib(v)} MiB" for k, v in lora["params_by_dtype"].items()))
    if args.device == "cuda" and "cuda_workspaces" not in lora["terms"]:
        print("cuda_workspaces: not measured, no CUDA device here (cuBLAS's workspaces, 65.0 MiB on an "
              "H200 with torch 2.11, come on top)")
    if own.markdown:
        print("\n" + markdown_block("drive.py budget", [(header, rows)]))
    if own.report:
        write_report(own.report, dict(zip(("lora", "full"), (planned for _, planned in columns))))
    return 0


def _one_process_each(command, argv):
    """CommandLineError where argv asks for ranks: ablate, sweep and bench run each point as one
    process (a rank of torchrun's would start every point on every rank)."""
    strategy = flags.build_parser().parse_known_args(argv)[0].strategy
    if strategy != "none":
        raise CommandLineError(
            f"--strategy {strategy}: {command} runs each of its runs as one process; measure ranks with "
            f"`torchrun --nproc_per_node N ref_train.py --strategy {strategy} ...`, or budget them with "
            f"`python drive.py budget --strategy {strategy} --world-size N ...`")


def ablate_command(argv):
    p = _parser("ablate", "Run the reference once per suspect, each one change from the baseline and in "
                "a process of its own, and print the table sorted by the change in peak.",
                REPORT, MARKDOWN)
    own, rest = p.parse_known_args(argv)
    _one_process_each("ablate", rest)
    flags.check_output_path("--report", own.report)
    rows = ablate(rest)
    _print_and_save("drive.py ablate", ablation_table(rows), rows, own.markdown, own.report)
    for note in vocabulary_notes(rows):
        print(note)
    return 0


# ref_train's flags a sweep lists values of, and their separators
_SWEEP_LISTS = {"--bs": ",", "--seq": ",", "--lora-r": ",", "--experts": ",", "--ckpt": ",",
                "--impl": ",", "--targets": "|"}


@functools.cache
def _ref_train_actions():
    """{flag: argparse action} of ref_train.py. A sweep point's key is a flag's dest, the report's
    config key (--lora-r's is r), and a listed value is read with the flag's type."""
    return {flag: action for action in flags.build_parser()._actions for flag in action.option_strings}


def _flag_of(key):
    """ref_train's flag that sets `key` (r: --lora-r)."""
    return next((f for f, a in _ref_train_actions().items() if a.dest == key and f.startswith("--")),
                f"--{key}")


def _sweep_value(flag, value):
    """A listed value of a sweep: an integer for the flags that take one (02 is 2)."""
    if _ref_train_actions()[flag].type is not int or value == "":
        return value
    try:
        return int(value)
    except ValueError:
        from memcheck import ReportError
        raise ReportError(f"{flag} {value}: expected a comma list of integers")


def sweep_command(argv):
    p = _parser("sweep", "Measure and budget every combination of the listed values, then fit how the "
                "peak grows per sample, token and unit of rank, and whether it is linear in seq.",
                *[((flag,), dict(dest=_ref_train_actions()[flag].dest, metavar="V1" + sep + "V2",
                                 help=f"values of ref_train's {flag}, separated by {sep!r}"))
                  for flag, sep in _SWEEP_LISTS.items()],
                REPORT, MARKDOWN,
                (("--plot",), dict(metavar="PNG", help="plot measured and budget against each swept "
                                   "variable (needs matplotlib, which is optional)")))
    own, rest = p.parse_known_args(argv)
    _one_process_each("sweep", rest)
    from memcheck import ReportError, markdown_block, text_table, write_report
    for flag, path in (("--report", own.report), ("--plot", own.plot)):
        flags.check_output_path(flag, path)
    plt = _pyplot() if own.plot else None   # before any point is measured
    axes = {}
    for flag, sep in _SWEEP_LISTS.items():
        key = _ref_train_actions()[flag].dest
        value = getattr(own, key)
        if value is not None:
            axes[key] = [_sweep_value(flag, v) for v in value.split(sep)]
            if "" in axes[key] or len(set(axes[key])) < len(axes[key]):
                raise ReportError(f"{flag} {value!r}: expected non-empty, distinct values separated by "
                                  f"{sep!r}")
    if not axes:
        raise ReportError("sweep needs at least one of " + ", ".join(_SWEEP_LISTS) +
                          " with a list of values, e.g. --bs 1,2,4")
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    rows = sweep(points, rest)
    growth = fit_growth(rows)
    header, table = sweep_table(rows)
    print()
    print(text_table(header, table))
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    if errors:
        print(f"worst budget error {max(errors):.1%} over {len(errors)} points")
    for line in growth_lines(growth):
        print(line)
    if own.markdown:
        print("\n" + markdown_block("drive.py sweep", [(header, table)]) + "\n\n" +
              "\n".join(f"- {line}" for line in growth_lines(growth)))
    if own.report:
        write_report(own.report, {"points": rows, "growth": growth})
    if own.plot:
        _plot(plt, rows, own.plot)
    return 0 if errors else 1  # no point measured: say so in the exit code


def bench_command(argv):
    p = _parser("bench", "The reference against PEFT's LoRA on the same model and data: peak, step "
                "time, the lean and einsum forms, the tracker's overhead and accuracy, the chunked loss.",
                REPORT, MARKDOWN,
                (("--steps",), dict(type=int, default=5, help="measured steps per loop (2 or more); "
                                    "times are medians")))
    own, rest = p.parse_known_args(argv)
    _one_process_each("bench", rest)
    from memcheck import ReportError
    if own.steps < 2:
        raise ReportError(f"--steps {own.steps}: bench needs a whole number of steps, 2 or more")
    flags.check_output_path("--report", own.report)
    rows = bench(rest, steps=own.steps)
    _print_and_save("drive.py bench", bench_table(rows), rows, own.markdown, own.report)
    return 0


# ---------------------------------------------------------------- families: the budget on each

VOCAB = 1000
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=256)
_LLAMA_LIKE = dict(_SMALL, intermediate_size=128, num_key_value_heads=2)
# model_type -> config keywords: the smallest shape of each family that keeps its structure
# (grouped-query attention, gated or fused MLPs, Mixtral's experts, GPT-2's Conv1D, ALiBi).
FAMILIES = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16),
    "phi": dict(_SMALL, intermediate_size=128),
    "phi3": dict(_SMALL, intermediate_size=128, pad_token_id=0),
    "gpt_neox": dict(_SMALL, intermediate_size=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256, vocab_size=VOCAB),
    "falcon": dict(_SMALL, ffn_hidden_size=128),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
    "opt": dict(_SMALL, ffn_dim=128, word_embed_proj_dim=64),
}


def save_family(family, directory):
    """Save FAMILIES[family]'s tiny random model (config and weights, no tokenizer) in directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **FAMILIES[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return str(directory)


FAMILY_RUN = ("--bs", "4", "--seq", "128", "--steps", "2", "--device", "cpu")  # before the user's flags


def families(flags=(), log=print):
    """The budget against the measured peak on a tiny random model of every family, with the
    default targets, checkpointed and not; one row per family and checkpointing. flags: ref_train
    flags for every run, after FAMILY_RUN."""
    import ref_train
    from memcheck import first_line
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            model_dir = save_family(family, os.path.join(tmp, family))
            for ckpt in ("manual", "none"):
                args = ref_train.parse_args([*FAMILY_RUN, *flags, "--model", model_dir, "--ckpt", ckpt])
                try:
                    report = ref_train.train(args, log=lambda *a: None)
                except Exception as e:  # one family that fails does not hide the others
                    rows.append({"family": family, "ckpt": ckpt, "targets": [], "attn": "-",
                                 "peak_bytes": None, "budget_peak_bytes": None, "error": None,
                                 "method": f"failed ({type(e).__name__}: {first_line(e)})"})
                    log(f"{family:<9} ckpt {ckpt:<6} {rows[-1]['method']}")
                    continue
                planned = report["budget"]
                rows.append({"family": family, "ckpt": ckpt, "targets": report["config"]["targets"],
                             "attn": report["config"]["attn"], "peak_bytes": report["peak_bytes"],
                             "budget_peak_bytes": planned["peak_bytes"], "method": planned["method"],
                             "error": report["peak_bytes"] / planned["peak_bytes"] - 1})
                log(f"{family:<9} ckpt {ckpt:<6} error {rows[-1]['error']:+.1%}")
    return rows


def families_table(rows):
    from memcheck import mib
    header = ("family", "targets", "attention", "ckpt", "peak MiB", "budget MiB", "error", "method")
    shown = lambda n: "-" if n is None else mib(n)
    return header, [(r["family"], ",".join(r["targets"]) or "-", r["attn"], r["ckpt"],
                     shown(r["peak_bytes"]), shown(r["budget_peak_bytes"]),
                     "-" if r["error"] is None else f"{r['error']:+.1%}",
                     r["method"] if r["error"] is None else r["method"].split(" (")[0])
                    for r in rows]


def families_command(argv):
    p = _parser("families", "Train a tiny random model of every family transformers ships among "
                "Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma2, Phi, Phi-3, GPT-NeoX, GPT-2, "
                "Falcon, Bloom and OPT (hidden 64, 2 layers; default targets), checkpointed and not, "
                "and print the budget's error on each. Default: --bs 4 --seq 128 --steps 2 --device "
                "cpu; e.g. --precision bf16-mixed, or on a GPU --device cuda --precision 16-mixed "
                "--weights-dtype bf16 (iLoRA's).", MARKDOWN, REPORT)
    own, rest = p.parse_known_args(argv)
    import ref_train
    from memcheck import ReportError
    flags.check_output_path("--report", own.report)
    for flag in ("--model", "--ckpt"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise ReportError(f"{flag}: families sets it (every family, checkpointed and not)")
    ref_train.parse_args([*FAMILY_RUN, *rest])  # bad flags: exit 2 now, before any model is saved
    rows = families(rest)
    _print_and_save("drive.py families", families_table(rows), rows, own.markdown, own.report)
    return 0


def figures_command(argv):
    p = _parser("figures", "Rerun every figure README.md and docs/*.md quote and compare each with the "
                "text: memory figures, counts and losses exactly (losses are bit for bit on the same "
                "machine with the same thread count), times as ranges (machine-dependent). Exit 1 if one "
                "disagrees. Run it before each release of figures.",
                (("--all",), dict(action="store_true", help="also the ablate, bench and probe blocks "
                                  "and every measured point of the budget grid (about an hour on 2 "
                                  "cores); default: " + ", ".join(QUICK_SECTIONS) + " (its budget column)")),
                (("--only",), dict(metavar="NAMES", help="comma list of " + ", ".join(FIGURE_CHECKS))),
                epilog="It takes no other flag: the quoted commands are rerun as written.")
    own = p.parse_args(argv)
    sections = (own.only.split(",") if own.only is not None else list(FIGURE_CHECKS) if own.all
                else QUICK_SECTIONS)
    unknown = [repr(s) if not s else s for s in sections if s not in FIGURE_CHECKS]
    if unknown:
        raise CommandLineError(f"--only {own.only or repr(own.only)}: unknown {', '.join(unknown)}; expected "
                               + ", ".join(FIGURE_CHECKS))
    return 1 if figures(sections, measure_grid=own.all) else 0


COMMANDS = {"budget": budget_command, "ablate": ablate_command, "sweep": sweep_command,
            "bench": bench_command, "families": families_command, "figures": figures_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"drive.py: error: {what}; expected one of {', '.join(COMMANDS)} (--help explains)",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValueError as e:
        if not isinstance(e, CommandLineError):
            import data   # already imported by the command that raised: costs nothing
            import ref_train
            from memcheck import ReportError
            if not isinstance(e, (ReportError, ref_train.UsageError, data.DataError)):
                raise
        print(f"drive.py {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
