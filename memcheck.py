"""Where training memory goes: an exact tracker, a probe for any loop, a budget, a diff.

    python memcheck.py budget --bs 2 --seq 128 [ref_train flags]   predict without training
    python memcheck.py diff A.json B.json [--markdown]             compare two reports
    python memcheck.py ablate [ref_train flags]                    one run per suspect
    python memcheck.py sweep --bs 1,2,4 --seq 64,128,256           measured against predicted
    python memcheck.py bench                                       the reference against PEFT

The tracker counts live tensor storage bytes exactly: every op's outputs are seen by a
TorchDispatchMode, each storage is counted once, and a weak reference tells when it is freed. On a
CPU build torch.cuda's counters return 0, so this is the only honest CPU figure; it equals what the
CUDA allocator calls "allocated", apart from its 512-byte rounding. On CUDA the allocator's own
counters give the peak and the tracker still splits it into categories.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

SCHEMA = "memcheck/1"
MiB = 2 ** 20
PHASES = ("load", "forward", "backward", "optimizer")
# Highest priority first: a storage that is both a parameter and saved for backward is a parameter.
CATEGORIES = ("trainable_params", "frozen_params", "gradients", "optimizer_state", "activations",
              "temporaries")
TOP_MODULES = 10
TOP_SURVIVORS = 20


def mib(n_bytes):
    return f"{n_bytes / MiB:.1f}"


class ReportError(ValueError):
    """A file that is not a memcheck report of this schema."""


# ---------------------------------------------------------------- the tracker

class _Storage:
    """One live (or, within the current phase, recently freed) tensor storage."""
    __slots__ = ("nbytes", "created", "freed", "step", "phase", "module", "op", "shape", "dtype",
                 "category", "ref")

    def __init__(self, nbytes, created, step, phase, module, op, tensor):
        self.nbytes, self.created, self.freed = nbytes, created, None
        self.step, self.phase, self.module, self.op = step, phase, module, op
        self.shape, self.dtype = tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")
        self.category = "temporaries"
        self.ref = None

    def alive_at(self, seq):
        return self.created <= seq and (self.freed is None or self.freed > seq)


class Tracker(TorchDispatchMode):
    """Exact live bytes of the tensor storages on one device, with a peak and a per-phase history.

    Events are numbered; a storage remembers when it was created and freed, so the composition of
    memory at the peak can be rebuilt when the phase ends instead of being copied at every new peak.
    """

    def __init__(self, device, limit_bytes=None):
        super().__init__()
        self.device_type = torch.device(device).type
        self.limit_bytes = limit_bytes
        self.live = {}            # storage data_ptr -> _Storage
        self.window = []          # every storage alive at the phase start or created since
        self.live_bytes = self.peak_bytes = self.peak_event = self.event = 0
        self.step, self.phase = 1, None
        self.module_stack = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, func.overloadpacket.__name__)
        return out

    def track(self, tensor, op):
        if tensor.device.type != self.device_type:
            return None
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage
            return None
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live:
            return self.live.get(key)
        self.event += 1
        module = self.module_stack[-1] if self.module_stack else "-"
        record = _Storage(nbytes, self.event, self.step, self.phase, module, op, tensor)
        record.ref = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.live[key] = record
        self.window.append(record)
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_event = self.live_bytes, self.event
        if self.limit_bytes is not None and self.live_bytes > self.limit_bytes:
            raise torch.OutOfMemoryError(
                f"memcheck --max-memory: live tensors reached {mib(self.live_bytes)} MiB, over the "
                f"limit of {mib(self.limit_bytes)} MiB (allocating {tuple(tensor.shape)} "
                f"{record.dtype} in {op}, module {module})")
        return record

    def _free(self, key):
        record = self.live.pop(key, None)
        if record is not None:
            self.event += 1
            record.freed = self.event
            self.live_bytes -= record.nbytes

    def tag(self, tensors, category):
        """Mark the storages of `tensors` as `category` unless they already hold a higher one."""
        rank = CATEGORIES.index(category)
        for t in tensors:
            record = self.track(t, "preexisting")
            if record is not None and CATEGORIES.index(record.category) > rank:
                record.category = category

    def start_window(self):
        self.window = list(self.live.values())
        self.peak_bytes, self.peak_event = self.live_bytes, self.event

    def categories(self, event=None):
        """Bytes per category of what was alive at `event` (default: now)."""
        event = self.event if event is None else event
        totals = dict.fromkeys(CATEGORIES, 0)
        for r in self.window:
            if r.alive_at(event):
                totals[r.category] += r.nbytes
        return totals

    def modules(self, event):
        """Activation bytes alive at `event`, by the module that created them, largest first."""
        by_module = {}
        for r in self.window:
            if r.category == "activations" and r.alive_at(event):
                where = r.module if r.module != "-" else f"({r.op}, outside any module)"
                by_module[where] = by_module.get(where, 0) + r.nbytes
        ranked = sorted(by_module.items(), key=lambda kv: -kv[1])[:TOP_MODULES]
        return [{"module": m, "bytes": b} for m, b in ranked]


# ---------------------------------------------------------------- the probe

class Probe:
    """Measure any training loop; see the module docstring of README.md for where to put it.

        probe = Probe(model, optimizer)
        with probe:
            for batch in batches:
                with probe.phase("forward"):   loss = ...
                with probe.phase("backward"):  loss.backward()
                with probe.phase("optimizer"): optimizer.step(); optimizer.zero_grad()
                probe.step(loss)
        probe.save("stack.json")
    """

    def __init__(self, model=None, optimizer=None, device=None, max_memory_mib=None, config=None):
        if device is None:
            device = next(model.parameters()).device if model is not None else "cpu"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        limit = None if max_memory_mib is None else int(max_memory_mib * MiB)
        self.tracker = Tracker(self.device, limit)
        self.config = config or {}
        self.model = self.optimizer = None
        self.phases, self.steps, self.oom = {}, [], None
        self.peak = {"peak_bytes": 0}
        self._hooks, self._stack = [], contextlib.ExitStack()
        self._step_started = None
        self._pending = (model, optimizer)

    # -- scope
    def __enter__(self):
        self._stack.enter_context(self.tracker)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack))
        if self._pending[0] is not None:
            self.attach(*self._pending)
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._stack.close()
        return False

    def attach(self, model, optimizer=None):
        """Watch `model` (module names, parameter roles) and `optimizer` (its state)."""
        self.model, self.optimizer = model, optimizer
        self._step_started = None
        for name, module in model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(
                lambda *_, name=name or "<root>": self.tracker.module_stack.append(name)))
            self._hooks.append(module.register_forward_hook(self._leave_module, always_call=True))
        self._tag_roles()

    def _leave_module(self, *_):
        if self.tracker.module_stack:
            self.tracker.module_stack.pop()  # returning anything here would replace the output

    def _pack(self, tensor):
        # Called for every tensor autograd saves for backward outside a checkpointed region.
        self.tracker.tag([tensor], "activations")
        return tensor

    def _tag_roles(self):
        if self.model is None:
            return
        params = list(self.model.parameters())
        self.tracker.tag([p for p in params if p.requires_grad], "trainable_params")
        self.tracker.tag([p for p in params if not p.requires_grad], "frozen_params")
        self.tracker.tag(list(self.model.buffers()), "frozen_params")
        self.tracker.tag([p.grad for p in params if p.grad is not None], "gradients")
        if self.optimizer is not None:
            self.tracker.tag([v for state in self.optimizer.state.values() for v in state.values()
                              if isinstance(v, torch.Tensor)], "optimizer_state")

    # -- measurement
    @contextlib.contextmanager
    def phase(self, name):
        tracker = self.tracker
        tracker.phase, tracker.module_stack[:] = name, []
        if self._step_started is None:
            self._step_started = time.perf_counter()
        self._tag_roles()
        tracker.start_window()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        except torch.OutOfMemoryError as e:
            self.oom = {"phase": name, "step": tracker.step, "message": str(e).splitlines()[0]}
            raise
        finally:
            self._end_phase(name)

    def _end_phase(self, name):
        tracker = self.tracker
        self._tag_roles()
        if name == "forward":  # what forward made and still holds is kept for backward
            for r in tracker.window:
                if r.freed is None and r.phase == "forward" and r.step == tracker.step:
                    if CATEGORIES.index(r.category) > CATEGORIES.index("activations"):
                        r.category = "activations"
        stats = {"peak_bytes": tracker.peak_bytes, "live_bytes": tracker.live_bytes,
                 "step": tracker.step, "categories": tracker.categories(tracker.peak_event),
                 "modules": tracker.modules(tracker.peak_event)}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            stats["tracked_peak_bytes"] = stats["peak_bytes"]
            stats["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            stats["live_bytes"] = torch.cuda.memory_allocated(self.device)
            stats["reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        if stats["peak_bytes"] >= self.phases.get(name, {"peak_bytes": -1})["peak_bytes"]:
            self.phases[name] = stats
        else:
            self.phases[name]["live_bytes"] = stats["live_bytes"]
        # The peak is training's; loading (resize_token_embeddings included) keeps its own entry.
        if name != "load" and stats["peak_bytes"] >= self.peak["peak_bytes"]:
            self.peak = dict(stats, phase=name)
        tracker.phase = None

    def step(self, loss=None):
        """Close a training step: record its loss, time and the live bytes it leaves behind."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        step_phases = [p for name, p in self.phases.items()
                       if p["step"] == self.tracker.step and name != "load"]
        self.steps.append({
            "step": self.tracker.step,
            "loss": None if loss is None else float(loss),
            "seconds": now - (self._step_started or now),
            "live_bytes": self.live_bytes(),
            "peak_bytes": max((p["peak_bytes"] for p in step_phases), default=self.live_bytes()),
        })
        self.tracker.step += 1
        self._step_started = None
        return self.steps[-1]

    def live_bytes(self):
        return torch.cuda.memory_allocated(self.device) if self.cuda else self.tracker.live_bytes

    # -- results
    def report(self):
        return {
            "schema": SCHEMA,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "config": self.config,
            "env": environment(self.device),
            "peak_bytes": self.peak["peak_bytes"],
            "peak_phase": self.peak.get("phase"),
            "categories": self.peak.get("categories", {}),
            "modules": self.peak.get("modules", []),
            "phases": {name: {k: v for k, v in stats.items() if k != "modules"}
                       for name, stats in self.phases.items()},
            "steps": self.steps,
            "leak": find_leak(self.steps, self.tracker),
            "oom": self.oom,
        }

    def save(self, path, extra=None):
        write_report(path, dict(self.report(), **(extra or {})))


def _unpack(tensor):
    return tensor


def environment(device):
    import transformers
    device = torch.device(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---------------------------------------------------------------- leaks

def find_leak(steps, tracker):
    """Memory that grows at every step after the first optimizer step is a leak.

    The first step allocates the optimizer state, so growth is measured from the end of step 1.
    Growth at every later step, by any amount, is flagged: the tracker is exact, so a clean loop
    ends every step at the same byte count, and a one-off cache does not grow every step.
    """
    ends = [s["live_bytes"] for s in steps]
    growth = [b - a for a, b in zip(ends, ends[1:])]
    detected = bool(growth) and all(g > 0 for g in growth)
    survivors = []
    if detected:
        last = steps[-1]["step"]
        kept = [r for r in tracker.live.values()
                if r.step < last and r.category in ("activations", "temporaries")]
        kept.sort(key=lambda r: (-r.nbytes, r.created))
        survivors = [{"shape": list(r.shape), "dtype": r.dtype, "bytes": r.nbytes, "step": r.step,
                      "module": r.module, "op": r.op} for r in kept[:TOP_SURVIVORS]]
    return {"detected": detected,
            "bytes_per_step": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else 0.0,
            "step_end_bytes": ends, "survivors": survivors}


# ---------------------------------------------------------------- reports

def write_report(path, report):
    """Write atomically: a reader never sees half a report, even if the run dies while writing."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".memcheck-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def read_report(path):
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})")
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e.msg} at line {e.lineno}); expected a memcheck report")
    if not isinstance(report, dict) or "schema" not in report:
        raise ReportError(f"{path}: not a memcheck report (no 'schema' field)")
    if report["schema"] != SCHEMA:
        raise ReportError(f"{path}: schema {report['schema']!r}, this memcheck reads {SCHEMA!r}")
    return report
