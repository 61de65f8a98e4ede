"""memcheck: where training memory goes. One file that needs only torch: copy it next to your code.

In your loop (README.md, "The probe in your stack"):

    probe = memcheck.Probe(model, optimizer, path="stack.json")
    with probe:
        for batch in batches:
            with probe.phase("forward"):   loss = model(**batch).loss
            with probe.phase("backward"):  loss.backward()
            with probe.phase("optimizer"): optimizer.step(); optimizer.zero_grad()
            probe.step(loss)

    lightning.Trainer(callbacks=[memcheck.lightning_callback("stack.json")])
    transformers.Trainer(..., callbacks=[memcheck.hf_callback("stack.json")])

Then compare with the reference:

    python memcheck.py diff baseline.json stack.json [--markdown | --json] [--max-ratio R]

Copy budget.py beside it too: the report then has a budget of your stack, and a verdict on its peak.
"""
import argparse
import contextlib
import functools
import glob
import inspect
import json
import operator
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
import types
import uuid
import weakref

try:  # the command line only reads JSON: run as a script, or where torch is missing, it needs none
    if __name__ == "__main__":
        raise ModuleNotFoundError("torch: not needed by the command line")
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    import torch.utils._pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
except ModuleNotFoundError:
    torch = pytree = None
    TorchDispatchMode = object  # a placeholder base: the tracker needs torch to run

SCHEMA = "memcheck/1"
REPORT_FIELDS = {"config": dict, "env": dict, "peak_bytes": int, "peak_phase": (str, type(None)),
                 "phases": dict, "categories": dict, "steps": list, "leak": dict}
# What the report, diff and the verdict read inside a report: each list entry's fields, and those of
# the objects in it (each checked where present).
_ENTRY_FIELDS = {"steps": {"live_bytes": int}, "modules": {"module": str, "bytes": int},
                 "temporaries": {"bytes": int, "op": str}, "warnings": {"kind": str, "message": str}}
_OOM_FIELDS = {"phase": str, "step": int, "message": str}
_NESTED_FIELDS = {"leak": {"detected": bool, "bytes_per_step": (int, float), "step_end_bytes": list},
                    "oom": _OOM_FIELDS, "recovered_oom": dict(_OOM_FIELDS, recovered_at_step=int),
                    "rank_reports": list, "ranks": list, "caught_ooms": list, "launch": str}
_MISSING = object()
_KIND_NAMES = {type(None): "null", dict: "an object", list: "a list", int: "an integer, 0 or more",
               str: "a string", bool: "true or false", (int, float): "a number"}
MiB = 2 ** 20
MAX_MEMORY_MIB = 2 ** 43  # 2**63 bytes: beyond any device
PHASES = ("load", "forward", "backward", "optimizer")
# Highest priority first: a storage that is both a parameter and saved for backward is a parameter.
CATEGORIES = ("trainable_params", "frozen_params", "gradients", "optimizer_state", "activations",
              "temporaries")
STATUSES = ("ok", "oom", "error", "interrupted")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}
TOP_SURVIVORS = 20
TOP_TEMPORARIES = 5   # the largest temporaries a report lists at each peak
NO_MODULE = "(no module)"
_STOPPED_WORDS = {"error": "failed", "interrupted": "was interrupted"}   # a run's status, in a diff's words
# How each device's allocator starts its error as memory runs out: code that tells an OOM by its
# words (accelerate's auto_find_batch_size, a loop's retry) tells max_memory_mib's too
ALLOCATOR_OOM_WORDS = {"cpu": "DefaultCPUAllocator: can't allocate memory:",
                       "mps": "MPS backend out of memory"}   # (others: "CUDA out of memory.")
EXPERT_COUNTS = ("lora_num", "num_moe")  # a mixture-of-LoRA-experts fork's count of its experts
REFERENCE = "the reference for this stack"
NO_LORA_BASELINE = (f"{REFERENCE}: none; ref_train.py trains LoRA adapters, and the probe found no LoRA "
                    "layer in this model (it reads PEFT's, ilora.py's, and a hand-written one by PEFT's "
                    "attribute names: lora_A, dicts r and lora_alpha; docs/probe.md)")
NO_BUDGET_YET = ("no budget yet: this report was written during the run, as memory ran out or as the model "
                 "caught it; the report written as the run ends has it")
NO_BUDGET = ("no budget: copy budget.py beside memcheck.py for a verdict, or run the printed "
             "baseline command")


def _size(n_bytes):
    """In MiB with one decimal, or in bytes where that would read 0.0."""
    return f"{mib(n_bytes)} MiB" if n_bytes >= MiB / 20 else f"{n_bytes:,} bytes"


def mib(n_bytes):
    return f"{n_bytes / MiB:.1f}"


def signed_mib(n_bytes):
    """'+1.5 MiB'; a change that one decimal would show as 0.0 in KiB ('+24.0 KiB')."""
    return f"{n_bytes / 1024:+.1f} KiB" if 0 < abs(n_bytes) < MiB / 20 else f"{n_bytes / MiB:+.1f} MiB"


class ReportError(ValueError):
    """A file that is not a memcheck report of this schema, or a bad argument: one line, exit 2."""


def is_out_of_memory(error):
    """CUDA's OutOfMemoryError, a failed CPU allocation (PyTorch raises a RuntimeError), or Python's."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _say(line):
    """Print `line` in one write: ranks under torchrun share a terminal, where print()'s two writes
    (the line, then its newline) interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# a scheduler's stop, `timeout`, a closed terminal or SSH session: each ends a run as Ctrl-C does
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A SIGTERM or SIGHUP, ending the run as Ctrl-C does; its one argument, the signal's number."""

    @property
    def signum(self):
        return self.args[0]

    def __str__(self):
        return signal.Signals(self.signum).name


def _terminated(signum, frame):
    raise Terminated(signum)


def _put_back(signum):
    """The default action of `signum` again, unless a handler other than the probe's was set since."""
    if signal.getsignal(signum) is _terminated:
        signal.signal(signum, signal.SIG_DFL)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_report_path(path):
    """A report's folder made, and tried with a file, at the start: a path that cannot be written is
    said now, not when the training ends."""
    if not path:
        return
    if os.path.isdir(path):
        raise ReportError(f"report path {str(path)!r}: is a directory; give a file name")
    folder = os.path.dirname(os.path.realpath(path))   # a link's target's: the report is written there
    if os.path.exists(path) and not os.path.isfile(path):   # (a report would replace the device)
        raise ReportError(f"report path {str(path)!r}: not a regular file (a device or a pipe); "
                          "give a file name")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tried = tempfile.mkstemp(dir=folder, prefix=".memcheck-")
        os.close(fd)
        os.remove(tried)
    except OSError as e:
        raise ReportError(f"report path {str(path)!r}: cannot write in its folder {folder} ({e.strerror})")


# ---------------------------------------------------------------- the tracker

class _Storage(weakref.ref):
    """One tensor storage, live or freed within the phase: a weak reference whose callback says when
    it is freed. What made it (op, shape, dtype) is kept as it came, and named only when asked."""
    __slots__ = ("key", "nbytes", "created", "freed", "step", "phase", "module", "_op", "_shape",
                 "_dtype", "category")

    op = property(lambda self: _op_name(self._op))
    shape = property(lambda self: tuple(self._shape))
    dtype = property(lambda self: str(self._dtype).replace("torch.", ""))

    def alive_at(self, seq):
        return self.created <= seq and (self.freed is None or self.freed > seq)


# id(op) -> (op, whether its outputs alias its inputs: views, in-place and out= ops). Keyed by id:
# an OpOverload hashes in Python, and this is looked up for every op; the op is kept alive with it.
_ALIASING, _OP_NAMES = {}, {}


def _aliases_input(func):
    """Whether `func`'s outputs alias its inputs: read off its schema on a miss of _ALIASING."""
    entry = _ALIASING[id(func)] = (func, any(r.alias_info is not None for r in func._schema.returns))
    return entry[1]


def _op_name(op):
    if op not in _OP_NAMES:
        _OP_NAMES[op] = op if isinstance(op, str) else op.overloadpacket.__name__
    return _OP_NAMES[op]


def _step_of(tracker, phase):
    """(the step a record of `phase` belongs to, whether it came after it): an evaluation begun before
    the open step trained (as the trainers' eval hooks run) is the last finished step's, after it;
    anything else the open step's."""
    after = phase == "eval" and tracker.eval_between_steps
    return tracker.step - after, after


@functools.cache  # once per process
def _keep_dynamo_out():
    """Keep torch.compile from tracing the tracker's per-op code: by marking its code for dynamo to
    skip, not with the wrapper TorchDispatchMode puts around every op (a quarter of the tracker's
    per-op time); where torch cannot, the wrapper is back."""
    functions = (Tracker.__dict__["__torch_dispatch__"], Tracker.track, Tracker._free_record,
                 _aliases_input, _op_name)
    try:
        from torch._dynamo.eval_frame import skip_code
        codes = [fn.__code__ for fn in functions]
        while codes:  # the functions' own code and what is nested in it (a generator expression)
            code = codes.pop()
            skip_code(code)
            codes += [c for c in code.co_consts if isinstance(c, type(code))]
    except Exception:
        disable = getattr(torch, "_disable_dynamo", None)
        if disable is not None:
            Tracker.__torch_dispatch__ = disable(functions[0], recursive=True)


class Tracker(TorchDispatchMode):
    """Exact live bytes of the tensor storages on one device: every op's outputs, each storage once,
    freed when its weak reference says so. Events are numbered, so what was alive at the peak is
    rebuilt when the phase ends. A storage first seen as a view's or in-place op's output existed
    before (a preloaded batch): it is not counted."""

    def __init__(self, device, limit_bytes=None, on_error=None):
        super().__init__()
        self.device_type = device_type = torch.device(device).type
        self.limit_bytes = limit_bytes
        self.on_error = on_error  # called with any exception an op raises, before it propagates
        self.live = {}            # storage data_ptr -> _Storage
        self.window = []          # every storage alive at the phase start or created since
        self.live_bytes = self.peak_bytes = self.peak_event = self.event = 0
        self.step, self.phase, self.module_stack = 1, None, []
        self.eval_between_steps = False   # whether the open or last eval began before its step trained
        flag = f"is_{device_type}"  # a fast test of a tensor's device: its flag, not a torch.device
        self._on_device = (operator.attrgetter(flag) if hasattr(torch.Tensor, flag)
                           else lambda tensor: tensor.device.type == device_type)
        self._freed = self._free_record  # one bound method for every storage's callback
        _keep_dynamo_out()

    @classmethod
    def _should_skip_dynamo(cls):
        return False  # no wrapper around every op: _keep_dynamo_out marks the code instead

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            out = func(*args, **(kwargs or {}))
            # A view, in-place or out= op returns storages that exist already: nothing to count.
            entry = _ALIASING.get(id(func))
            if (entry[1] if entry is not None and entry[0] is func else _aliases_input(func)):
                return out
            if isinstance(out, torch.Tensor):  # the common cases, without walking a pytree
                self.track(out, func)
                return out
            for t in out if type(out) in (tuple, list) else pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.track(t, func)
                elif isinstance(t, (tuple, list)):
                    for leaf in pytree.tree_leaves(t):
                        if isinstance(leaf, torch.Tensor):
                            self.track(leaf, func)
            return out
        except BaseException as e:
            out = t = leaf = None  # what the op made is not held by this frame while the error is handled
            if self.on_error is not None:
                self.on_error(e)
            raise

    def track(self, tensor, op, adopt=True):
        """The record of `tensor`'s storage; an unseen storage is counted from now if `adopt`."""
        if type(tensor) is not torch.Tensor:  # a DTensor (FSDP2) counts as its local shard
            tensor = getattr(tensor, "_local_tensor", tensor)  # not to_local(): no op under the mode
        if not self._on_device(tensor):
            return None
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage
            return None
        key = storage.data_ptr() or storage._cdata   # meta storages have no data: their own address
        record = self.live.get(key)
        if record is not None or not adopt:
            return record
        nbytes = storage.nbytes()
        if nbytes == 0:
            return None
        module = self.module_stack[-1] if self.module_stack else NO_MODULE
        if self.limit_bytes is not None and self.live_bytes + nbytes > self.limit_bytes:
            # as an allocator fails: the allocation is not made, so not counted, not even in the peak
            over = self.live_bytes + nbytes - self.limit_bytes
            words = ALLOCATOR_OOM_WORDS.get(self.device_type, f"{self.device_type.upper()} out of memory.")
            given = f"{self.limit_bytes / MiB:.6f}".rstrip("0").rstrip(".")
            limit = max(mib(self.limit_bytes), given, key=len)  # 3.0, or 1.35 as it was given
            message = (f"{words} allocating {_size(nbytes)} ({list(tensor.shape)} {str(tensor.dtype)[6:]} "
                       f"from {_op_name(op)} in {module}) with {_size(self.live_bytes)} live: {over:,} bytes "
                       f"over the --max-memory / max_memory_mib limit of {limit} MiB")
            tensor = storage = None   # (this frame, kept by the error, holds no storage)
            raise torch.OutOfMemoryError(message)
        self.event += 1
        record = _Storage(storage, self._freed)
        record.key, record.nbytes, record.created, record.freed = key, nbytes, self.event, None
        record.step, record.phase, record.module, record._op = self.step, self.phase, module, op
        record._shape, record._dtype, record.category = tensor.shape, tensor.dtype, "temporaries"
        self.live[key] = record
        self.window.append(record)
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_event = self.live_bytes, self.event
        return record

    def _free_record(self, record):
        """The callback of a storage's weak reference: it was freed."""
        if self.live.get(record.key) is record:
            del self.live[record.key]
            self.event += 1
            record.freed = self.event
            self.live_bytes -= record.nbytes

    def tag(self, tensors, category, adopt=False):
        """Mark the storages of `tensors` as `category` unless they already hold a higher one."""
        for t in tensors:
            _promote(self.track(t, "preexisting", adopt), category)

    def start_window(self):
        self.window = list(self.live.values())
        self.peak_bytes, self.peak_event = self.live_bytes, self.event

    def at(self, event, top=TOP_TEMPORARIES):
        """What was alive at `event`: bytes per category, the activations by the module (or op,
        outside any) that made them, and the `top` largest temporaries."""
        categories, by_module, temporaries = dict.fromkeys(CATEGORIES, 0), {}, []
        for r in self.window:
            if not r.alive_at(event):
                continue
            categories[r.category] += r.nbytes
            if r.category == "temporaries":
                temporaries.append(r)
            elif r.category == "activations":
                where = r.module if r.module != NO_MODULE else f"(op {r.op}, outside any module)"
                entry = by_module.setdefault(where, {"module": where, "bytes": 0, "ops": {}})
                entry["bytes"] += r.nbytes
                entry["ops"][r.op] = entry["ops"].get(r.op, 0) + r.nbytes
        temporaries = [{"bytes": r.nbytes, "shape": list(r.shape), "dtype": r.dtype, "op": r.op,
                        "module": r.module} for r in sorted(temporaries, key=lambda r: -r.nbytes)[:top]]
        return categories, sorted(by_module.values(), key=lambda m: -m["bytes"]), temporaries


def _promote(record, category):
    """Give a storage's record `category` unless it holds a higher one already (CATEGORIES' order)."""
    if record is not None and _RANK[record.category] > _RANK[category]:
        record.category = category


# ---------------------------------------------------------------- the probe: what autograd saves

BETWEEN_PHASES = "between phases"
FORWARD_BACKWARD = "forward+backward"   # the HF Trainer's one phase: no hook between them
HELD_ONCE_SHARE, HELD_ONCE_BYTES = 0.01, MiB  # below both, memory held once is not worth a word
COMPILE_DISABLED = ("torch.compile was off under the probe (dynamo skips every frame while its "
                    "dispatch mode is active): these figures are the eager model's, not the compiled "
                    "one's; on CUDA, Probe(..., allocator_only=True) (or the callbacks' "
                    "allocator_only=True) measures the compiled model with the allocator's counters")
ALLOCATOR_ONLY = ("allocator only: peaks and live bytes from torch.cuda's counters, with no dispatch "
                  "mode (torch.compile stays on); categories, modules, temporaries, shapes, the "
                  "budget and autograd's warnings were not measured")
_EVENT_MESSAGES = {
    "output_kept": "the model's output was held through backward: {tensors} of its tensors ({mib} "
                   "MiB) that backward did not need, e.g. {shape} {dtype} from {module}, were alive "
                   "when it ended (step {first_step}, {steps} steps in all); keep only the loss "
                   "(loss = model(...).loss) or del the output before backward",
    "graph_kept": "a graph outlived its backward: {tensors} tensors ({mib} MiB) saved for backward "
                  "were still alive at the end of step {first_step} ({steps} steps in all); a loss "
                  "or output kept with its graph, or backward(retain_graph=True)",
    "grad_in_eval": "autograd saved {mib} MiB for backward during '{phase}' {when} "
                    "({steps} steps in all) and no backward used it: run evaluation under "
                    "torch.no_grad()",
    "graphs_together": "the graphs of {forwards} training forwards were alive together as a backward began "
                       "(step {first_step}, {steps} steps in all): {mib} MiB saved for backward beyond one "
                       "forward's; micro-batch losses summed before one backward hold every micro-batch's "
                       "graph (call backward on each loss, divided by their count); a loss that needs them "
                       "all (two views, chosen and rejected) holds them by design",
    "checkpointing_inactive": "gradient checkpointing is enabled but did not run: checkpointed "
                              "layers saved {mib} MiB for backward at step {first_step} (e.g. "
                              "{modules[0]}); is the model in train() mode?",
}


class _Saved:
    """What autograd keeps for a saved tensor: a detached alias, since the tensor's grad_fn would
    make a cycle keeping alive a graph nobody backpropagates (a leak the probe made itself). Its
    version is checked when backward unpacks it: autograd skips that check for hooked saves."""
    __slots__ = ("tensor", "version", "phase", "module", "nbytes", "used", "forward", "__weakref__")

    def __init__(self, tensor, phase, module, nbytes, forward):
        self.tensor, self.version, self.phase, self.module = tensor.detach(), tensor._version, phase, module
        self.nbytes, self.used, self.forward = nbytes, False, forward


class _Saves:
    """What autograd saves for backward and what the loop keeps, checked at the end of each step."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.layers = []               # the decoder layers' names
        self.events = {}               # warning kind -> details, first seen
        self.last_steps = {}           # warning kind -> the last step it was seen in
        self.outputs = []              # (record, what made it) of the model's outputs, this forward
        self.unsaved = []              # those alive when it ended, autograd not saving them
        self.backward_steps, self.checkpointed = 0, {}   # layer -> whether its backward looked checkpointed
        # the training forwards into the decoder so far, the one whose graph is being
        # made (0: none since the last backward began), and the count as a backward last judged them
        self.forwards = self.current = self.judged = 0
        self.new_step()

    def new_step(self):
        self.watch = {"saved": [], "bytes": {}, "modules": {}, "unpacked": set()}

    def pack(self, tensor):
        # Called for every tensor autograd saves for backward outside a checkpointed region.
        tracker = self.tracker
        record = tracker.track(tensor, "saved", adopt=False)
        _promote(record, "activations")
        phase = tracker.phase or BETWEEN_PHASES
        # By module, unless a reentrant recomputation in backward made it: counted once used.
        module = None
        if record is not None and torch._C._current_autograd_node() is None:
            module = tracker.module_stack[-1] if tracker.module_stack else NO_MODULE
        # What saving holds: a parameter exists anyway, and nothing frees it when the graph goes.
        held = record is not None and record.category == "activations"
        forward = self.current if module is not None and phase != "eval" else 0
        saved = _Saved(tensor, phase, module, record.nbytes if held else 0, forward)
        self.watch["saved"].append(weakref.ref(saved))
        if held:
            self.watch["bytes"].setdefault(phase, {})[id(record)] = record.nbytes
        return saved

    def unpack(self, saved):
        if saved.tensor._version != saved.version:  # (the detached alias shares the version counter)
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{str(saved.tensor.dtype).replace('torch.', '')} {list(saved.tensor.shape)}] "
                f"is at version {saved.tensor._version}; expected version {saved.version} instead "
                "(checked by memcheck's probe, as autograd does without it)")
        if self.judged != self.forwards:   # a backward's first unpack since a training forward
            self.judged, self.current = self.forwards, 0
            self._forwards_together()
        # What a backward used: the saves that tell whether checkpointing ran (an eval's never do).
        if not saved.used:
            saved.used = True
            self.watch["unpacked"].add(saved.phase)
            if saved.module is not None:
                modules = self.watch["modules"]
                modules[saved.module] = modules.get(saved.module, 0) + saved.nbytes
        return saved.tensor

    def _forwards_together(self):
        # the training forwards whose graphs no backward has used yet, alive as this one begins
        unused = {}   # forward -> {storage: bytes}: a tensor saved by several ops, counted once
        for saved in filter(None, (ref() for ref in self.watch["saved"])):
            if saved.forward and not saved.used:
                unused.setdefault(saved.forward, {})[saved.tensor.untyped_storage().data_ptr()] = saved.nbytes
        sizes = [sum(storages.values()) for storages in unused.values()]
        if len(sizes) > 1:
            self._event("graphs_together", self.tracker.step, forwards=len(sizes),
                        bytes=sum(sizes) - max(sizes))

    def model_output(self, module, args, output):
        # A training forward's output, the loss aside (the loop keeps that one): output_kept's watch.
        if self.tracker.phase not in ("forward", FORWARD_BACKWARD):
            return
        leaves = pytree.tree_leaves({k: v for k, v in output.items() if k != "loss"}
                                    if isinstance(output, dict) else output)
        for t in leaves:
            record = self.tracker.track(t, "output", adopt=False) if isinstance(t, torch.Tensor) else None
            if record is None or t.dim() == 0 or any(r is record for r, _ in self.outputs):
                continue   # (a scalar: the loss a wrapper returns in a tuple)
            record._shape = t.shape   # the tensor's shape, not the op's (a view's storage)
            made = record.module
            if record.op == "clone":   # DDP's copy of the model's output: its warning says of what
                copied = [m for r, m in self.outputs if (r._shape, r._dtype) == (t.shape, t.dtype)]
                made = f"{copied[0]}, copied by DDP" if copied else made
            self.outputs.append((record, made))

    def forward_ended(self):
        """What forward made and still holds is kept for backward: activations."""
        step = self.tracker.step
        self.unsaved = [(r, made) for r, made in self.outputs
                        if r.freed is None and r.category == "temporaries"]
        self.outputs = []
        for r in self.tracker.window:
            if r.freed is None and r.phase == "forward" and r.step == step:
                _promote(r, "activations")

    def backward_ended(self):
        """The model's outputs autograd did not save, alive when backward ends: the loop held them."""
        held = [(r, made) for r, made in self.unsaved if r.freed is None]
        if held:
            biggest, made = max(held, key=lambda each: each[0].nbytes)
            self._event("output_kept", self.tracker.step, bytes=sum(r.nbytes for r, _ in held),
                        tensors=len(held), shape=list(biggest.shape), dtype=biggest.dtype, module=made)
        self.unsaved = []

    def check_step(self, step, checkpointed):
        """Graphs kept past backward, saves no backward used, checkpointed layers that saved."""
        watch = self.watch
        for phase, storages in watch["bytes"].items():
            if phase not in watch["unpacked"]:
                at, after = _step_of(self.tracker, phase)   # ("after step N" as the OOM line says it)
                self._event("grad_in_eval", at, phase=phase, bytes=sum(storages.values()),
                            when=_at_or_after(at, after))
        if watch["unpacked"]:  # a backward ran
            self.backward_steps += 1
            for layer in self.layers:   # saves used inside it: not; at its level only (its input): yes
                if any(_inside(m, [layer]) for m in watch["modules"]):
                    self.checkpointed[layer] = False
                elif layer in watch["modules"]:
                    self.checkpointed.setdefault(layer, True)
            kept = {}  # what the kept graphs hold beyond the parameters they also save
            for saved in filter(None, (ref() for ref in watch["saved"])):
                record = self.tracker.live.get(saved.tensor.untyped_storage().data_ptr())
                if record is not None and record.category in ("activations", "temporaries"):
                    kept[id(record)] = record.nbytes
            if kept:
                self._event("graph_kept", step, bytes=sum(kept.values()), tensors=len(kept))
            inside = {m: b for m, b in watch["modules"].items() if _inside(m, checkpointed)}
            if inside:
                self._event("checkpointing_inactive", step, bytes=sum(inside.values()),
                            modules=sorted(inside, key=inside.get, reverse=True)[:3])
        self.new_step()

    def checkpointing(self):
        """Per decoder layer, whether it was checkpointed: a backward used what was saved at its
        level (checkpoint's input) and nothing inside it; None where it used nothing of it (a layer
        with nothing to train and no input that needs a gradient), or before any backward."""
        if not self.backward_steps or not self.layers:
            return None
        return [self.checkpointed.get(layer) for layer in self.layers]

    def _event(self, kind, step, **details):
        event = self.events.setdefault(kind, dict(details, first_step=step, steps=0))
        if self.last_steps.get(kind) != step:   # (a step's micro-batches are one step)
            self.last_steps[kind] = step
            event["steps"] += 1

    def warnings(self, peak_bytes):
        """Memory held once is named from 1% of the peak or 1 MiB; checkpointing_inactive always."""
        return [dict(e, kind=kind, message=_EVENT_MESSAGES[kind].format(mib=mib(e["bytes"]), **e))
                for kind, e in self.events.items() if kind == "checkpointing_inactive"
                or e["bytes"] >= min(HELD_ONCE_SHARE * peak_bytes, HELD_ONCE_BYTES)]


# ---------------------------------------------------------------- the probe: what it sees of the stack

def _defaulted_sizes(config):
    """'name=value' of the sizes of `config` that the config.json it was read from does not give,
    so that its class's defaults stand."""
    try:
        with open(os.path.join(getattr(config, "_name_or_path", None) or "", "config.json")) as f:
            given = json.load(f)
        defaults = type(config)()
    except Exception:  # no file beside it, or a class that cannot be built without arguments
        return []
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size")
    return [f"{k}={v}" for k in sizes if k not in given
            and type(v := getattr(config, k, None)) is int and v == getattr(defaults, k, None)]


def _arguments(signature, args, kwargs):
    """A forward's arguments by name."""
    try:
        return signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return kwargs


def _masks_attention(given):
    """Whether a forward (given these arguments) gives SDPA an explicit mask: padding in its 2-D
    attention mask, a mask made by the caller (4-D), or "packed": position ids that restart within a
    row (packed sequences, which transformers masks only where no KV cache is made)."""
    mask, positions = given.get("attention_mask"), given.get("position_ids")
    with _disable_current_modes():   # (reads the tracker does not count)
        if isinstance(mask, torch.Tensor):
            return mask.dim() != 2 or not bool(mask.all())
        if isinstance(positions, torch.Tensor) and positions.dim() == 2:
            return "packed" if bool((positions[:, 1:] - positions[:, :-1] != 1).any()) else False
    return False


def _fed_shape(given):
    """(rows, tokens) a causal LM's forward is fed: its input_ids', else its inputs_embeds' (a stack
    that embeds the tokens itself: row by row, with item vectors prepended, or without the module)."""
    for name, dims in (("input_ids", 2), ("inputs_embeds", 3)):
        value = given.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == dims:
            return tuple(value.shape[:2])
    return None


def _state_tensors(optimizers):
    """The tensors the optimizers keep per parameter: moments, step counts."""
    return [v for optimizer in optimizers for kept in getattr(optimizer, "state", {}).values()
            for v in kept.values() if isinstance(v, torch.Tensor)]


def _graph_leaves(tensor, limit=100_000):
    """The tensors that require grad whose gradient backward from `tensor` accumulates (parameters,
    leaves), as far as `limit` nodes of its graph."""
    leaves, visited, todo = [], set(), [tensor.grad_fn]
    while todo and len(visited) < limit:
        node = todo.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if hasattr(node, "variable"):   # AccumulateGrad
            leaves.append(node.variable)
        todo += [next_node for next_node, _ in node.next_functions]
    return leaves


class _Stack:
    """The stack watched: module names, parameter roles, what the training forwards showed."""

    def __init__(self, tracker, device, saves, ooms):
        self.tracker, self.device, self.saves, self.ooms = tracker, device, saves, ooms
        self.model = self.lm = None        # lm: the Hugging Face model in it, if any
        self.optimizers = []               # every optimizer the loop steps
        self.outside = []                  # parameters the optimizer steps that the model does not hold
        self.names, self.seen = {}, {}     # module -> name; what the training forwards showed (bs, seq, ...)
        self.step_tokens = None            # the open step's largest training batch, in tokens
        self.roles, self.graded, self.hooks = None, set(), []  # roles: (parameters, buffers), once a step
        self.compiled, self.config_dir = [], None  # torch.compile'd modules; a written config.json's
        self.phases_used, self.trainable, self.lm_signature = False, [], None
        self.leaf = None   # a weak reference to the last training forward's input leaf, if any
        self.decoder_depth = 0   # calls of the module holding the decoder layers now running

    def attach(self, model, optimizers):
        self.model, self.lm = model, _language_model(model)
        self.names = module_names(model)
        for module, name in self.names.items():
            # (first of its pre-hooks: one that raises before it would leave its name unpushed)
            self.hooks.append(module.register_forward_pre_hook(
                lambda *_, name=name: self.tracker.module_stack.append(name), prepend=True))
            self.hooks.append(module.register_forward_hook(self._leave_module, always_call=True))
        if self.lm is not None:
            self.lm_signature = inspect.signature(self.lm.forward)
            embeddings = self.lm.get_input_embeddings()
            self.hooks += [embeddings.register_forward_pre_hook(self._embedding_ids),
                           embeddings.register_forward_hook(self._embedded),
                           self.lm.register_forward_pre_hook(self._training_forward, with_kwargs=True),
                           self.lm.register_forward_hook(self.saves.model_output),
                           self.lm.register_forward_hook(self._made_cache)]
            layers = decoder_layers(self.lm) or []
            self.saves.layers = [self.names[layer] for layer in layers]
            if layers:
                self.hooks.append(layers[0].register_forward_pre_hook(self._first_layer, with_kwargs=True))
                decoder = next(m for m in self.lm.modules() if any(c is layers for c in m.children()))
                self.hooks += [decoder.register_forward_pre_hook(self._decoder_entered),
                               decoder.register_forward_hook(self._decoder_left, always_call=True)]
        self.watch_wrapper(model)
        self.trainable = []
        self._watch_optimizers(optimizers)
        if not optimizers:   # a loop that gave none: those that step the model's parameters
            self.hooks.append(register_optimizer_step_pre_hook(self._found_optimizer))
        self.tag_roles(adopt=True)  # what exists now is counted from now, and never as new

    def _watch_optimizers(self, optimizers):
        """Watch the gradients of what trains: the model's parameters, and what the optimizers step
        beside it (a projector the probe was not given), whose weights, gradients and state are the
        stack's too. Returns the parameters newly watched."""
        self.optimizers = list(optimizers)
        inside = {id(p) for p in self.model.parameters()}
        stepped = [p for optimizer in optimizers for p in stepped_params(optimizer)]
        self.outside = list({id(p): p for p in stepped if id(p) not in inside}.values())
        watched = {id(p) for p in self.trainable}
        new = [p for p in [*self.model.parameters(), *self.outside]
               if p.requires_grad and id(p) not in watched]
        self.trainable += new
        for p in new:  # judged by what backward gave, whatever zero_grad does later
            self.hooks.append(p.register_post_accumulate_grad_hook(self._graded))
            self.hooks.append(p.register_hook(functools.partial(self._arriving, p)))
        return new

    def _found_optimizer(self, optimizer, args, kwargs):
        """Each optimizer that steps the model's parameters, as it first steps (a global step
        pre-hook): its state is optimizer state, not temporaries, and what it steps beside the model
        is counted."""
        if any(unwrapped_optimizer(o) is unwrapped_optimizer(optimizer) for o in self.optimizers):
            return
        inside = {id(p) for p in self.model.parameters()}
        if not any(id(p) in inside for p in stepped_params(optimizer)):
            return
        new = self._watch_optimizers([*self.optimizers, optimizer])
        self.graded.update(id(p) for p in new if p.grad is not None)
        # what was made before the probe began, as attach() adopts it: what it steps beside the model,
        # and its state from steps before (a warm-up, a resumed run)
        self._tag_weights(self.outside, adopt=True)
        self.tracker.tag(_state_tensors([optimizer]), "optimizer_state", adopt=True)
        self.roles = None   # (tag_roles lists the parameters again, these among them)
        if self.outside:   # the next training forward tells whether they make the layers' input
            self.seen.pop("input_grads", None)

    def watch_wrapper(self, wrapper):
        """What wraps the model as the trainer runs it: a DistributedDataParallel's output (with
        find_unused_parameters, the HF Trainer's default for a PEFT model, it hands the loop clones of
        the model's, not the model's), and torch.compile (the HF Trainer's torch_compile compiles the
        wrapper, not the model its callbacks are given)."""
        if type(wrapper).__name__ == "DistributedDataParallel":
            self.hooks.append(wrapper.register_forward_hook(self.saves.model_output))
        if wrapper is not None:
            # (Lightning's fit() of a compiled LightningModule unwraps it and keeps the compile options)
            self.compiled = self.compiled or [
                type(m).__name__ for m in wrapper.modules() if type(m).__name__ == "OptimizedModule"
                or getattr(m, "_compiled_call_impl", None) or getattr(m, "_compiler_ctx", None)]

    def _arriving(self, param, grad):
        # A gradient arriving where one lives from before: backward adds to it (accumulation).
        if param.grad is not None and "backward" not in self.seen.setdefault("gradients_held", []):
            self.seen["gradients_held"].append("backward")

    def _graded(self, param):
        self.graded.add(id(param))
        self.tracker.tag([param.grad], "gradients")

    def detach(self):
        while self.hooks:
            self.hooks.pop().remove()

    def _leave_module(self, module, args, output):  # returns None: anything else would replace the output
        # (not pushed where a global pre-hook, or one prepended after the probe's, raised)
        stack = self.tracker.module_stack
        name = stack.pop() if stack and stack[-1] == self.names.get(module) else None
        if self.ooms.open:  # (always called: as the forward returns, or as it raises, with no output)
            error = sys.exc_info()[1]
            self.ooms.left(name, returned=(output is not None or error is None)
                           and not self.ooms.raised_by_this_call(error, name, len(stack) + 1))

    def _training(self):
        return self.tracker.phase != "eval" and torch.is_grad_enabled()

    def _training_step(self):
        # A forward of training: in a phase, or anywhere in a loop without phases (an evaluation's
        # between phases, with grad allowed, is none; a model trained in eval mode still trains).
        return self._training() and (self.tracker.phase is not None or not self.phases_used)

    def _batch_shape(self, shape, fed=False):
        # The first training batch's shapes and autocast, then the largest (the peak's, where a
        # collator pads each batch to its longest; of equal tokens, the longest) inside a phase, or
        # anywhere in a loop without phases: an evaluation's (another batch size), or a forward
        # between phases (a callback's), never count. The batch is what the model's forward is fed
        # once one trains; until then, and in a loop that runs the layers itself, the ids embedded.
        if shape is None:
            return
        training, (rows, tokens) = self._training_step(), shape
        if fed and training and not self.seen.get("fed"):   # (what was embedded before: no batch)
            self.seen["fed"], self.step_tokens = True, None
            self.seen.pop("bs", None), self.seen.pop("seq", None)
        elif not fed and self.seen.get("fed"):
            return
        if training:
            self.step_tokens = max(self.step_tokens or 0, rows * tokens)
        if (training or self._training() and "bs" not in self.seen) \
                and (rows * tokens, tokens) > (self.seen.get("bs", 0) * self.seen.get("seq", 0),
                                               self.seen.get("seq", 0)):
            self.seen["bs"], self.seen["seq"] = rows, tokens
            kind = self.device.type
            self.seen["autocast"] = (str(torch.get_autocast_dtype(kind)).replace("torch.", "")
                                     if torch.is_autocast_enabled(kind) else None)

    def _embedding_ids(self, module, args):
        self._batch_shape(_fed_shape({"input_ids": args[0] if args else None}))

    def _training_forward(self, module, args, kwargs):
        # The batch's shape; whether a training batch has padding (transformers then gives every
        # layer a mask), and whether gradients live from before (Lightning frees them after forward;
        # accumulation).
        if not self._training():   # (nothing to read of an evaluation's or generation's forwards)
            return
        given = _arguments(self.lm_signature, args, kwargs)
        self._batch_shape(_fed_shape(given), fed=True)
        if self.seen.get("padded") is not True:   # (a padded batch outweighs a packed one)
            masked = _masks_attention(given)
            self.seen["padded"] = masked or self.seen.get("padded", False)
        if self._training_step():   # (in train() mode, or not: a warning where no forward was)
            self.seen.setdefault("train_mode", set()).add(module.training)
        held = self.seen.setdefault("gradients_held", [])
        if "forward" not in held and any(p.grad is not None for p in self.trainable):
            held.append("forward")
        self.holding_loss("forward")

    def _made_cache(self, module, args, output):
        # A training forward that makes a KV cache (use_cache, no checkpointing) keeps copies of
        # keys and values: the budget traces the layers with one. (transformers 5 names it "cache",
        # and warns when it is read as past_key_values, its name before.)
        if self._training_step() and isinstance(output, dict):
            fields = getattr(type(output), "__dataclass_fields__", {})
            if output.get("cache" if "cache" in fields else "past_key_values") is not None:
                self.seen["kv_cache"] = True

    def _embedded(self, module, args, output):
        # transformers' enable_input_require_grads makes the frozen embeddings' output a leaf that
        # requires grad: the graph holds it, and its gradient, as long as the loop holds the loss.
        if self._training_step() and isinstance(output, torch.Tensor) and output.requires_grad \
                and output.grad_fn is None:
            self.seen.setdefault("input_leaf", True)
            self.leaf = weakref.ref(output)

    def holding_loss(self, phase):
        """Note that the loop holds the last step's loss into `phase`, if its input leaf is alive."""
        held = self.seen.setdefault("loss_held", [])
        if phase not in held and self.leaf is not None and self.leaf() is not None:
            held.append(phase)

    def _forward_began(self):
        # A training forward: not a recomputation in backward (checkpoint's, of a layer or the decoder)
        if self._training_step() and torch._C._current_autograd_node() is None:
            self.saves.forwards += 1
            self.saves.current = self.saves.forwards

    def _decoder_entered(self, module, args):
        # A forward is counted once as it enters the module that holds the decoder layers, however
        # the loop calls it (the model, its decoder), before its embeddings and checkpoint's saved
        # inputs, and once however often it runs its layers; at the first layer in a loop that
        # runs the layers itself.
        self.decoder_depth += 1
        if self.decoder_depth == 1:
            self._forward_began()

    def _decoder_left(self, module, args, output):
        self.decoder_depth = max(0, self.decoder_depth - 1)   # (0 where a pre-hook before ours raised)

    def _first_layer(self, module, args, kwargs):
        # Whether the first training forward's first decoder layer takes an input that requires grad
        # (embeddings that train, injected, or enable_input_require_grads): the budget traces it so.
        if not self.decoder_depth:
            self._forward_began()
        hidden = args[0] if args else kwargs.get("hidden_states")
        if "bs" in self.seen and "input_grads" not in self.seen and isinstance(hidden, torch.Tensor):
            self.seen["input_grads"] = hidden.requires_grad
            self.seen["inject_items"] = self._injects(hidden)
            leaf = self.leaf() if self.leaf is not None else None
            if leaf is not None and leaf.untyped_storage().data_ptr() != hidden.untyped_storage().data_ptr():
                self.seen["input_leaf"] = "apart"   # (a tensor of its own: positions added, items injected)

    def tag_roles(self, adopt=False, again=True):
        """Tag parameters, buffers, gradients and optimizer state (listed again if `again`)."""
        if self.model is None:
            return
        if again or self.roles is None:
            self.roles = ([*self.model.parameters(), *self.outside], list(self.model.buffers()))
        params, buffers = self.roles
        self._tag_weights(params, adopt)
        self.tracker.tag(buffers, "frozen_params", adopt)
        self.tracker.tag([p.grad for p in params if p.grad is not None], "gradients", adopt)
        self.graded.update(id(p) for p in params if p.grad is not None)
        self.tracker.tag(_state_tensors(self.optimizers), "optimizer_state", adopt)

    def _tag_weights(self, params, adopt):
        self.tracker.tag([p for p in params if p.requires_grad], "trainable_params", adopt)
        self.tracker.tag([p for p in params if not p.requires_grad], "frozen_params", adopt)

    def checkpointed(self):
        """The names of the layers Hugging Face's gradient checkpointing wraps."""
        return [self.names[m] for m in _checkpointed_layers(self.model)] if self.model is not None else []

    def inferred_config(self):
        if self.model is None:
            return {}
        params = self.params()
        config = {"probe": True, "model_class": type(self.lm or self.model).__name__,
                  "model": getattr(getattr(self.lm, "config", None), "_name_or_path", None) or None,
                  "model_config": self.config_dir,   # (where a report went: not compared by diff)
                  "param_count": sum(p.numel() for p in params),
                  "param_bytes_by_dtype": _bytes_by_dtype(params),
                  "vocab_rows": self._vocab_rows(),
                  "bs": self.seen.get("bs"), "seq": self.seen.get("seq"), "padded": self.seen.get("padded"),
                  "autocast": self.seen.get("autocast"),
                  "checkpointing_enabled": bool(_checkpointed_layers(self.model)),
                  "checkpointing": _checkpointing(self.checkpointing()), **_adapters(self.model),
                  "inject_items": self.seen.get("inject_items"),
                  "optimizer": ", ".join(dict.fromkeys(map(_optimizer_kind, self.optimizers))) or None}
        config["not_reproduced"] = _not_reproduced(self.model, self.lm, self.seen, config["optimizer"],
                                                   config["lora_outside"])
        world_size = rank_and_world()[1]
        if world_size > 1:
            config.update(strategy=_strategy(self.model) or "ddp", world_size=world_size)
        config["baseline_command"] = baseline_command(config)
        return {k: v for k, v in config.items() if v is not None}  # unknown is absent, not null

    def params(self):
        """Every parameter of the stack once: the model's, and what the optimizers step beside it."""
        return _unique_params([self.model]) + self.outside

    def param_counts(self):
        params = self.params()
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"trainable": trainable, "frozen": sum(p.numel() for p in params) - trainable}

    def _vocab_rows(self):
        # the embeddings' rows (a config's vocab_size goes stale where they are replaced by hand)
        if self.lm is None:
            return None
        rows = getattr(embedding_module(self.lm.get_input_embeddings()), "num_embeddings", None)
        return rows or getattr(self.lm.config, "vocab_size", None)

    def _injects(self, hidden):
        """Whether the first decoder layer's input is made with parameters that train, other than the
        embeddings' and adapters' (iLoRA's projector of items, a soft prompt): the baseline's
        --inject-items."""
        own = {id(p) for m in self.lm.modules() if "Embedding" in type(m).__name__ or _adapter(m)
               for p in m.parameters()}
        injecting = {id(p) for p in self.trainable} - own
        return any(id(leaf) in injecting for leaf in _graph_leaves(hidden))

    def save_config(self, report_path, write):
        """A model with no path or hub name: its config.json beside the report, for the baseline
        (written by rank 0 only, beside its report: every rank's baseline points there)."""
        if (self.lm is None or getattr(self.lm.config, "_name_or_path", None) or self.config_dir
                or not _adapters(self.model)["adapters"]):   # (no LoRA: no baseline to point at it)
            return
        self.config_dir = os.path.splitext(os.path.abspath(report_path))[0] + "-model"
        if write:
            self.lm.config.save_pretrained(self.config_dir)

    def checkpointing(self):
        """Per decoder layer, whether it is checkpointed: as measured; as the model is configured
        where nothing was (before any backward, as after an OOM in step 1; a layer that saved
        nothing a backward used)."""
        measured = self.saves.checkpointing()
        if not self.saves.layers:
            return measured
        # a layer's own flag (transformers 5 flags each), else the flag of the model that holds it
        enabled = any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules())
        configured = [getattr(layer, "gradient_checkpointing", enabled) is True
                      for layer in decoder_layers(self.lm)]
        if measured is None:
            return configured
        return [c if m is None else m for m, c in zip(measured, configured)]

    def warnings(self, oom_caught=False):
        """compile_disabled, model_mismatch, FSDP2's sharding and no_grad (after `oom_caught`, for what
        a forward returned in its place): what is wrong with the stack itself."""
        lm, found = self.lm, fsdp2_sharding(self.model, self.lm) if self.model is not None else []
        if self.compiled:
            found.append({"kind": "compile_disabled", "modules": self.compiled, "message": COMPILE_DISABLED})
        built_as = getattr(getattr(type(lm), "config_class", None), "model_type", None)
        read_as = getattr(getattr(lm, "config", None), "model_type", None)
        if built_as and read_as and built_as != read_as:
            cls = type(lm).__name__
            defaulted = _defaulted_sizes(lm.config)
            sizes = (f", and sizes its config.json does not give ({', '.join(defaulted)}: "
                     f"{type(lm.config).__name__}'s defaults)" if defaulted else "")
            message = (f"{cls} was built from a config of model_type {read_as!r} (architectures "
                       f"{getattr(lm.config, 'architectures', None)}): the weights of another "
                       f"architecture{sizes}; load the folder with AutoModelForCausalLM")
            found.append({"kind": "model_mismatch", "class": cls, "model_type": read_as, "message": message})
        if not self.saves.backward_steps or self.model is None:
            return found
        # dropout modules (LoRA's), and the model's own, which many call functionally (OPT's)
        idle = {m.p for m in self.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
        own = getattr(getattr(lm, "config", None), "dropout", 0)
        idle |= {own} if isinstance(own, float) and own > 0 else set()
        if self.seen.get("train_mode") == {False} and idle:
            found.append({"kind": "eval_mode", "message": (
                f"the model trained in eval() mode, so its dropout (p "
                f"{', '.join(map('{:g}'.format, sorted(idle)))}) did not run; call model.train() before "
                "training (in train() mode its masks cost memory: the budget counts them)")})
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad] + [
            (f"{list(p.shape)} beside the model", p) for p in self.outside if p.requires_grad]
        missing = [n for n, p in trainable if id(p) not in self.graded]
        # (reentrant checkpointing, transformers' or torch's CheckpointWrapper's, runs no backward
        # through layers whose input needs no gradient)
        layers = decoder_layers(lm) if lm is not None else None
        in_layers = {id(p) for p in layers.parameters()} if layers is not None else set()
        wrapped = [m for m in layers or [] if hasattr(m, "checkpoint_fn")]
        checkpointed = bool(_checkpointed_layers(self.model) or wrapped)
        reentrant = (self.seen.get("input_grads") is False and checkpointed
                     and any(id(p) in in_layers and id(p) not in self.graded for _, p in trainable))
        if missing:
            why = ("memory ran out inside the model, and a forward that caught it returned something else "
                   "(WARNING oom_caught)" if oom_caught else "with reentrant checkpointing and frozen input "
                   "embeddings, call model.enable_input_require_grads() or use use_reentrant=False"
                   if reentrant else
                   "the loss does not depend on them: a module the forward does not run, or a detach()")
            message = (f"{len(missing)} of {len(trainable)} trainable parameters never received a "
                       f"gradient, e.g. {', '.join(missing[:3])}: {why}")
            found.append({"kind": "no_grad", "count": len(missing), "of": len(trainable),
                          "names": missing[:5], "message": message})
        return found


# ---------------------------------------------------------------- the probe: what ran out of memory

def _in_flight(error):
    """The ids of the errors being handled as `error` was raised: its context, and theirs."""
    ids, context = set(), error.__context__
    while context is not None and id(context) not in ids:
        ids.add(id(context))
        context = context.__context__
    return ids


class _Ooms:
    """The run's out-of-memory errors. One raised inside modules' forwards is caught by the first of
    them to return normally after it: the model's own code went on. One that leaves them all is the
    loop's, which stops the run, or goes on after it (recovered)."""

    def __init__(self, tracker, on_caught):
        self.tracker, self.on_caught = tracker, on_caught
        # (key, record, modules it is inside, how deep it was raised) of each error neither caught nor
        # stepped past
        self.open = []
        self.caught, self.times_caught, self.caught_in = [], 0, []   # (the first TOP_SURVIVORS kept)

    def raised(self, error, inside=()):
        """The record of `error`: new, or the one made as it was raised (then inside `inside`)."""
        key = (id(error), first_line(error))   # not the error itself: its frames hold tensors
        record = next((r for k, r, _, _ in self.open if k == key), None)
        if record is None:
            stack = self.tracker.module_stack
            # an earlier error raised inside a module whose code runs on past its except clause (to
            # make the zeros it returns instead, say): that code caught it, even if this error stops it
            # from returning. (One still in flight, being handled or cleaned up after, is no catch.)
            flying = _in_flight(error)
            handling = [name for name in stack if any(name in modules and other[0] not in flying
                                                      for other, _, modules, _ in self.open)]
            if handling:
                self.left(handling[-1], returned=True)
            handled = [dict(module=next(m for m in reversed(stack) if m in modules), message=r["message"])
                       for other, r, modules, _ in self.open
                       if other[0] in flying and set(modules) & set(stack)]
            phase = self.tracker.phase or BETWEEN_PHASES
            step, after = _step_of(self.tracker, phase)
            record = {"phase": phase, "step": step, "module": stack[-1] if stack else NO_MODULE,
                      "message": key[1], **({"after_step": True} if after else {}),
                      **({"while_handling": handled[-1]} if handled else {})}
            self.open.append((key, record, list(inside), len(inside)))
        return record

    def raised_by_this_call(self, error, name, depth):
        """Whether `error`, in flight, was raised in the call of module `name` now ending, `depth` deep
        (by a hook, after its forward returned): not by another call of a module of that name."""
        return error is not None and any(k[0] == id(error) and r["module"] == name and d == depth
                                         for k, r, _, d in self.open)

    def left(self, name, returned):
        """Module `name`'s forward ended, and `returned` normally, or raising."""
        inside = [e for e in self.open if name in e[2]]
        for entry in inside:
            entry[2].remove(name)
        if returned and inside:   # after errors raised inside it: it caught them
            self.open = [e for e in self.open if e not in inside]
            self.times_caught += len(inside)
            self.caught_in += [] if name in self.caught_in else [name]
            records = [record for _, record, _, _ in inside]
            room = TOP_SURVIVORS - len(self.caught)
            self.caught += [dict(record, caught_in=name) for record in records[:room]]
            self.on_caught(records)

    def uncaught(self):
        return [record for _, record, _, _ in self.open]

    def stepped(self):
        """A step ended: the errors still open were the loop's, and it went on."""
        self.open = []

    def warnings(self):
        """oom_caught: out-of-memory errors a module's forward caught and went on after; an except
        clause that returns zeros instead makes a run that looks healthy and trains on wrong values."""
        if not self.caught:
            return []
        first, places = self.caught[0], self.caught_in
        times = "once" if self.times_caught == 1 else f"{self.times_caught} times"
        raised = "" if first["module"] in places else f", raised inside {first['module']}"
        return [{"kind": "oom_caught", "count": self.times_caught, "caught_in": places,
                 "message": f"memory ran out {times} inside the model, and the forward of "
                            f"{', '.join(places)} caught it and went on: unless it did the work again in "
                            "smaller pieces, it returned something else, and training goes on with wrong "
                            f"values (first at step {first['step']} in {first['phase']}{raised}: "
                            f"{first['message']})"}]


# ---------------------------------------------------------------- the probe

class Probe:
    """Measure any training loop (the module docstring shows one). With `path`, the report is written
    when the scope closes, however it closes (and as an allocation fails). For callbacks, the same
    without with-blocks: __enter__() opens the scope, begin()/end() a phase, close() the scope."""

    measuring = None   # the probe whose scope is open: one at a time (one's tracker hides the other's ops)

    def __init__(self, model=None, optimizer=None, device=None, max_memory_mib=None, config=None,
                 path=None, log=None, allocator_only=False):
        if device is None:
            device = next(model.parameters()).device if model is not None else "cpu"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.allocator_only = allocator_only  # no dispatch mode, no hooks: torch.compile stays on
        if allocator_only and not self.cuda:
            raise ReportError(f"allocator_only=True on device {str(self.device)!r}: it needs CUDA (torch "
                              "keeps no allocator counters on CPU); use allocator_only=False there")
        if max_memory_mib is not None and (type(max_memory_mib) not in (int, float)
                                           or not 0 < max_memory_mib <= MAX_MEMORY_MIB):
            raise ReportError(f"max_memory_mib={max_memory_mib!r}: must be a positive number of MiB, "
                              "at most 2**43")
        if allocator_only and max_memory_mib is not None:
            raise ReportError(f"max_memory_mib={max_memory_mib} needs the tracker, and "
                              "allocator_only=True runs without it: pass one or the other")
        limit = None if max_memory_mib is None else round(max_memory_mib * MiB)
        self.tracker = Tracker(self.device, limit, on_error=self._on_op_error)
        self.config, self.log, self._path = config or {}, log or _say, path
        self._join_ranks()
        self.status, self.error, self.oom, self.recovered_oom = "ok", None, None, None
        self._ooms, self._saved_at = _Ooms(self.tracker, self._oom_caught), {}  # why -> the step saved in
        # Each phase's statistics, each step's, and the training peak's: the figures the report reads.
        self.phases, self.steps, self.peak = {}, [], {"peak_bytes": 0}
        self._started, self._step_peak = None, 0   # the open step's start time and peak
        self._phased, self._step_ended = False, time.perf_counter()  # a phase began in this step
        self._saves = _Saves(self.tracker)
        self._stack = _Stack(self.tracker, self.device, self._saves, self._ooms)
        self._survivors, self._kept_steps = [], 0   # a leak's evidence, from the last step that grew
        self._scope, self._open, self._pending = contextlib.ExitStack(), False, (model, optimizer)
        self._within = None              # the phase a with-block holds open

    def _join_ranks(self):
        """This rank's report path among every rank's, from torch.distributed (again at __enter__:
        a probe made before init_process_group)."""
        path = self._path
        self.rank, self.world_size = rank_and_world()
        self.launch = launch() if self.world_size > 1 else None
        self.paths = rank_paths(str(path), self.world_size) if path else None  # every rank's report
        self.path = path and self.paths[self.rank]
        beside = "" if "{rank}" in str(path) else f"; ranks but 0 add .rankN to {path}, which has no {{rank}}"
        self._rank_note = f" (rank {self.rank} of {self.world_size}{beside})" if self.world_size > 1 else ""
        alone = _launched_alone(self.world_size) if path else None
        self._launched_rank = alone[0] if alone else self.rank   # the one that prints the baseline: 0
        if alone:  # each process its own report, named as a rank's would be, not one file for all
            self.path = rank_paths(str(path), alone[1])[alone[0]]
            self.paths = [self.path]
            self._rank_note = (f" (process {alone[0]} of the {alone[1]} {alone[2]} started; in no process "
                               "group, each trains alone)")
        _check_report_path(self.path)

    # -- scope
    def __enter__(self):
        if Probe.measuring is not None:
            raise ReportError(f"a memcheck Probe is measuring already (its report: {Probe.measuring.path}): "
                              "measure with one at a time")
        self._join_ranks()
        if not self.allocator_only:
            self._scope.enter_context(self.tracker)
            self._scope.enter_context(torch.autograd.graph.saved_tensors_hooks(self._saves.pack,
                                                                               self._saves.unpack))
        for signum in STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ():
            if signal.getsignal(signum) == signal.SIG_DFL:   # (not under nohup, nor the user's own)
                signal.signal(signum, _terminated)   # the report is written, as after Ctrl-C
                self._scope.callback(_put_back, signum)
        self._open = True
        if self._pending[0] is not None:
            self.attach(*self._pending)
        self._step_ended = time.perf_counter()
        self._new_window()   # a loop without phases: its step is measured from here
        Probe.measuring = self
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc)

    def close(self, error=None):
        """Stop measuring, record how the run ended, write the report to `path`. Safe twice."""
        if not self._open:   # (closed: how a later run ended is not this one's)
            return
        if isinstance(error, KeyboardInterrupt):
            self.status = "interrupted"
            self.error = f"terminated ({error})" if isinstance(error, Terminated) else "interrupted (Ctrl-C)"
        elif is_out_of_memory(error):
            self._record_oom(error, ending=True)
        elif error is not None and self.status == "ok":
            self.status, self.error = "error", f"{type(error).__name__}: {first_line(error)}"
        self._open = False
        if Probe.measuring is self:
            Probe.measuring = None
        try:
            self.end()
        finally:  # the patched functions and hooks go back, whatever happened
            self._stack.detach()
            self._scope.close()
        # A step left open by a loop that ended normally (an eval loop that never calls step())
        # still has its checks; one cut short by a failure saved for a backward that never came.
        if (self._started is not None or self._phased) and self.status == "ok":
            self._check_step()
        if self.path and self.world_size == 1 and rank_and_world()[1] > 1:
            self._join_ranks()   # a process group came up inside the scope: this rank's report is a rank's
        if self.path:
            report = self.save()
            kinds, reference = [w["kind"] for w in report["warnings"]], reference_line(report["config"])
            warned = f"{len(kinds)} warning{'s' * (len(kinds) != 1)}"
            warned += f" ({', '.join(kinds)})" if kinds else ""
            self.log(f"memcheck: peak {mib(report['peak_bytes'])} MiB ({report['status']}"
                     f"{', allocator only' if self.allocator_only else ''}), {warned}; "
                     f"report written to {self.path}{self._rank_note}"
                     + (f"\n{reference}" if reference and self._launched_rank == 0 else ""))

    def attach(self, model, optimizer=None):
        """Watch `model` and the optimizer the loop steps, or a list of them (Lightning's manual
        optimization)."""
        self._started = None
        optimizers = [o for o in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer])
                      if o is not None]
        if self.allocator_only:  # nothing inside what torch.compile traces; read for the config only
            stack = self._stack
            stack.model, stack.lm, stack.optimizers = model, _language_model(model), optimizers
            return
        self._stack.attach(model, optimizers)
        if _strategy(model) == "fsdp":
            _watch_fsdp_storage(self.tracker, self._scope, _gathered_category(model))

    # -- measurement
    def _check_open(self, call):
        if not self._open:   # (its tracker sees nothing: every figure would read 0, or a stale one)
            was = f" (closed, its report written to {self.path})" if self.path and self.steps else ""
            raise ReportError(f"{call} outside the probe's scope{was}: nothing there is measured; run the "
                              "loop inside `with probe:`")

    @contextlib.contextmanager
    def phase(self, name):
        """Measure the code inside as phase `name` (forward, backward, optimizer, or your own)."""
        self._check_open(f"probe.phase({name!r})")
        if self._within is not None:   # (an inner phase would end the outer one where it began)
            raise ReportError(f"phase {name!r} inside phase {self._within!r}: phases do not nest; "
                              f"end {self._within!r} first, or measure the two as one")
        self._within = name
        self.begin(name)
        try:
            yield
        except BaseException as e:
            if is_out_of_memory(e):
                self._record_oom(e)
            raise
        finally:
            self._within = None
            self.end()

    def begin(self, name):
        """Open a phase without a with-block (closing the open one, as callbacks do: unlike phase(),
        which refuses a phase inside its own); pair with end()."""
        self._check_open(f"probe.begin({name!r})")
        self.end()
        self._end_between()
        first = self._started is None
        self._phased = self._stack.phases_used = True
        self._saves.outputs = []
        self.tracker.phase, self.tracker.module_stack[:] = name, []
        if name == "eval":   # no time of a step's: between steps, or taken off the step's (end)
            self.tracker.eval_between_steps, self._eval_began = first, time.perf_counter()
        elif first:
            self._started = time.perf_counter()
        self._new_window()
        self._tag_roles(again=first)
        if name == "optimizer":
            self._stack.holding_loss(name)

    def _end_between(self):
        """What ran between phases (a callback's work, say) peaked above training: then it is a phase
        of its own, not lost as the next window begins."""
        if self.tracker.phase is not None or not self.peak["peak_bytes"]:
            return
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else self.tracker.peak_bytes
        if peak > self.peak["peak_bytes"]:
            self.tracker.phase = BETWEEN_PHASES
            self.end()

    def _new_window(self):
        """The next phase's peak is measured from here, by the tracker and by CUDA's allocator."""
        self.tracker.start_window()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _tag_roles(self, **kwargs):
        if not self.allocator_only:  # (without the tracker there is nothing to tag)
            self._stack.tag_roles(**kwargs)

    def end(self):
        name = self.tracker.phase
        if name is None:
            return
        self._tag_roles(again=False)
        if name in ("forward", FORWARD_BACKWARD):
            self._saves.forward_ended()
        if name in ("backward", FORWARD_BACKWARD):
            self._saves.backward_ended()
        stats = self._phase_stats()
        if name not in ("load", "eval"):   # (a step's peak and time are its training's)
            self._step_peak = max(self._step_peak, stats["peak_bytes"])
        if stats["peak_bytes"] >= self.phases.get(name, {"peak_bytes": -1})["peak_bytes"]:
            self.phases[name] = stats
        else:
            self.phases[name]["live_bytes"] = stats["live_bytes"]
        self.tracker.phase = None
        if name == "eval" and self._started is not None:   # (an evaluation inside a step)
            self._started += time.perf_counter() - self._eval_began
        elif name == "eval":   # between steps: the next is measured, and timed, from here
            self._step_ended = time.perf_counter()
            self._new_window()
        # The peak is training's; loading (resize_token_embeddings included) keeps its own entry, and
        # what runs between phases after it is measured from its end.
        if name == "load":
            self._new_window()
        elif stats["peak_bytes"] >= self.peak["peak_bytes"]:
            self.peak = dict(stats, phase=name)

    def _phase_stats(self):
        """The closing phase's peak, what was alive then, and on CUDA the allocator's own figures."""
        tracker = self.tracker
        if self.allocator_only:
            return dict(_allocator_stats(self.device), step=_step_of(tracker, tracker.phase)[0])
        categories, modules, temporaries = tracker.at(tracker.peak_event)
        stats = {"peak_bytes": tracker.peak_bytes, "live_bytes": tracker.live_bytes,
                 "step": _step_of(tracker, tracker.phase)[0],
                 "categories": categories, "modules": modules, "temporaries": temporaries}
        if self.cuda:
            stats["tracked_peak_bytes"] = stats["peak_bytes"]
            stats.update(_allocator_stats(self.device))
            # What the allocator holds that no tracked tensor owns: cuBLAS's workspaces, mostly.
            stats["untracked_bytes"] = max(0, stats["live_bytes"] - tracker.live_bytes)
        return stats

    def step(self, loss=None):
        """Close a training step: record its loss, time and the live bytes it leaves behind."""
        self._check_open("probe.step()")
        self.end()
        if self._started is not None:   # (a training phase ran: an evaluation alone is none)
            self._end_between()
        else:  # no phase in this step: the whole step is one
            self.tracker.phase = "step"
            self._tag_roles()
            self.end()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        live = self._live_bytes()
        self.steps.append({"step": self.tracker.step, "loss": _loss_value(loss),
                           "seconds": now - (self._started or self._step_ended),
                           "live_bytes": live, "peak_bytes": self._step_peak or live,
                           "tokens": self._stack.step_tokens})
        self._stack.step_tokens, self._stack.decoder_depth = None, 0   # (a forward interrupted inside)
        self._check_step()
        self._keep_survivors()
        if self.status == "oom":  # the loop caught it and went on (with a smaller batch, say)
            self.recovered_oom = self.recovered_oom or dict(self.oom, recovered_at_step=self.tracker.step)
            self.status, self.error, self.oom = "ok", None, None
        self._ooms.stepped()
        self._step_peak, self._started, self._phased, self._step_ended = 0, None, False, now
        self.tracker.step += 1
        self._new_window()
        return self.steps[-1]

    def _live_bytes(self):
        return torch.cuda.memory_allocated(self.device) if self.cuda else self.tracker.live_bytes

    def _check_step(self):
        """The end-of-step check of what autograd saved."""
        if not self.allocator_only:  # (it sees no saves and names no modules)
            self._saves.check_step(self.tracker.step, self._stack.checkpointed())

    def _keep_survivors(self):
        """While memory grows, the leak's survivors: activations and temporaries made before this
        step (the loop's setup aside), still alive; and how many steps they come from."""
        step, ends = self.tracker.step, [s["live_bytes"] for s in self.steps]
        if len(ends) >= 2 and ends[-1] > ends[-2]:
            kept = sorted((r for r in self.tracker.live.values() if r.step < step and r.category in
                           ("activations", "temporaries") and not (r.step == 1 and r.phase is None)),
                          key=lambda r: (-r.nbytes, r.created))
            self._survivors = [{"shape": list(r.shape), "dtype": r.dtype, "bytes": r.nbytes, "step": r.step,
                                "module": r.module, "op": r.op} for r in kept[:TOP_SURVIVORS]]
            self._kept_steps = len({r.step for r in kept})

    # -- failures
    def _record_oom(self, error, inside=(), ending=False):
        """An out-of-memory error: the first not caught is the run's (the one `ending` it, if one does),
        with what was live when it came."""
        record = self._ooms.raised(error, inside)
        record.setdefault("live_bytes", self._live_bytes())
        self.status, self.error = "oom", record["message"]
        self.oom = record if ending else self.oom or record

    def _save_now(self, why):
        """Write the report as it stands, once a step for each `why`: the process may not live to
        close(). (Without the budget, which would run the model's layers inside a forward.)"""
        if self.path and self._saved_at.get(why) != self.tracker.step:
            self._saved_at[why] = self.tracker.step
            self.save(mid_run=True)

    def _on_op_error(self, error):
        if is_out_of_memory(error):   # the allocation that fails is the moment to write
            self._record_oom(error, inside=self.tracker.module_stack)
            self._save_now("oom")

    def _oom_caught(self, records):
        """The model's own code caught out-of-memory errors and went on: they did not stop the run."""
        if any(self.oom is record for record in records):
            self.oom = next(iter(self._ooms.uncaught()), None)
        if self.oom is None and self.status == "oom":
            self.status, self.error = "ok", None
        self._save_now("caught")   # (what it returned may stop the run, or hang its ranks)

    # -- results
    def report(self, mid_run=False):
        """The report so far; mid_run=True marks it written while the run goes on, and leaves the budget
        out (it runs the model's layers on meta: not inside a forward, where memory ran out)."""
        config = self.config or self._stack.inferred_config()
        leak = find_leak(self.steps, self._survivors, self._kept_steps)
        report = {"schema": SCHEMA, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                  "status": self.status, "error": self.error, "config": config,
                  "env": environment(self.device), "rank": self.rank, "world_size": self.world_size,
                  "peak_bytes": self.peak["peak_bytes"],
                  "peak_phase": self.peak.get("phase"), "categories": self.peak.get("categories", {}),
                  "modules": self.peak.get("modules", []), "temporaries": self.peak.get("temporaries", []),
                  "phases": {name: {k: v for k, v in stats.items() if k not in ("modules", "temporaries")}
                             for name, stats in self.phases.items()},
                  "steps": self.steps, "leak": leak, "oom": self.oom,
                  "recovered_oom": self.recovered_oom, "caught_ooms": self._ooms.caught,
                  "warnings": _leak_warnings(leak) + self._ooms.warnings()
                  + self._stack.warnings(oom_caught=bool(self._ooms.caught))
                  + self._saves.warnings(self.peak["peak_bytes"])}
        if self.allocator_only:
            report["allocator_only"] = ALLOCATOR_ONLY
        if self._stack.model is not None:
            report["params"] = self._stack.param_counts()
        if not self.config:
            try:
                from budget import probed  # late: budget.py imports this file
            except ImportError:  # no budget.py beside this file
                report["budget"], report["no_budget"] = None, NO_BUDGET
            else:
                report["budget"], why = (None, NO_BUDGET_YET) if mid_run else probed(self._stack, self.phases)
                report.update({"no_budget": why} if why else {})
        if self.world_size > 1:
            report["launch"] = self.launch
        if self.paths and self.world_size > 1:
            report["rank_reports"] = rank_reports(self.paths, self.rank)
        return dict(report, mid_run=True) if mid_run else report

    def save(self, path=None, mid_run=False):
        """Write the report to `path` (default: the probe's), and return it. A model built in code
        has its config.json written beside it (beside rank 0's, under torchrun), for the baseline."""
        self._stack.save_config(self.paths[0] if self.paths else path, write=not self.paths or self.rank == 0)
        report = self.report(mid_run)
        write_report(path or self.path, report)
        return report


def _leak_warnings(leak):
    if not leak["detected"]:
        return []
    steps, survivors = len(leak["step_end_bytes"]), leak["survivors"]
    examples = "; ".join(f"{s['shape']} {s['dtype']} {s['bytes']:,} B from {s['op']} in {s['module']} "
                         f"(step {s['step']})" for s in survivors[:3])
    return [{"kind": "leak", "bytes_per_step": leak["bytes_per_step"], "steps": steps,
             "bytes": leak["bytes_per_step"] * (steps - 1),
             "message": f"live memory grows {leak['bytes_per_step']:,.0f} bytes every step"
                        + (f"; {len(survivors)} tensors from earlier steps survive, e.g. {examples}"
                           if survivors else "")}]


def _allocator_stats(device):
    """CUDA's allocator's own figures: its peak since the phase began (reset then), what it holds."""
    torch.cuda.synchronize(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device),
            "live_bytes": torch.cuda.memory_allocated(device),
            "reserved_bytes": torch.cuda.max_memory_reserved(device)}


# ---------------------------------------------------------------- the stack, duck-typed

def module_names(model):
    """{module: name} from the language model down, the same layer named alike in every stack (PEFT's
    `base_model.model.`, a LightningModule's attribute, the reference's `lm.` dropped)."""
    lm = _language_model(model)
    full = {m: n for n, m in model.named_modules()}
    if lm is None:
        return {m: n or NO_MODULE for m, n in full.items()}
    root = full[lm]
    names = {}
    for m, n in full.items():
        if root == "" or n == root or n.startswith(root + "."):
            names[m] = n[len(root):].lstrip(".") or NO_MODULE
        elif root.startswith(n + ".") or n == "":
            names[m] = NO_MODULE   # a wrapper around the language model
        else:
            names[m] = n           # beside it: iLoRA's router and projector, say
    return names


def _inside(module_name, layers):
    # Strictly inside: what a checkpointed layer saves at its own level is checkpoint's input.
    return any(module_name.startswith(layer + ".") for layer in layers)


def _language_model(model):
    """The innermost-named Hugging Face model in `model` (the first PreTrainedModel), or None."""
    try:
        from transformers import PreTrainedModel
        is_lm = lambda m: isinstance(m, PreTrainedModel)
    except ImportError:  # then what looks like one
        is_lm = lambda m: hasattr(m, "config") and hasattr(m, "get_input_embeddings")
    return next((m for m in model.modules() if is_lm(m)), None)


def embedding_module(module):
    """The embeddings or head itself, under PEFT's LoRA (base_layer) or trainable tokens (whose
    wrapper's weight is a merged copy, made as it is read)."""
    module = getattr(module, "token_adapter", module)
    return getattr(module, "base_layer", module)


def decoder_layers(model):
    """The ModuleList of decoder layers (the one as long as the config's layer count), or None."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers),
                None)


def _checkpointed_layers(model):
    """The modules Hugging Face's gradient checkpointing would wrap: the innermost flagged ones."""
    flagged = {m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True}
    return [m for m in flagged if not any(o in flagged for o in m.modules() if o is not m)]


def _checkpointing(flags):
    """Checkpointing per decoder layer as a report's config says it: True or False for all, N for
    every N-th layer from the first (transformers' every_n_layers), else the flags; None: unknown."""
    if not flags:
        return None
    if all(flags) or not any(flags):
        return flags[0]
    every = flags.index(True, 1) if flags.count(True) > 1 else len(flags)
    return every if flags == [i % every == 0 for i in range(len(flags))] else flags


def _adapter(module):
    """(base linear, {r, experts, impl, dropout}) of a LoRA layer, else None: ilora.py's gated one
    (n_experts, base), or PEFT's (r, lora_alpha, lora_dropout: dicts by adapter name, lora_A), its
    linear as base_layer or, as PEFT 0.3 and its forks build it, the layer itself (an nn.Linear);
    a fork's mixture of experts counts them in one of EXPERT_COUNTS (their form is traced)."""
    if hasattr(module, "n_experts") and hasattr(module, "base"):
        return module.base, {"r": module.r, "experts": module.n_experts, "impl": module.impl,
                             "dropout": getattr(module.lora_dropout, "p", 0.0)}
    base = getattr(module, "base_layer", module if isinstance(module, torch.nn.Linear) else None)
    ranks, alphas = getattr(module, "r", None), getattr(module, "lora_alpha", None)
    name = next(iter(ranks), None) if isinstance(ranks, dict) else None
    if base is None or not hasattr(module, "lora_A") or not isinstance(alphas, dict) or name not in alphas:
        return None
    dropouts = getattr(module, "lora_dropout", {})
    experts = next((n for a in EXPERT_COUNTS if type(n := getattr(module, a, None)) is int and n > 0), 1)
    return base, {"r": ranks[name], "experts": experts, "impl": "lean", "alpha": alphas[name],
                  "dropout": getattr(dropouts[name], "p", 0.0) if name in dropouts else 0.0}


def _outside_layers(model):
    """{module: name} of the LoRA adapters outside the decoder layers (on lm_head, embed_tokens)."""
    layers = decoder_layers(_language_model(model) or model)   # (in a LightningModule, say)
    inside = {id(m) for m in layers.modules()} if layers is not None else None
    return {m: name.rpartition(".")[2] for name, m in model.named_modules()
            if inside is not None and id(m) not in inside and _adapter(m) is not None}


def _adapters(model):
    """The LoRA adapters in `model`: their kind, rank, alpha, experts, dropout and target names (of
    those in the decoder layers: ref_train.py adapts no other), and the names of those outside them."""
    outside = _outside_layers(model)
    lora_outside = sorted(set(outside.values())) or None
    found = [(name, m, a[1]) for name, m in model.named_modules()
             if m not in outside and (a := _adapter(m)) is not None]
    if not found:
        return {"adapters": None, "lora_outside": lora_outside}
    _, first, lora = found[0]
    kinds = {"gated_lora" if hasattr(m, "n_experts") or a["experts"] > 1 else "peft_lora"
             for _, m, a in found}
    # (a gated layer keeps its scaling, alpha / (r / experts))
    alpha = lora["alpha"] if "alpha" in lora else first.scaling * lora["r"] / lora["experts"]
    base_layer = _adapter(first)[0]
    base, in_base = base_layer.weight, {id(p) for p in base_layer.parameters(recurse=base_layer is not first)}
    own = next((p for p in first.parameters() if id(p) not in in_base and p.requires_grad), base)
    # in ref_train.py's words: fp32 LoRA weights, or in the model's dtype ("match")
    lora_dtype = ("fp32" if own.dtype == torch.float32 else "match" if own.dtype == base.dtype
                  else str(own.dtype))
    return {"adapters": ",".join(sorted(kinds)), "r": lora["r"], "alpha": alpha, "experts": lora["experts"],
            "dropout": lora["dropout"], "targets": sorted({name.rpartition(".")[2] for name, _, _ in found}),
            "lora_dtype": lora_dtype, "lora_outside": lora_outside}


def unwrapped_optimizer(optimizer):
    """The torch optimizer in `optimizer` (accelerate's wrapper, as the HF Trainer holds it, has it)."""
    return getattr(optimizer, "optimizer", optimizer)


def stepped_params(optimizer):
    """The parameters `optimizer` steps (none for one without param groups)."""
    groups = getattr(unwrapped_optimizer(optimizer), "param_groups", ())
    return [p for group in groups for p in group["params"]]


def _optimizer_kind(optimizer):
    """The optimizer's class, and amsgrad, which adds a state (in any of its groups)."""
    optimizer = unwrapped_optimizer(optimizer)
    if optimizer is None:
        return None
    amsgrad = any(group.get("amsgrad") for group in getattr(optimizer, "param_groups", []))
    return type(optimizer).__name__ + (" (amsgrad)" if amsgrad else "")


def _not_reproduced(model, lm, seen, optimizer, lora_outside):
    """What a probed stack does that ref_train.py has no flag for: its baseline leaves it out."""
    found = [f"LoRA on {name} (the reference adapts the decoder layers' linears only)"
             for name in lora_outside or ()]
    if optimizer not in (None, "Adam", "AdamW"):
        found.append(f"optimizer {optimizer} (the reference steps AdamW)")
    if any(any(getattr(m, "use_dora", {}).values()) for m in model.modules()):
        found.append("DoRA")
    if any(any(getattr(m, "use_rslora", {}).values()) for m in model.modules()):
        found.append("rsLoRA (scaling alpha / sqrt(r))")   # (the same memory; another scale)
    found += [f"modules_to_save ({name.rpartition('.')[2]})" for name, m in model.named_modules()
              if type(m).__name__ == "ModulesToSaveWrapper"]
    if any(type(m).__name__.startswith("TrainableTokens") for m in model.modules()):
        found.append("trainable tokens")
    layers = (decoder_layers(lm) if lm is not None else None) or []
    adapted = sum(any(_adapter(m) for m in layer.modules()) for layer in layers)
    if 0 < adapted < len(layers):
        found.append(f"adapters on {adapted} of {len(layers)} decoder layers")
    found += [f"FSDP2's MixedPrecisionPolicy (parameters gathered in {dtype})"
              for dtype in fsdp2_cast_dtypes(model)]
    if "backward" in seen.get("gradients_held", ()):
        found.append("gradients held from one backward to the next (accumulation, or zero_grad "
                     "that keeps them)")
    return found or None


def _unique_params(modules):
    """Every parameter of `modules` once (tied weights and shared modules counted once)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    return list({id(p): p for p in params}.values())


def _bytes_by_dtype(params):
    by_dtype = {}
    for p in params:
        key = str(p.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    return by_dtype


def baseline_command(config):
    """The ref_train.py command that trains what a probed stack trains, done right; None where it
    cannot: no forward seen, or no LoRA adapter (the reference trains LoRA adapters only)."""
    if not config.get("bs") or not config.get("adapters"):
        return None
    weights = max(config["param_bytes_by_dtype"], key=config["param_bytes_by_dtype"].get, default="float32")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(weights, "fp32")
    if config.get("autocast"):
        precision = {"float16": "16-mixed", "bfloat16": "bf16-mixed"}[config["autocast"]]
        precision += f" --weights-dtype {short}" if short != "fp32" else ""
    else:
        precision = {"fp32": "32", "bf16": "bf16-true", "fp16": "16-true"}[short]
    flags = [f"--bs {config['bs']} --seq {config['seq']}"]
    if config.get("model") or config.get("model_config"):
        flags.append(f"--model {config.get('model') or config['model_config']}")
    if config.get("vocab_rows"):   # the stack's, whatever its tokenizer's size: no placeholder added
        flags.append(f"--vocab {config['vocab_rows']} --no-add-tokens")
    flags.append(f"--lora-r {config['r']} --alpha {config['alpha']:g} --experts {config['experts']} "
                 f"--dropout {config['dropout']:g} --targets {','.join(config['targets'])}"
                 + ("" if config.get("inject_items") else " --no-inject-items")
                 + (" --lora-dtype match" if config.get("lora_dtype") == "match" else ""))
    # Measured, or before any backward (an OOM in step 1) as configured.
    checkpointing = config.get("checkpointing")
    checkpointing = config.get("checkpointing_enabled") if checkpointing is None else checkpointing
    if isinstance(checkpointing, list):  # some layers, in no every-N-th pattern: ref_train cannot
        return None
    ckpt = "none" if not checkpointing else "manual" + ("" if checkpointing is True
                                                        else f" --ckpt-every {checkpointing}")
    flags.append(f"--precision {precision} --ckpt {ckpt}")
    if config.get("world_size", 1) > 1:  # --bs is per rank, as the probe saw it
        flags.insert(0, f"--strategy {config['strategy']}")
        return f"torchrun --nproc_per_node {config['world_size']} ref_train.py " + " ".join(flags)
    return "python ref_train.py " + " ".join(flags)


def reference_line(config):
    """The line naming a probed stack's reference: its baseline command, why there is none (no LoRA
    adapter, layers checkpointed in a pattern ref_train.py has no flag for), or None (the
    reference's own report, or no training forward seen)."""
    if config.get("baseline_command"):
        left_out = config.get("not_reproduced")
        return f"{REFERENCE}: {config['baseline_command']}" + (
            f" (it leaves out what it has no flag for: {'; '.join(left_out)})" if left_out else "")
    if config.get("probe") and config.get("bs") and not config.get("adapters"):
        outside = config.get("lora_outside")
        return (f"{REFERENCE}: none; ref_train.py adapts the decoder layers' linears, and this model's LoRA "
                f"is only on {' and '.join(outside)}" if outside else NO_LORA_BASELINE)
    if isinstance(config.get("checkpointing"), list):
        layers = [i for i, c in enumerate(config["checkpointing"]) if c]
        return (f"{REFERENCE}: none; layers {', '.join(map(str, layers))} were checkpointed, and "
                "ref_train.py checkpoints every layer, none, or every N-th from the first (--ckpt-every)")
    return None


# ---------------------------------------------------------------- callbacks for Lightning and the HF Trainer

def lightning_callback(path, **probe_kwargs):
    """A Lightning Callback that measures fit() into the report at `path`, however fit() ends."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

    class MemcheckCallback(Callback):
        probe, loss, stepped = None, None, False

        def on_train_start(self, trainer, pl_module):
            self.loss, self.stepped = None, False   # (a callback may serve several fits)
            self.probe = Probe(pl_module, trainer.optimizers, path=path, **probe_kwargs).__enter__()
            if not self.probe.allocator_only:   # (which hooks nothing)
                self.probe._stack.watch_wrapper(trainer.strategy.model)
            for optimizer in trainer.optimizers:   # (several under manual optimization: each ends it)
                _end_phase_with_step(optimizer, self.probe)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.probe.begin("forward")

        def on_before_backward(self, trainer, pl_module, loss):
            self.probe.begin("backward")  # begin() closes the open phase

        def on_after_backward(self, trainer, pl_module):   # (a micro-batch that does not step ends here)
            self.probe.end()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.probe.begin("optimizer")
            self.stepped = True

        def on_validation_start(self, trainer, pl_module):   # (and its epoch's end, the outputs gathered)
            if self.probe is not None and self.probe._open:  # (not the sanity check, nor validate() after)
                self.probe.begin("eval")

        def on_validation_end(self, trainer, pl_module):
            if self.probe is not None:
                self.probe.end()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # A step is the optimizer's: its loss the sum of its micro-batches' (each divided by
            # accumulate_grad_batches, as Lightning divides them)
            self.loss = _added_loss(self.loss, outputs.get("loss") if isinstance(outputs, dict) else outputs)
            if self.stepped or trainer.accumulate_grad_batches == 1:
                self.probe.step(self.loss)
                self.loss, self.stepped = None, False

        def on_train_end(self, trainer, pl_module):
            self.probe.close()

        def on_exception(self, trainer, pl_module, exception):
            if self.probe is not None:
                self.probe.close(exception)

    return MemcheckCallback()


def _loss_value(loss):
    """A loss as a float; None where it is none, or not one number (no reason to stop a training)."""
    try:
        return None if loss is None else float(loss if isinstance(loss, (int, float))
                                                else torch.as_tensor(loss).detach())
    except (TypeError, ValueError, RuntimeError):
        return None


def _added_loss(total, loss):
    """A step's loss so far, with one micro-batch's `loss` added (None while none is known)."""
    loss = _loss_value(loss)
    return total if loss is None else (total or 0.0) + loss


def _end_phase_with_step(optimizer, probe):
    """Lightning's closure, on_before_optimizer_step and update all run inside the optimizer's step:
    the phase ends as it returns, before the user's on_train_batch_end callbacks (undone at close)."""
    before, step = vars(optimizer).get("step"), optimizer.step  # (an LR scheduler's wrapper, or None)

    @functools.wraps(step)  # keeps the LR scheduler's mark on optimizer.step
    def stepped(_, *args, **kwargs):
        result = step(*args, **kwargs)
        probe.end()  # (not on an error: an OOM is recorded in the phase it came in)
        return result
    # a bound method, as an LR scheduler made later wraps it (it reads step.__func__)
    optimizer.step = types.MethodType(stepped, optimizer)
    probe._scope.callback(lambda: vars(optimizer).pop("step", None) if before is None
                          else setattr(optimizer, "step", before))


def _running_trainer():
    """The transformers Trainer whose method is running further up this thread, or None."""
    from transformers import Trainer
    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), Trainer):
        frame = frame.f_back
    return None if frame is None else frame.f_locals["self"]


def _closing_on_error(fn, callback, phase=None, returned=None):
    """`fn` that closes `callback`'s probe (writing its report) if it raises; measured as `phase`;
    what it returns also given to `returned`."""
    @functools.wraps(fn)  # keeps the LR scheduler's mark on optimizer.step
    def wrapped(*args, **kwargs):
        if phase:
            callback.probe.begin(phase)
        try:
            result = fn(*args, **kwargs)
            if returned:
                returned(result)
            return result
        except BaseException as e:
            callback._close(e)
            raise
        finally:
            if phase:
                callback.probe.end()
    return wrapped


# What train() runs after on_train_begin, where an error can come from (what a transformers version
# lacks is skipped): wrapped for a callback added by add_callback(), whose train() is not.
_HF_TRAINER_METHODS = ("training_step", "evaluate", "_run_epoch", "get_batch_samples",
                       "_maybe_log_save_evaluate")


def hf_callback(path, **probe_kwargs):
    """A transformers TrainerCallback that measures train() into the report at `path`. Forward and
    backward are one phase (no hook between them). The Trainer has no hook for exceptions: its train()
    is wrapped, and what runs inside it, so that an error anywhere closes the probe and writes the
    report."""
    from transformers import TrainerCallback

    class MemcheckCallback(TrainerCallback):
        probe, wrapped, loss = None, (), None

        def on_init_end(self, args, state, control, **kwargs):
            trainer = _running_trainer()
            if trainer is not None:  # (kept for the trainer's life: it acts only while a probe is open)
                trainer.train = _closing_on_error(trainer.train, self)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            failed, self.probe = self.probe, Probe(model, optimizer, path=path, **probe_kwargs).__enter__()
            self.loss = None   # (not a failed try's, before auto_find_batch_size's retry)
            if args.auto_find_batch_size and failed is not None and failed.status == "oom":
                # The Trainer retries at a smaller batch: the OOM stays, recovered at the next step.
                self.probe.status, self.probe.error, self.probe.oom = failed.status, failed.error, failed.oom
            trainer = _running_trainer()
            if not self.probe.allocator_only:   # (which hooks nothing)
                self.probe._stack.watch_wrapper(getattr(trainer, "model_wrapped", None))
            owners = [(trainer, name) for name in _HF_TRAINER_METHODS] + [
                (optimizer, "step"), (getattr(trainer, "callback_handler", None), "call_event")]
            self.wrapped = [(owner, name) for owner, name in owners if hasattr(owner, name)]
            for owner, name in self.wrapped:  # evaluation, its gathering and metrics, is a phase of its own
                phase = "eval" if name == "evaluate" else None
                returned = self._add_loss if owner is trainer and name == "training_step" else None
                setattr(owner, name, _closing_on_error(getattr(owner, name), self, phase, returned))

        def _add_loss(self, loss):   # (divided by the micro-batches of a step: their sum is its loss)
            self.loss = _added_loss(self.loss, loss)

        def _close(self, error=None):
            for owner, name in self.wrapped:  # the instance attribute goes, the method is back
                if name in vars(owner):
                    delattr(owner, name)
            if self.probe is not None and self.probe._open:
                self.probe.close(error)

        def on_step_begin(self, args, state, control, **kwargs):
            self.probe.begin(FORWARD_BACKWARD)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.probe.begin("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.probe.end()  # the user's on_step_end callbacks are no part of it

        def on_step_end(self, args, state, control, **kwargs):
            self.probe.step(self.loss)
            self.loss = None

        def on_train_end(self, args, state, control, **kwargs):
            self._close()

    return MemcheckCallback()


def environment(device):
    try:
        from transformers import __version__ as transformers_version
    except ImportError:
        transformers_version = None
    device, cpu = torch.device(device), platform.processor() or "cpu"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers_version, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- leaks

def find_leak(steps, survivors=(), kept_steps=0):
    """Live memory that grows at every step after the first, over three steps or more, by any amount:
    the tracker is exact, and a one-off cache does not grow every step. Where the batches grew too
    (`batches_grew`: their `tokens` never fewer, and more by the last step: sorted by length, say),
    what a step leaves alive (its batch, the next one read ahead, its output) grows with them: then
    only tensors kept from `kept_steps` >= 3 earlier steps (_keep_survivors) tell a leak (a running
    loss made in the first step, beside a batch read ahead, is two)."""
    ends, tokens = [s["live_bytes"] for s in steps], [s.get("tokens") for s in steps]
    growth = [b - a for a, b in zip(ends, ends[1:])]
    # Two intervals at least: a single one cannot tell a leak from a one-off allocation.
    grew = len(growth) >= 2 and all(g > 0 for g in growth)
    batches_grew = grew and None not in tokens and (tokens[0] < tokens[-1]
                                                    and all(map(operator.le, tokens, tokens[1:])))
    detected = grew and (not batches_grew or kept_steps >= 3)
    return {"detected": detected, "batches_grew": batches_grew and not detected,
            "bytes_per_step": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else 0.0,
            "step_end_bytes": ends, "survivors": list(survivors) if detected else []}


# ---------------------------------------------------------------- reports

def write_report(path, report):
    """Write JSON atomically: a reader never sees half a report, even if the run dies while writing.
    Through a symbolic link: its target is written, and the link stays."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".memcheck-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual permissions, not the temporary file's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _check_fields(path, record, kinds, where=""):
    """ReportError unless `record` is an object whose every field in `kinds` is of its kind."""
    if not isinstance(record, dict):
        what = f"field {where.rstrip('.')}" if where else "the report"
        raise ReportError(f"{path}: {what} is {type(record).__name__} {record!r:.40}, expected an object")
    for key, kind in kinds.items():
        value = record.get(key, _MISSING)
        if isinstance(kind, dict):  # an object whose own fields are checked
            _check_fields(path, value, kind, f"{where}{key}.")
        elif not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool) or (
                kind is int and value < 0):   # (a report's integers count bytes or steps)
            expected = _KIND_NAMES.get(kind) or " or ".join(_KIND_NAMES[k] for k in kind)
            got = "missing" if value is _MISSING else f"{type(value).__name__} {value!r:.40}"
            name = where + key if where else repr(key)
            raise ReportError(f"{path}: field {name} is {got}, expected {expected}")


def _check_report(path, report):
    """ReportError naming the first field the report, diff or the verdict would misread."""
    _check_fields(path, report, REPORT_FIELDS)
    _check_fields(path, report, {k: v for k, v in _NESTED_FIELDS.items() if report.get(k) is not None})
    _check_fields(path, report, {k: list for k in _ENTRY_FIELDS if report.get(k) is not None})
    for field, kinds in _ENTRY_FIELDS.items():
        for i, entry in enumerate(report.get(field) or []):
            _check_fields(path, entry, kinds, f"{field}[{i}].")
    for name, stats in report["phases"].items():
        counts = ["peak_bytes", "live_bytes"] + [k for k in stats if k.endswith("_bytes")] \
            if isinstance(stats, dict) else []
        _check_fields(path, stats, dict.fromkeys(counts, int), f"phases[{name!r}].")
    _check_fields(path, report["categories"], dict.fromkeys(report["categories"], int), "categories.")
    if not all(isinstance(p, str) for p in report.get("rank_reports") or []):
        raise ReportError(f"{path}: field 'rank_reports' is {report['rank_reports']!r:.60}, expected "
                          "file names")
    for rank, entry in enumerate(report.get("ranks") or []):
        _check_report(f"{path} (rank {rank})", entry)
    if report.get("status", "ok") not in STATUSES:
        raise ReportError(f"{path}: status {report['status']!r}, expected one of {', '.join(STATUSES)}")


def _other_ranks(path):
    """The reports a run of ranks wrote where `path`'s would be: NAME.rankN.json beside it (a rank's, or
    a process's that a launcher started in no group), or the same name in a folder named by another rank
    ({rank} in a folder: a single run's there is an experiment's numbered folder, not a rank's)."""
    stem, ext = os.path.splitext(str(path))
    found = [p for p in glob.glob(f"{glob.escape(stem)}.rank*{glob.escape(ext)}")
             if re.fullmatch(r"\.rank\d+", p[len(stem):len(p) - len(ext)]) and _world_size(p)]
    folder, name = os.path.split(str(path))
    if name and os.path.basename(folder).isdigit():
        beside = os.path.join(glob.escape(os.path.dirname(folder)), "*", glob.escape(name))
        found += [p for p in glob.glob(beside)
                  if os.path.basename(os.path.dirname(p)).isdigit() and _world_size(p) > 1]
    return sorted(found, key=lambda p: (len(p), p))


def _world_size(path):
    """The world size a memcheck report at `path` records; 0 where `path` holds none."""
    try:
        with open(path) as f:
            report = json.load(f)
        world_size = report.get("world_size", 1) if "schema" in report else 0
        return world_size if type(world_size) is int and world_size > 0 else 0
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def read_report(path):
    """A memcheck report from `path`, checked field by field; ReportError says what is wrong."""
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as e:
        others = _other_ranks(path) if isinstance(e, FileNotFoundError) else []
        listed = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise ReportError(f"{path}: cannot read ({e.strerror})" + (
            f"; the reports of a run of ranks are there ({listed}): a rank that its launcher stopped, as "
            "another failed, writes none" if others else ""))
    except ValueError as e:  # a binary file (UnicodeDecodeError), or JSONDecodeError
        what = f"not JSON ({e.msg} at line {e.lineno})" if hasattr(e, "lineno") else "a binary file, not JSON"
        raise ReportError(f"{path}: {what}; expected a memcheck report")
    if not isinstance(report, dict) or "schema" not in report:
        raise ReportError(f"{path}: not a memcheck report (no 'schema' field)")
    if report["schema"] != SCHEMA:
        raise ReportError(f"{path}: schema {report['schema']!r}, this memcheck reads {SCHEMA!r}")
    _check_report(path, report)
    return report


AS_EXPECTED = 0.03  # within it of the budget a run is "as expected"; warnings this heavy are named


def verdict(report):
    """The measured training peak against the budget (budget.py's verdict), or how to get one."""
    try:
        from budget import verdict as budget_verdict  # late: budget.py imports this file
    except ImportError:  # no budget.py beside this file
        return report.get("no_budget", NO_BUDGET) + named_warnings(report)
    return budget_verdict(report)


def named_warnings(report):
    """'; WARNING ...' naming the weighty warnings, or nothing."""
    heavy = weighty_warnings(report) if report.get("peak_bytes") else []
    return f"; WARNING {', '.join(heavy)}" if heavy else ""


def weighty_warnings(report):
    """'kind N.N MiB' of each warning that weighs 3% of the peak or more, and any oom_caught, no_grad
    or eval_mode (a run that does not train as it should: its peak may read as expected)."""
    warnings = report.get("warnings") or []
    on = lambda w: (f", on rank {w['rank']}" if w.get("rank") is not None
                    else f", on ranks {', '.join(map(str, w['on_ranks']))}" if w.get("on_ranks") else "")
    return ([f"oom_caught ({w['count']}x, in {', '.join(w['caught_in'])}{on(w)})" for w in warnings
             if w["kind"] == "oom_caught"]
            + [f"no_grad ({w['count']} of {w['of']} trainable parameters got no gradient{on(w)})"
               for w in warnings if w["kind"] == "no_grad"]
            + [f"eval_mode (dropout off{on(w)})" for w in warnings if w["kind"] == "eval_mode"]
            + [f"{w['kind']} {mib(w['bytes'])} MiB{on(w)}" for w in warnings
               if w.get("bytes", 0) >= AS_EXPECTED * w.get("rank_peak_bytes", report["peak_bytes"])])


def _largest_temporary(report):
    top = (report.get("temporaries") or [{}])[0]
    return f", mostly {top['shape']} {top['dtype']} from {top['op']} in {top['module']}" if top else ""


# ---------------------------------------------------------------- tables

def text_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                                for i, (x, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def markdown_table(header, rows):
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _phase_table(report):
    planned = (report.get("budget") or {}).get("phases", {})
    return ("phase", "live MiB", "peak MiB", "budget MiB"), [
        (name, mib(stats["live_bytes"]), mib(stats["peak_bytes"]),
         "-" if _phase_peak(planned, name) is None else mib(_phase_peak(planned, name)))
        for name, stats in report["phases"].items()]


def _report_lines(report):
    """What a report says in words, before and after its phase table: weights; then how the run
    ended, the peak and its verdict, categories, modules, leak, warnings and the baseline."""
    cats, config, params = (report.get(key) or {} for key in ("categories", "config", "params"))
    oom, leak, peak, lines = report.get("oom"), report["leak"], report["peak_bytes"], []
    lines += [report["allocator_only"]] if report.get("allocator_only") else []
    weights = cats.get("trainable_params", 0) + cats.get("frozen_params", 0)
    # more than half of the peak, what to look at first; after an OOM, of what the budget needs
    needs = (report.get("budget") or {}).get("peak_bytes") if oom else None
    whole, of = (needs, "the budget") if needs else (peak, "the peak")
    if whole and 2 * weights > whole:
        count = config.get("param_count") or params.get("trainable", 0) + params.get("frozen", 0)
        by_dtype = config.get("param_bytes_by_dtype") or {}
        dtype = max(by_dtype, key=by_dtype.get) if by_dtype else params.get("dtype", "")
        model = config.get("model_class") or config.get("model")
        sharded = config.get("strategy") == "fsdp" and config.get("world_size", 1) > 1
        lines.append(f"the weights are {weights / whole:.0%} of {of}: {model}, {count:,} parameters, "
                     f"{dtype}, {mib(weights)} MiB" + (" on this rank at the peak (FSDP: its shards, and "
                                                        "what it had gathered whole then)" if sharded else ""))
    head, lines = lines, _how_it_ended(report)
    if report["peak_phase"] is not None:
        lines.append(f"peak {mib(peak)} MiB in {report['peak_phase']}; {verdict(report)}")
    else:   # (stopped while loading: against a budget where the run has one)
        lines.append("peak: not measured (no training phase finished)"
                     + (f"; {verdict(report)}" if oom and report.get("budget") else ""))
    if any(cats.values()):
        lines.append("at the peak: " + " | ".join(f"{c.replace('_', ' ')} {mib(v)}"
                                                 for c, v in cats.items() if v))
    if report.get("modules"):
        lines.append("saved activations by module: " + ", ".join(
            f"{m['module']} {mib(m['bytes'])}" for m in report["modules"][:5]))
    shown = [t for t in (report.get("temporaries") or [])[:3] if mib(t["bytes"]) != "0.0"]
    if shown:
        lines.append("largest temporaries: " + ", ".join(
            f"{t['shape']} {t['dtype']} from {t['op']} in {t['module']} {mib(t['bytes'])}" for t in shown))
    if params:
        lines.append(f"parameters: {params['trainable']:,} trainable, {params['frozen']:,} frozen")
    if len(leak["step_end_bytes"]) < 3:
        lines.append("leak: not measured (it takes three finished steps or more)")
    elif leak.get("batches_grew"):
        lines.append("leak: not told apart: live memory at the end of each step grew, and so did the batches "
                     "(sorted by length?); what a step leaves alive (its batch, its output) grows with them. "
                     "A leak shows with batches of one length")
    elif not leak["detected"]:
        lines.append("leak: none (live memory at the end of each step does not grow)")
    lines += [f"WARNING {w['kind']}: {w['message']}" for w in report.get("warnings") or []]
    reference = reference_line(config)
    return head, lines + ([reference] if reference else [])


def _how_it_ended(report):
    """The lines on a run that ran out of memory, failed, or recovered from an OOM; none if it ended
    well."""
    oom, lines = report.get("oom"), []
    if oom:
        inside = f", inside {oom['module']}" if oom.get("module", NO_MODULE) != NO_MODULE else ""
        lines.append(f"OUT OF MEMORY in {oom_when(oom)}{inside}: {oom['message']}")
        handling = oom.get("while_handling")
        if handling:
            lines.append(f"it came as the code of {handling['module']} handled an earlier one, raised in it "
                         f"(an except or finally clause that allocates): {handling['message']}")
    elif report.get("status", "ok") != "ok":
        lines.append(f"run {report['status'].upper()}: {report.get('error')}")
    if report.get("status") in ("error", "oom") and report.get("caught_ooms"):
        lines.append("before it, memory ran out inside the model, and its code caught it (WARNING oom_caught)")
    if report.get("recovered_oom"):
        lines.append(_recovered(report["recovered_oom"]))
    return lines


def format_report(report):
    """What a person reads at a glance: weights, phases, verdict, categories, modules, leak, warnings."""
    head, tail = _report_lines(report)
    return "\n".join(head + [text_table(*_phase_table(report)), ""] + tail)


def _at_or_after(step, after):
    """'at step N', or for an evaluation between steps 'after step N' ('before the first step')."""
    return (f"after step {step}" if step else "before the first step") if after else f"at step {step}"


def oom_when(oom):
    """The phase an OOM came in, and the step but for loading (before any step)."""
    if oom["phase"] == "load":
        return "load"
    return f"{oom['phase']} {_at_or_after(oom['step'], oom.get('after_step'))}"


def _recovered(oom):
    inside = f", inside {oom['module']}" if oom.get("module", NO_MODULE) != NO_MODULE else ""
    return (f"out of memory in {oom_when(oom)}{inside} ({oom['message']}), and the "
            f"loop went on: step {oom['recovered_at_step']} finished after it")


def markdown_block(title, tables, env=None, command=None):
    """A block to paste into a GitHub issue: versions, device, command line, then the tables."""
    env = env or environment("cpu")
    lines = [f"### {title}", "",
             f"- command: `{command or ' '.join(['python'] + sys.argv)}`",
             f"- device: {env['device']} ({env['cpu_cores']} cores)",
             f"- python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"CUDA {env['cuda'] or 'none'}", ""]
    for header, rows in tables:
        lines += [markdown_table(header, rows), ""]
    return "\n".join(lines).rstrip()


def markdown_report(report, more=()):
    """The report as a block for a GitHub issue: its tables, then what it says in words (and the
    lines `more`), fenced as text: an error's `__init__` or `<lambda>` is never read as markdown."""
    cats = [(c.replace("_", " "), mib(v)) for c, v in (report.get("categories") or {}).items()]
    peak = ("peak not measured" if report["peak_phase"] is None
            else f"peak {mib(report['peak_bytes'])} MiB in {report['peak_phase']}")
    block = markdown_block(f"memcheck: {peak} ({verdict(report)})",
                           [_phase_table(report)] + ([(("at the peak", "MiB"), cats)] if cats else []),
                           report["env"], report["command"])
    return "\n".join([block, "", "```text", *sum(_report_lines(report), []), *more, "```"])


# ---------------------------------------------------------------- many ranks (torchrun: DDP, FSDP)

RANK_IMBALANCE = 0.05  # ranks' peaks further apart than this: one rank holds more than the others
# FSDP frees and regathers a parameter by resizing its storage, unseen by a dispatch mode: where it
# does, as (module, its free, its alloc) of FSDP1 and FSDP2.
_FSDP_STORAGE = (("torch.distributed.fsdp._flat_param", "_free_storage", "_alloc_storage"),
                 ("torch.distributed.fsdp._fully_shard._fsdp_param", "free_storage", "alloc_storage"),
                 ("torch.distributed.fsdp._fully_shard._fsdp_param_group", None, "alloc_storage"))


def rank_and_world():
    """(this process's rank, the world size) from torch.distributed; (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# What each launcher tells the processes it starts: (its name, a variable it sets, rank, count). The
# innermost first: torchrun's or mpirun's processes inherit the variables of an srun step around them.
_LAUNCHERS = (("torchrun", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"),
              ("mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
              ("mpirun", "PMI_SIZE", "PMI_RANK", "PMI_SIZE"),
              ("srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"))


def _launched_alone(world_size):
    """(rank, world size, launcher) that a launcher's environment gives a process in no process group
    (`world_size`, the group's, is 1), as a script that never joins one gets: the innermost launcher
    that started more than one; None where the process is in a group, or alone."""
    if world_size > 1:
        return None
    for name, own, rank_variable, size_variable in _LAUNCHERS:
        if own not in os.environ:   # (its own variable: not a stale or another launcher's RANK)
            continue
        try:
            rank, world_size = int(os.environ[rank_variable]), int(os.environ[size_variable])
        except (KeyError, ValueError):
            continue
        if world_size > 1 and 0 <= rank < world_size:
            return rank, world_size, name
    return None


def launch():
    """An id of this launch of ranks, for a report read beside its ranks' (a rank killed before it
    wrote leaves the last launch's file there): drawn by the first rank to ask and kept for the
    others by the process group's store, which no rank waits on; None where the store cannot say."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        drawn = store.compare_set("memcheck/launch", "", uuid.uuid4().hex)
    except Exception:
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")   # (torchrun's restarts keep the store)
    return f"{drawn.decode() if isinstance(drawn, bytes) else drawn}/{restart}"


def _same_launch(a, b):
    """Whether reports a and b are of one launch (so taken where either does not say)."""
    return a.get("launch") is None or b.get("launch") is None or a["launch"] == b["launch"]


def rank_paths(path, world_size):
    """Every rank's report path: `{rank}` in `path` filled in, or stack.json, stack.rank1.json, ..."""
    if "{rank}" in path:
        return [path.replace("{rank}", str(r)) for r in range(world_size)]
    root, ext = os.path.splitext(path)
    return [path] + [f"{root}.rank{r}{ext}" for r in range(1, world_size)]


def rank_reports(paths, rank):
    """Every rank's report path (`paths`), relative to rank `rank`'s: what its report records, so that
    diff finds them beside it."""
    here = os.path.dirname(paths[rank]) or "."
    return [os.path.relpath(p, here) for p in paths]


def flattened_by_fsdp1(model):
    """Whether FSDP1 flattened `model`'s parameters (FlatParameters hide the layers' shapes)."""
    return any(getattr(p, "_fsdp_flattened", False) for p in model.parameters())


def _strategy(model):
    """'fsdp' where a parameter is a DTensor or flattened by FSDP1, or a module is FSDP's; 'ddp' where
    DistributedDataParallel wraps a module; else None (a callback's model is inside the wrapper)."""
    classes = {c.__name__ for x in [*model.modules(), *model.parameters()] for c in type(x).__mro__}
    if flattened_by_fsdp1(model) or classes & {"DTensor", "FSDPModule", "FullyShardedDataParallel"}:
        return "fsdp"
    return "ddp" if "DistributedDataParallel" in classes else None


def _fsdp2_groups(module):
    """The parameter groups FSDP2's fully_shard made of `module` (none where it was not applied)."""
    if not hasattr(module, "_get_fsdp_state"):
        return []
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)   # (older torch: one, _fsdp_param_group)
    return [g for g in (groups if groups is not None else [state._fsdp_param_group]) if g is not None]


def fsdp2_cast_dtypes(model):
    """The dtypes FSDP2's MixedPrecisionPolicy gathers `model`'s parameters in (param_dtype), by name."""
    return sorted({str(g.mp_policy.param_dtype).removeprefix("torch.") for m in model.modules()
                   for g in _fsdp2_groups(m) if g.mp_policy.param_dtype is not None})


def _gathered_category(model):
    """A function of a tensor FSDP2 gathers a parameter into: the parameter's category (trainable_params,
    frozen_params), or None for another tensor. (Its gathered tensors are made at its first gather.)"""
    params = [p for m in model.modules() for g in _fsdp2_groups(m) for p in g.fsdp_params]
    categories = {}

    def category(tensor):
        if id(tensor) not in categories:
            for p in params:
                kind = "trainable_params" if p.sharded_param.requires_grad else "frozen_params"
                categories.update((id(t), kind) for t in getattr(p, "all_gather_outputs", ()))
        return categories.get(id(tensor))
    return category


def fsdp2_sharding(model, lm):
    """fsdp_layers_unsharded and fsdp_layers_kept: decoder layers that FSDP2 keeps gathered longer
    than one at a time, as fully_shard was applied (not to them, or not resharded after forward)."""
    layers = (decoder_layers(lm) if lm is not None else None) or []
    if not any(_fsdp2_groups(m) for m in model.modules()):
        return []
    unsharded = [layer for layer in layers if not any(_fsdp2_groups(m) for m in layer.modules())]
    # (the last layer is often left gathered on purpose: backward starts with it)
    kept = [layer for layer in layers[:-1]
            if any(g.post_forward_mesh_info is None for g in _fsdp2_groups(layer))]
    found = []
    for kind, chosen, message in (
            ("fsdp_layers_unsharded", unsharded, f"fully_shard was not applied to {len(unsharded)} of the "
             f"{len(layers)} decoder layers: they are gathered with the module that holds them, all at once "
             "({mib} MiB, and as much again in its all-gather buffer); call fully_shard on each decoder "
             "layer, then on the model"),
            ("fsdp_layers_kept", kept, f"{len(kept)} decoder layers were sharded with "
             "reshard_after_forward=False: each stays gathered from its forward to its backward ({mib} "
             "MiB at once); leave it True (the default), which gathers a layer again for its backward")):
        size = sum(p.numel() * p.element_size() for layer in chosen for p in layer.parameters())
        if chosen:
            found.append({"kind": kind, "layers": len(chosen), "bytes": size,
                          "message": message.format(mib=mib(size))})
    return found


def _watch_fsdp_storage(tracker, scope, category):
    """Tell `tracker` what FSDP's storage functions free and gather again, until ExitStack `scope` ends;
    a gathered parameter is a parameter (of the category `category` gives its tensor), not the
    activation autograd saves of it."""
    def seen(function, freeing, tensor, *args):
        record = tracker.track(tensor, "free_storage", adopt=False) if freeing else None
        function(tensor, *args)
        if record is not None:
            tracker._free_record(record)
        elif not freeing:   # the storage's new bytes, counted from now
            record, kind = tracker.track(tensor, "alloc_storage"), category(tensor)
            if kind is not None:
                _promote(record, kind)
    for module_name, *names in _FSDP_STORAGE:
        module = sys.modules.get(module_name)  # loaded where FSDP is (another torch may lack one)
        for name, freeing in ((n, f) for n, f in zip(names, (True, False)) if n and hasattr(module, n)):
            scope.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, functools.partial(seen, getattr(module, name), freeing))


def rank_imbalance(ranks):
    """The rank_imbalance warning of a run's rank reports whose peaks are over 5% apart, or None."""
    heavy, light = (f(ranks, key=lambda r: r["peak_bytes"]) for f in (max, min))
    if not 0 < light["peak_bytes"] * (1 + RANK_IMBALANCE) < heavy["peak_bytes"]:
        return None
    more = {c: heavy["categories"].get(c, 0) - light["categories"].get(c, 0) for c in CATEGORIES}
    what, (x, y) = max(more, key=more.get), (light["peak_bytes"], heavy["peak_bytes"])
    held = f": it holds more {what.replace('_', ' ')} (+{mib(more[what])} MiB)" if more[what] > 0 else ""
    return {"kind": "rank_imbalance", "rank": heavy["rank"], "category": what if held else None,
            "bytes": y - x, "message": f"rank {heavy['rank']}'s peak is {y / x:.2f}x rank {light['rank']}'s "
                                       f"({mib(y)} and {mib(x)} MiB){held}"}


# What a rank reports when another rank's failure broke their process group: not a cause
_FALLOUT = ("DistBackendError", "DistNetworkError", "gloo", "NCCL", "closed by peer", "reset by peer")


def _sibling_reports(report, path):
    """Every rank's report, rank 0's (`report`, read from `path`) first: the others beside it, named
    as `path`'s (renamed with it) or as recorded in its rank_reports; and the ranks of a failed run (or
    one whose report was written as it ran) that wrote none (killed first, say)."""
    folder, recorded = os.path.dirname(path), report["rank_reports"]
    reports, missing = [report], []
    for rank, renamed in enumerate(rank_paths(path, len(recorded))[1:], start=1):
        original = os.path.join(folder, recorded[rank])
        found = renamed if os.path.exists(renamed) else original if os.path.exists(original) else None
        sibling = read_report(found) if found else None
        if sibling is None or not _same_launch(report, sibling):
            where = (f"{found} is another launch's" if found else renamed if renamed == original
                     else f"neither {renamed} nor {original}")
            if report.get("status", "ok") == "ok" and not report.get("mid_run"):
                raise ReportError(f"{path}: rank {rank}'s report is missing: {where}")
            missing.append(rank)
            continue
        reports.append(sibling)
    return reports, missing


def _telling_rank(rank_report):
    """Which rank a run is read at, lowest first: one that ran out of memory, one that failed of itself,
    one that stopped (or failed from another's failure), the heaviest of those that finished."""
    status, error = rank_report.get("status", "ok"), str(rank_report.get("error") or "")
    order = (0 if rank_report.get("oom") else 1 if status == "error" and not any(f in error for f in _FALLOUT)
             else 2 if status != "ok" else 3)
    return order, -rank_report["peak_bytes"]


def with_ranks(report, path):
    """A run of several ranks as diff reads it: the report of the rank that tells most (_telling_rank),
    with `ranks` (the reference's, or a probe's rank-0 report's siblings) and rank_imbalance where due
    (ranks that all finished: a stopped one's peak is partial)."""
    if "ranks" not in report and report.get("rank", 0) == 0 and len(report.get("rank_reports") or []) > 1:
        ranks, missing = _sibling_reports(report, path)
        report = dict(report, ranks=ranks, **({"unreported_ranks": missing} if missing else {}))
    ranks = report.get("ranks") or []
    if not ranks:
        return report
    finished = all(r.get("status", "ok") == "ok" for r in ranks)
    telling, imbalance = min(ranks, key=_telling_rank), rank_imbalance(ranks) if finished else None
    warnings = _ranks_warnings(telling, ranks) + ([imbalance] if imbalance else [])
    unreported = {"unreported_ranks": report["unreported_ranks"]} if "unreported_ranks" in report else {}
    return dict(telling, ranks=ranks, warnings=warnings, **unreported)


def _ranks_warnings(telling, ranks):
    """Each kind of warning the ranks raise, the telling rank's first, with its rank named and its
    rank's peak (what its size is weighed against); the OOMs the model caught counted over every rank."""
    found, kinds = [], {"rank_imbalance"}
    for r in [telling, *ranks]:
        for w in r.get("warnings") or []:
            if w["kind"] not in kinds:
                kinds.add(w["kind"])
                found.append(dict(w, rank=r.get("rank"), rank_peak_bytes=r["peak_bytes"],
                                  message=f"on rank {r.get('rank')}: {w['message']}"))
    caught = [(r.get("rank"), w) for r in ranks for w in r.get("warnings") or [] if w["kind"] == "oom_caught"]
    if len(caught) > 1:
        total, on = sum(w["count"] for _, w in caught), [rank for rank, _ in caught]
        merged = dict(caught[0][1], count=total, rank=None, on_ranks=on,
                      caught_in=sorted({p for _, w in caught for p in w["caught_in"]}),
                      message=f"on ranks {', '.join(map(str, on))}, {total} times in all; on rank "
                              f"{on[0]}: {caught[0][1]['message']}")
        found = [merged if w["kind"] == "oom_caught" else w for w in found]
    return found


def _rank_rows(a, b):
    """Each rank's peak, by its rank (None where it wrote no report), where both runs have several."""
    if min(len(a.get("ranks") or []), len(b.get("ranks") or [])) < 2:
        return []
    peaks = [{r.get("rank", i): r["peak_bytes"] for i, r in enumerate(side["ranks"])} for side in (a, b)]
    ranks = sorted({*peaks[0], *peaks[1], *a.get("unreported_ranks", ()), *b.get("unreported_ranks", ())})
    return [(f"rank {rank} peak", peaks[0].get(rank), peaks[1].get(rank)) for rank in ranks]


def _largest_rank_excess(rows):
    """'; rank N has the largest excess (...)' from the rank rows, or nothing."""
    ranks = [(name, x, y) for name, x, y in rows if name.startswith("rank ") and None not in (x, y)]
    name, x, y = max(ranks, key=lambda r: r[2] - r[1], default=("", 0, 0))
    excess = f"{(y - x) / MiB:+.1f}"
    if y <= x or excess == "+0.0":   # (one that rounds to nothing is none)
        return ""
    return f"; {name.replace(' peak', '')} has the largest excess ({excess} MiB)"


# ---------------------------------------------------------------- diff

DIFF_SCHEMA = "memcheck-diff/1"
TOP_DIFF_MODULES = 12     # module rows shown in the text table; --json and the report keep all
SAME_WITHIN = 0.01        # peaks within 1% of each other: the two trainings cost the same
OUTPUT_FLAGS = {"report", "snapshot", "markdown", "model_config"}  # where results go, not what was measured
# Wrappers that sit between a model and its layers without changing them: DDP, torch.compile,
# torch's checkpoint_wrapper, FSDP; and a LoRA layer's base linear (PEFT's base_layer, the gated
# LoRA's base) and PEFT's adapter name (lora_A.default), so that both LoRAs' rows align.
_WRAPPERS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module"
                       r"|base_layer|base)(?=\.|$)")
_ADAPTER_NAME = re.compile(r"(\.lora_(?:A|B|dropout|embedding_A|embedding_B))\.[^.]+")
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _modules_by_group(report):
    """The saved activations by module group: a module's place in the model, whatever wraps it
    (`layers.3.self_attn` -> `layers.*.self_attn`)."""
    groups = {}
    for m in report.get("modules") or []:
        name = _ADAPTER_NAME.sub(r"\1", _WRAPPERS.sub("", m["module"]).lstrip("."))
        g = groups.setdefault(_INDEX.sub(".*", name), {"bytes": 0, "names": set(), "ops": {}})
        g["bytes"] += m["bytes"]
        g["names"].add(name)   # (a LoRA layer and its base linear: one module, x1)
        g["count"] = len(g["names"])
        for op, n in (m.get("ops") or {}).items():
            g["ops"][op] = g["ops"].get(op, 0) + n
    return groups


def _aligned_groups(a, b):
    """Both reports' module groups, one that a side names under a wrapper of its own (the
    reference's `ilora.projector.*`) under the other side's name for it (`projector.*`)."""
    ga, gb = _modules_by_group(a), _modules_by_group(b)
    for one, other in ((ga, gb), (gb, ga)):
        for name in [n for n in one if n not in other]:
            match = next((o for o in other if o not in one and name.endswith("." + o)), None)
            if match is not None:
                one[match] = one.pop(name)
    return ga, gb


def _phase_peak(phases, name):
    """phases: {phase: peak bytes}; an HF Trainer's forward+backward stands for forward and backward
    (the peak of two phases taken together is the larger of their two peaks)."""
    if name == FORWARD_BACKWARD and name not in phases and ("forward" in phases or "backward" in phases):
        return max(phases.get("forward", 0), phases.get("backward", 0))
    return phases.get(name)


def _peak(report):
    """The training peak, None where no training phase finished (a run stopped while loading)."""
    return report["peak_bytes"] if report["peak_phase"] is not None else None


def diff(a, b):
    """Rows (what, A bytes or None, B bytes or None) in the text table's order; None is "not measured
    on that side", never 0. Modules are aligned by their place in the model (_modules_by_group)."""
    rows = [("peak", _peak(a), _peak(b))] + _rank_rows(a, b)
    reserved = [max((s["reserved_bytes"] for name, s in r["phases"].items()
                     if name != "load" and "reserved_bytes" in s), default=None) for r in (a, b)]
    rows += [("reserved", *reserved)] if reserved != [None, None] else []
    pa, pb = ({name: stats["peak_bytes"] for name, stats in r["phases"].items()} for r in (a, b))
    names = dict.fromkeys([p for p in PHASES if p in pa or p in pb] + list(pa) + list(pb))
    rows += [(f"{name} peak", _phase_peak(pa, name), _phase_peak(pb, name)) for name in names]
    rows += [(f"at peak: {c.replace('_', ' ')}", a["categories"].get(c), b["categories"].get(c))
             for c in CATEGORIES]
    ga, gb = _aligned_groups(a, b)
    size = lambda groups, g: groups.get(g, {}).get("bytes", 0)
    # (ties by name: a set's order changes with the hash seed, and the table shows the first rows)
    for g in sorted(set(ga) | set(gb), key=lambda g: (-abs(size(gb, g) - size(ga, g)), g)):
        count = max(ga.get(g, {}).get("count", 0), gb.get(g, {}).get("count", 0))
        if g.startswith("(op "):  # made outside any module: the op names the row in both stacks
            label = "op " + g[len("(op "):].replace(", outside any module)", " (outside any module)")
        else:
            label = f"module {g}" + (f" (x{count})" if "*" in g else "")
        rows.append((label, *(size(groups, g) if _peak(r) is not None and not r.get("allocator_only")
                              else None for groups, r in ((ga, a), (gb, b)))))
    # growth in a run the report found no leak in reads 0 (memory that shrank reads none)
    leak = lambda r: (r["leak"]["bytes_per_step"] if r["leak"]["detected"]
                      else min(r["leak"]["bytes_per_step"], 0))
    rows.append(("leak per step (bytes)", *(leak(r) if len(r["steps"]) > 1 else None for r in (a, b))))
    return rows


def _dominant_op(groups, label, net):
    """(op, excess bytes) when one op explains most of a module row's `net` excess (_net_of_moves'),
    else None, from both reports' `groups` (_aligned_groups'). An op whose excess is more than the net
    holds bytes that moved from the modules inside; where that leaves no op to name, the moved bytes
    are taken off the op whose change is closest to them instead (the op that made them here)."""
    group = label[len("module "):].split(" (x")[0]
    ops_a, ops_b = (side.get(group, {}).get("ops", {}) for side in groups)
    excess = {op: ops_b.get(op, 0) - ops_a.get(op, 0) for op in sorted(set(ops_a) | set(ops_b))}
    moved = sum(excess.values()) - net
    if not moved:
        return _explaining(excess, net)
    found = _explaining({op: e for op, e in excess.items() if abs(e) <= abs(net)}, net)
    carriers = [op for op, e in excess.items() if e * moved > 0]
    if found is None and carriers:
        carrier = min(carriers, key=lambda o: abs(excess[o] - moved))
        found = _explaining(dict(excess, **{carrier: excess[carrier] - moved}), net)
    return found


def _explaining(excess, net):
    """The (op, excess) of {op: excess} that is most of `net`, else None (ties: the first by name)."""
    op = max(excess, key=lambda o: abs(excess[o]), default=None)
    return (op, excess[op]) if op is not None and net and excess[op] / net > 0.5 else None


def config_differences(a, b):
    """{key: [A's, B's]} over the keys both configurations have, but where one still says "auto" (a run
    stopped before it resolved it, while loading)."""
    ca, cb = a.get("config") or {}, b.get("config") or {}
    keys = sorted((set(ca) & set(cb)) - OUTPUT_FLAGS - {"probe", "baseline_command"})
    unresolved = ("auto", ["auto"])
    differences = {k: [ca[k], cb[k]] for k in keys
                   if ca[k] != cb[k] and ca[k] not in unresolved and cb[k] not in unresolved}
    adapters = [_adapter_kind(ca), _adapter_kind(cb)]   # (a key that only LoRA's side has)
    if None not in adapters and (adapters[0] == "none") != (adapters[1] == "none"):
        differences["adapters"] = adapters
    return differences


def _adapter_kind(config):
    """A configuration's LoRA: its kind; "none" where a probe found no LoRA layer; None if unknown."""
    if config.get("adapters") or config.get("r"):
        return config.get("adapters") or "gated_lora"   # (the reference's config: its flags)
    return "none" if config.get("probe") and not config.get("lora_outside") else None


def _net_of_moves(row, places):
    """A place's change (B - A), less what moved down into the modules inside it (their opposite
    changes, up to its own): the same bytes made a level lower in the other run (a KV cache's keys
    and values, made by cat in self_attn, where the other run's k_proj and v_proj make them) are
    no excess of either."""
    group = lambda label: label[len("module "):].split(" (x")[0] + "."
    change = row[2] - row[1]
    if not row[0].startswith("module "):
        return change
    inside = [r[2] - r[1] for r in places if r[0].startswith("module ") and r is not row
              and group(r[0]).startswith(group(row[0]))]
    moved = min(abs(change), abs(sum(c for c in inside if c * change < 0)))   # (never more than it)
    return change - moved if change > 0 else change + moved


def _left_out(a, b):
    """[(side, [what])]: what a probed stack does that the other run does not (its `not_reproduced`)."""
    done = [(r.get("config") or {}).get("not_reproduced") or [] for r in (a, b)]
    return [(side, [x for x in mine if x not in theirs]) for side, mine, theirs
            in (("A", done[0], done[1]), ("B", done[1], done[0])) if set(mine) - set(theirs)]


def _changed_temporary(a, b, total):
    """', the largest part <shape> <dtype> from <op> in <module> (+x MiB)': of the heavier side's
    temporaries at its peak, by op and module, the one that grew the most over the other side's. One
    missing from the other's list counts as its smallest where the list leaves some out (it may be
    there, not listed): a temporary that left the few largest is not counted whole."""
    sign = 1 if total > 0 else -1
    heavier, lighter = (b, a) if sign > 0 else (a, b)
    held = [{}, {}]
    for side, report in zip(held, (heavier, lighter)):
        for t in report.get("temporaries") or []:
            side[t["op"], t["module"]] = side.get((t["op"], t["module"]), 0) + t["bytes"]
    listed = lighter.get("temporaries") or []
    left_out = sum(t["bytes"] for t in listed) < lighter["categories"]["temporaries"]
    floor = min(t["bytes"] for t in listed) if len(listed) >= TOP_TEMPORARIES and left_out else 0
    grew = {key: n - held[1].get(key, floor) for key, n in held[0].items()}
    key = max(grew, key=grew.get, default=None)
    if key is None or grew[key] <= 0:
        return ""
    top = next(t for t in heavier["temporaries"] if (t["op"], t["module"]) == key)
    others = ("" if grew[key] <= abs(total) else ", others shrank" if sign > 0   # (a part more than the
              else ", others grew")                                             # whole)
    return (f", the largest part {top['shape']} {top['dtype']} from {top['op']} in {top['module']} "
            f"({signed_mib(sign * grew[key])}{others})")


def _other_shape(a, b):
    """' at another batch shape (seq: 64 -> 128; each as its budget expects)': a difference that is
    the batch's, where the modules and ops that grew with it are no fault of either side."""
    changed = [f"{k}: {x!r} -> {y!r}" for k, (x, y) in config_differences(a, b).items() if k in ("bs", "seq")]
    if not changed:
        return ""
    expected = all("the budget: as expected" in verdict(r) for r in (a, b))
    return f" at another batch shape ({', '.join(changed)}{'; each as its budget expects' * expected})"


def _same_moment(phase_a, phase_b):
    """Whether two peaks' phases are one moment of a step: the same phase, forward+backward for either
    of the two, or a step measured whole (a loop without phases) for any."""
    pair = {phase_a, phase_b}
    return len(pair) == 1 or "step" in pair or FORWARD_BACKWARD in pair and pair <= {
        FORWARD_BACKWARD, "forward", "backward"}


def _how_it_stopped(report):
    oom = report.get("oom")
    return f"ran out of memory in {oom_when(oom)}" if oom else _STOPPED_WORDS.get(report["status"], "stopped")


def conclusion(a, b, rows):
    """One line: how B's peak compares with A's, where the difference is (the category, module, op),
    and what either side leaks or warns of."""
    x, y = a["peak_bytes"], b["peak_bytes"]
    if not x or not y:
        return "no conclusion: one side measured no training peak"
    notes = "".join(f"; {side} leaks {r['leak']['bytes_per_step']:,.0f} bytes per step over "
                    f"{len(r['leak']['step_end_bytes'])} steps" for side, r in (("A", a), ("B", b))
                    if r["leak"]["detected"])
    notes += "".join(f"; {side} warns {', '.join(warned)}" for side, warned
                     in (("A", weighty_warnings(a)), ("B", weighty_warnings(b))) if warned)
    notes += "".join(f"; what only {side} does (ref_train.py has no flag for it): {', '.join(done)}"
                     for side, done in _left_out(a, b))
    ranks = _largest_rank_excess(rows)
    stopped = {side: _how_it_stopped(r) for side, r in (("A", a), ("B", b)) if r.get("status", "ok") != "ok"}
    lighter = "B" if y < x else "A"
    if lighter in stopped and abs(y / x - 1) > SAME_WITHIN:   # (its peak may have been yet to come)
        return (f"no {'saving' if lighter == 'B' else 'excess'} to read: {lighter} {stopped[lighter]}, its "
                f"peak so far {min(x, y) / max(x, y):.2f}x the other's{ranks}{notes}")
    notes = "".join(f"; {side} {how}" for side, how in stopped.items()) + notes
    if abs(y / x - 1) <= SAME_WITHIN:
        return f"the two trainings cost the same (within 1%): {mib(x)} and {mib(y)} MiB{ranks}{notes}"
    sign = 1 if y > x else -1
    line = f"B's peak is {y / x:.2f}x A's ({signed_mib(y - x)})" + _other_shape(a, b)
    if not _same_moment(a["peak_phase"], b["peak_phase"]):   # (then B's categories are another phase's)
        line += f", in {b['peak_phase']} where A's is in {a['peak_phase']}"
    cats = [r for r in rows if r[0].startswith("at peak: ") and r[1] is not None and r[2] is not None]
    if cats:
        what, ca, cb = max(cats, key=lambda r: sign * (r[2] - r[1]))
        line += (f"; the {'excess' if sign > 0 else 'saving'} is in {what[len('at peak: '):]} "
                 f"({signed_mib(cb - ca)})")
        places = [r for r in rows if r[0].startswith(("module ", "op "))]
        if places and what.endswith("activations"):  # module and op rows are saved activations
            net, name = max(((_net_of_moves(r, places), r[0]) for r in places), key=lambda n: sign * n[0])
            if sign * net > 0:
                op = _dominant_op(_aligned_groups(a, b), name, net) if name.startswith("module ") else None
                most = net / (cb - ca) > 0.5   # (of the category's change)
                line += (f", {'mostly' if most else 'the largest part in'} {name.split(' ', 1)[1]} "
                         f"({signed_mib(net)}" + (f", op {op[0]})" if op else ")"))
        elif what.endswith("temporaries"):
            line += _changed_temporary(a, b, cb - ca)
    return line + ranks + notes


def diff_json(a, b):
    rows = diff(a, b)
    return {"schema": DIFF_SCHEMA,
            "rows": [{"row": what, "a_bytes": x, "b_bytes": y} for what, x, y in rows],
            "config_differences": config_differences(a, b),
            "warnings": {"a": a.get("warnings") or [], "b": b.get("warnings") or []},
            "conclusion": conclusion(a, b, rows)}


def _diff_notes(a, b):
    """What to know before reading the table: runs that stopped early, probed stacks, configurations,
    warnings one side has."""
    notes, sides, changed = [], (("A", a), ("B", b)), config_differences(a, b)
    for side, r in sides:
        status = r.get("status", "ok")
        if status != "ok" or r.get("oom"):
            what = _STOPPED_WORDS.get(status, "ran out of memory")
            where = f" on rank {r['rank']}" if len(r.get("ranks") or []) > 1 else ""
            detail = (r.get("oom") or {}).get("message") or r.get("error") or ""
            notes.append(f"WARNING: {side} {what}{where} ({detail}); its figures stop where it stopped")
        if r.get("unreported_ranks"):
            unreported = r["unreported_ranks"]
            ranks = f"rank{'s' * (len(unreported) > 1)} {', '.join(map(str, unreported))}"
            notes.append(f"WARNING: {side}'s {ranks} wrote no report in this launch (stopped before it "
                         "could): its rows are the other ranks'")
        if r.get("mid_run"):
            notes.append(f"WARNING: {side}'s report was written during its run (as memory ran out, or as "
                         "the model caught it) and the run wrote no other: killed, or hung; its figures "
                         "stop there")
    notes += [f"{side} {_recovered(r['recovered_oom'])}" for side, r in sides if r.get("recovered_oom")]
    notes += [f"{side} was measured by memcheck's probe in its own stack: its configuration is what the "
              "probe could see" for side, r in sides if (r.get("config") or {}).get("probe")]
    notes.append("different configurations: " + ", ".join(f"{k}: {x!r} -> {y!r}"
                                                          for k, (x, y) in changed.items())
                 if changed else "same configuration (on the keys both reports have)")
    notes += [f"{side} does what the other does not, and ref_train.py has no flag for: {', '.join(done)}; "
              "part of the difference may be that" for side, done in _left_out(a, b)]
    for side, report, other in (("A", a, b), ("B", b, a)):
        theirs = {w["kind"] for w in other.get("warnings") or []}
        notes += [f"only {side} warns: {w['kind']}: {w['message']}" for w in report.get("warnings") or []
                  if w["kind"] not in theirs]
    return notes


def format_diff(a, b, name_a="A", name_b="B", markdown=False):
    rows = diff(a, b)
    header = ("", f"{name_a} MiB", f"{name_b} MiB", "B - A MiB", "B / A")
    shown, modules, places = [], 0, [r for r in rows if r[0].startswith(("module ", "op "))]
    groups = _aligned_groups(a, b)
    for row in rows:
        what, x, y = row
        both = x is not None and y is not None
        if what.startswith("module "):
            modules += 1
            if modules > TOP_DIFF_MODULES or not (x or y):
                continue
        if what == "leak per step (bytes)":
            flag = "LEAK in B" if b["leak"]["detected"] and not a["leak"]["detected"] else "-"
            cells = ["not measured" if v is None else "none" if v < 0 else f"{v:,.0f}" for v in (x, y)]
            shown.append((what, *cells, f"{max(y, 0) - max(x, 0):+,.0f}" if both else "-", flag))
        elif not what.startswith("at peak: ") or x or y:
            shown.append((what, *("not measured" if v is None else mib(v) for v in (x, y)),
                          f"{(y - x) / MiB:+.1f}" if both else "-", f"{y / x:.2f}x" if both and x else "-"))
        op = (_dominant_op(groups, what, _net_of_moves(row, places)) if what.startswith("module ")
              and modules <= 3 and both and abs(y - x) > SAME_WITHIN * a["peak_bytes"] else None)
        if op and op[1]:
            shown.append((f"  mostly op {op[0]}", "", "", f"{op[1] / MiB:+.1f}", ""))
    if modules > TOP_DIFF_MODULES:
        shown.insert(len(shown) - 1, (f"({modules - TOP_DIFF_MODULES} more module rows: --json "
                                      "lists them)", "", "", "", ""))
    notes, ending = _diff_notes(a, b), conclusion(a, b, rows)
    if markdown:
        block = markdown_block(f"memcheck diff: {name_a} vs {name_b}", [], a["env"],
                               " ".join(["python"] + sys.argv))
        return "\n\n".join([block, "\n".join(f"- {n}" for n in notes), markdown_table(header, shown),
                            f"**{ending}**"])
    return "\n".join(notes + ["", text_table(header, shown), "", ending])


# ---------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a ReportError: one line naming the value, exit code 2."""

    def error(self, message):
        raise ReportError(message)


def diff_parser():
    p = OneLineParser(prog="memcheck.py diff", allow_abbrev=False,
                      description="Compare two memcheck reports: A, the reference (ref_train.py --report), "
                                  "and B, your stack (a probe's or callback's report). Ends with one line "
                                  "saying where B's excess is.")
    p.add_argument("a", metavar="A.json", help="the report to compare against, usually the reference's")
    p.add_argument("b", metavar="B.json", help="the report under suspicion, usually your stack's")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true", help="print a block for a GitHub issue")
    out.add_argument("--json", action="store_true",
                     help=f"print {DIFF_SCHEMA} JSON: rows (null where a side did not measure), "
                          "config differences, warnings and the conclusion")
    p.add_argument("--max-ratio", type=float, metavar="R",
                   help="exit 1 when B's peak is more than R times A's: a memory-regression gate for CI")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] in (["-h"], ["--help"]):
            print(__doc__.strip())
            return 0
        if argv[:1] != ["diff"]:
            what = f"unknown command {argv[0]!r}" if argv else "no command"
            raise ReportError(f"{what}; expected diff A.json B.json (--help explains)")
        args = diff_parser().parse_args(argv[1:])
        if args.max_ratio is not None and not args.max_ratio > 0:
            raise ReportError(f"--max-ratio {args.max_ratio}: must be a positive number")
        a, b = (with_ranks(read_report(path), path) for path in (args.a, args.b))
        for path, r in ((args.a, a), (args.b, b)):  # a ratio to 0 bytes means nothing, either way round
            if args.max_ratio is not None and r.get("status", "ok") == "ok" and not r["peak_bytes"]:
                raise ReportError(f"{path}: measured no training peak (peak_bytes 0: it ended before any "
                                  "phase); --max-ratio needs a peak on both sides")
        if args.json:
            print(json.dumps(diff_json(a, b), indent=1))
        else:
            names = [os.path.basename(args.a), os.path.basename(args.b)]
            print(format_diff(a, b, *(names if names[0] != names[1] else (args.a, args.b)), args.markdown))
        sys.stdout.flush()
    except ReportError as e:
        print(f"memcheck.py: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `memcheck.py diff A B | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.max_ratio is None:
        return 0
    sides = (("A", a), ("B", b))
    unfinished = [f"{side} {r.get('status', 'ok')}" for side, r in sides if r.get("status", "ok") != "ok"]
    unfinished += [f"{side} never wrote its last report" for side, r in sides if r.get("mid_run")]
    unfinished += [f"{side}'s model caught out-of-memory errors (oom_caught)" for side, r in sides
                   if any(w["kind"] == "oom_caught" for w in r.get("warnings") or [])]
    if unfinished:  # a run that stopped early has a smaller peak, one that caught OOMs skipped work
        print(f"memcheck.py: --max-ratio needs two finished runs whose model caught no out-of-memory "
              f"error: {', '.join(unfinished)}",
              file=sys.stderr)
        return 1
    if b["peak_bytes"] > args.max_ratio * a["peak_bytes"]:
        print(f"memcheck.py: B's peak is {b['peak_bytes'] / a['peak_bytes']:.2f}x A's, over --max-ratio "
              f"{args.max_ratio:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
