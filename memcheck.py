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
import contextlib
import functools
import gc
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
REPORT_FIELDS = ("config", "env", "peak_bytes", "peak_phase", "phases", "categories", "steps", "leak")
MiB = 2 ** 20
PHASES = ("load", "forward", "backward", "optimizer")
# Highest priority first: a storage that is both a parameter and saved for backward is a parameter.
CATEGORIES = ("trainable_params", "frozen_params", "gradients", "optimizer_state", "activations",
              "temporaries")
TOP_MODULES = 10
TOP_SURVIVORS = 20
NO_MODULE = "(no module)"


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
        if isinstance(out, torch.Tensor):  # the common case, without walking a pytree
            self.track(out, func)
        else:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.track(t, func)
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
        module = self.module_stack[-1] if self.module_stack else NO_MODULE
        op = op if isinstance(op, str) else op.overloadpacket.__name__  # named only when kept
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
                where = r.module if r.module != NO_MODULE else f"({r.op}, outside any module)"
                by_module[where] = by_module.get(where, 0) + r.nbytes
        ranked = sorted(by_module.items(), key=lambda kv: -kv[1])[:TOP_MODULES]
        return [{"module": m, "bytes": b} for m, b in ranked]


# ---------------------------------------------------------------- the probe

class Probe:
    """Measure any training loop; README.md shows it inside Lightning and the HF Trainer.

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
        self._step_started, self._step_peak = None, 0
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
        """Measure the code inside as phase `name` (forward, backward, optimizer, or your own)."""
        self.begin(name)
        try:
            yield
        except torch.OutOfMemoryError as e:
            self.oom = {"phase": name, "step": self.tracker.step, "message": str(e).splitlines()[0]}
            raise
        finally:
            self.end()

    def begin(self, name):
        """Open a phase without a with-block: for callbacks (Lightning, HF Trainer). Pair with end()."""
        if self.tracker.phase is not None:
            self.end()
        tracker = self.tracker
        tracker.phase, tracker.module_stack[:] = name, []
        if self._step_started is None:
            self._step_started = time.perf_counter()
        self._tag_roles()
        tracker.start_window()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self):
        if self.tracker.phase is not None:
            self._end_phase(self.tracker.phase)

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
        if name != "load":
            self._step_peak = max(self._step_peak, stats["peak_bytes"])
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
        self.steps.append({
            "step": self.tracker.step,
            "loss": None if loss is None else float(torch.as_tensor(loss).detach()),
            "seconds": now - (self._step_started or now),
            "live_bytes": self.live_bytes(),
            "peak_bytes": self._step_peak or self.live_bytes(),
        })
        self._step_peak = 0
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
    Growth at every later step (three steps or more), by any amount, is flagged: the tracker is exact, so a clean loop
    ends every step at the same byte count, and a one-off cache does not grow every step.
    """
    ends = [s["live_bytes"] for s in steps]
    growth = [b - a for a, b in zip(ends, ends[1:])]
    # Two intervals at least: a single one cannot tell a leak from a one-off allocation.
    detected = len(growth) >= 2 and all(g > 0 for g in growth)
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
    """Write JSON atomically: a reader never sees half a report, even if the run dies while writing."""
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
    missing = [k for k in REPORT_FIELDS if k not in report]
    if missing:
        raise ReportError(f"{path}: a {SCHEMA} report without {', '.join(missing)}")
    return report


# ---------------------------------------------------------------- the budget

# Which decoder linears share an input: adapting any of them makes autograd save that input once.
_SHARED_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                  "fc1": "mlp input", "up_proj": "mlp input", "gate_proj": "mlp input"}
# Inputs autograd saves anyway: the attention output (saved by SDPA) and the MLP activation.
_ALREADY_SAVED = {"out_proj", "o_proj", "fc2", "down_proj"}


def _dtype_bytes(dtype):
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _structure(model):
    """The few numbers the budget needs, read off a model (on the meta device or not)."""
    import ilora
    import ref_train
    config = model.config
    layer = ref_train.decoder_layers(model)[0]
    # Leaf name -> the original linear, seen through any adapter wrapped around it.
    linears, adapted = {}, {}
    for name, module in layer.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, ilora.GatedLoraLinear):
            adapted[leaf] = linears[leaf] = module.base
        elif isinstance(module, torch.nn.Linear) and leaf not in ("base", "lora_A", "lora_B"):
            linears[leaf] = module
    hidden = model.get_input_embeddings().embedding_dim
    return {
        "layers": config.num_hidden_layers,
        "hidden": hidden,
        "kv": linears["k_proj"].out_features if "k_proj" in linears else hidden,
        "heads": config.num_attention_heads,
        "ffn": getattr(config, "ffn_dim", None) or config.intermediate_size,
        "gated_mlp": "gate_proj" in linears,
        "vocab": model.get_output_embeddings().out_features,
        "dropout": float(getattr(config, "dropout", 0.0) or 0.0),
        "linears": {n: (m.in_features, m.out_features) for n, m in linears.items()},
        "adapted": {n: (m.in_features, m.out_features) for n, m in adapted.items()},
    }


def budget(args, model=None, items=None, full=False):
    """Predict training memory from the configuration alone; every term in bytes.

    args: ref_train's flags. model/items: the built modules (any device, meta included); by default
    they are built on the meta device, which allocates nothing. full=True budgets full fine-tuning
    (every parameter trained) for the same shapes, as the seed's "about 1 GB" estimate does.

    The activation terms count what autograd saves, per token, in an OPT-style decoder layer
    (calibrated on OPT with SDPA; for other architectures they are an estimate):
      layer input, the residual before the MLP, q, k, v and the attention output, SDPA's
      log-sum-exp, the MLP activation (three of them for a gated MLP), two residual-dropout masks,
      the inputs of adapted linears, and each adapter's own: r/E-wide expert activations (lean),
      or E x out per-expert outputs (einsum); LoRA dropout keeps its output and its mask.
    """
    import ref_train
    if model is None:
        model, items, *_ = ref_train.build(args, meta=True)
    s = _structure(model)
    weights_dtype, autocast_dtype = ref_train.dtypes(args)
    act = _dtype_bytes(autocast_dtype or weights_dtype)
    on_cuda = args.device == "cuda"
    mask = 1 if on_cuda else act                       # dropout masks: bool on CUDA, act dtype on CPU
    b, seq = args.bs, args.seq
    tokens = b * seq
    h, ffn, layers = s["hidden"], s["ffn"], s["layers"]

    params = [p for m in (model, items) if m is not None for p in m.parameters()]
    params = list({id(p): p for p in params}.values())
    by_dtype = {}
    for p in params:
        key = str(p.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    trained = params if full else [p for p in params if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trained)
    param_bytes = sum(by_dtype.values())

    # Saved per token in one decoder layer, in bytes.
    per_token = act * (2 * h + h + 2 * s["kv"] + h + (3 if s["gated_mlp"] else 1) * ffn)
    per_token += 4 * s["heads"] if args.attn == "sdpa" else 0   # log-sum-exp, fp32
    per_token += 2 * h * mask if s["dropout"] > 0 else 0
    adapted = s["linears"] if full else s["adapted"]
    lora_dropout = 0 if full else args.dropout
    groups = {_SHARED_INPUTS.get(n, n) for n in adapted if n not in _ALREADY_SAVED}
    if lora_dropout == 0:
        per_token += sum(act * (h if g.endswith("input") else adapted[g][0]) for g in groups)
    lora_per_token = 0
    if not full:
        for name, (d_in, d_out) in adapted.items():
            r, experts = args.r, args.experts
            if experts == 1:
                lora_per_token += 4 * r
            elif args.impl == "lean":
                lora_per_token += 4 * 2 * r
            else:
                lora_per_token += 4 * (r + experts * d_out)
            if lora_dropout > 0:
                lora_per_token += d_in * (4 + mask)
    layer_bytes = tokens * (per_token + lora_per_token)
    eager_scores = b * s["heads"] * seq * seq * 4 if args.attn == "eager" else 0  # softmax in fp32
    layer_bytes += eager_scores

    ckpt = args.ckpt != "none"
    terms = {
        "params": param_bytes,
        "trainable_params": trainable_bytes,
        "gradients": trainable_bytes,
        "optimizer_state": 2 * trainable_bytes,
        "activations_per_layer": layer_bytes,
        "lora_activations_per_layer": tokens * lora_per_token,
        "einsum_expert_outputs_per_layer": (tokens * 4 * args.experts * sum(o for _, o in adapted.values())
                                            if args.impl == "einsum" and args.experts > 1 and not full
                                            else 0),
        "dropout_masks_per_layer": tokens * ((2 * h * mask if s["dropout"] > 0 else 0)
                                             + (sum(d for d, _ in adapted.values()) * mask
                                                if lora_dropout > 0 else 0)),
        "checkpointed_inputs": layers * tokens * h * act if ckpt else 0,
        "saved_activations": (layers * tokens * h * act if ckpt else layers * layer_bytes)
                             + tokens * h * act,   # + the final norm's input
        "logits": b * (seq - 1) * s["vocab"] * 4 // args.loss_chunks,   # one fp32 copy
        "logits_16bit": (b * (seq - 1) * s["vocab"] * act // args.loss_chunks) if act < 4 else 0,
        "autocast_weight_copies": 0,
    }
    if autocast_dtype is not None and autocast_dtype != weights_dtype:
        # Autocast re-casts each frozen weight at every call and the copy is saved for backward;
        # under checkpointing only one layer's copies (and lm_head's) exist at a time.
        layer_weights = sum(i * o for i, o in s["linears"].values())
        head = s["vocab"] * h
        terms["autocast_weight_copies"] = _dtype_bytes(autocast_dtype) * (
            head + layer_weights * (1 if ckpt else layers))
    steady = terms["params"] + terms["optimizer_state"]
    saved = terms["saved_activations"] + terms["autocast_weight_copies"]
    logits = terms["logits"] + terms["logits_16bit"]
    if args.loss_chunks == 1:
        # forward ends with the logits and their log-softmax; backward starts with the log-softmax
        # (saved), the loss's gradient and the logits' gradient.
        # (16-bit logits exist only until .float() has copied them: a spike in forward.)
        forward_peak = steady + saved + 2 * terms["logits"] + terms["logits_16bit"]
        backward_start = steady + saved + 3 * terms["logits"]
    else:
        # one chunk at a time: its logits and log-softmax, then in backward their two gradients
        # while the recomputed log-softmax is held, and the hidden states' gradient filling up
        forward_peak = steady + saved + 2 * logits
        backward_start = steady + saved + 3 * logits + tokens * h * 4
    recompute = 0
    if ckpt:
        # one layer recomputed, plus its gradients in flight, while the other inputs stay
        recompute = (steady + terms["checkpointed_inputs"] + tokens * h * act + layer_bytes
                     + tokens * act * (ffn + 2 * h) + terms["gradients"])
    optimizer_peak = steady + terms["gradients"] + trainable_bytes  # foreach AdamW: one temporary
    phases = {"forward": forward_peak, "backward": max(backward_start, recompute),
              "optimizer": optimizer_peak}
    peak_phase = max(phases, key=phases.get)
    categories = {
        "trainable_params": trainable_bytes, "frozen_params": param_bytes - trainable_bytes,
        "gradients": terms["gradients"] if peak_phase == "optimizer" else 0,
        "optimizer_state": terms["optimizer_state"],
        "activations": saved + terms["logits"],
    }
    if peak_phase == "optimizer":
        categories["activations"] = 0
    categories["temporaries"] = phases[peak_phase] - sum(categories.values())
    return {"full": full, "terms": terms, "params_by_dtype": by_dtype, "phases": phases,
            "peak_phase": peak_phase, "peak_bytes": phases[peak_phase], "categories": categories}


BUDGET_TOLERANCE = 0.10  # the budget's accuracy target: within it, a run is "as expected"


def verdict(report):
    """The measured training peak against the budget, in plain words."""
    planned = report.get("budget")
    if not planned or not report.get("peak_bytes"):
        return "no budget to compare with"
    ratio = report["peak_bytes"] / planned["peak_bytes"]
    if report.get("oom"):
        return f"out of memory: {ratio:.2f}x the budget when it stopped"
    if abs(ratio - 1) <= BUDGET_TOLERANCE:
        return f"measured peak {ratio:.2f}x the budget: as expected"
    if ratio < 1:
        return f"measured peak {ratio:.2f}x the budget: below it, the budget overcounts this configuration"
    excess = {c: report["categories"].get(c, 0) - planned["categories"].get(c, 0) for c in CATEGORIES}
    worst = max(excess, key=excess.get)
    return (f"measured peak {ratio:.1f}x the budget: the excess is in {worst.replace('_', ' ')} "
            f"(+{mib(excess[worst])} MiB) during {report['peak_phase']}")



# ---------------------------------------------------------------- tables

def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                                for i, (x, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def _markdown_table(header, rows):
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _phase_rows(report):
    planned = (report.get("budget") or {}).get("phases", {})
    return [(name, mib(stats["live_bytes"]), mib(stats["peak_bytes"]),
             mib(planned[name]) if name in planned else "-")
            for name, stats in report["phases"].items()]


def format_report(report):
    """The summary a person reads at a glance: phases, verdict, categories, modules, leak."""
    lines = [_table(("phase", "live MiB", "peak MiB", "budget MiB"), _phase_rows(report)), ""]
    if report.get("oom"):
        oom = report["oom"]
        lines.append(f"OUT OF MEMORY in {oom['phase']} at step {oom['step']}: {oom['message']}")
    lines.append(f"peak {mib(report['peak_bytes'])} MiB in {report['peak_phase']}; {verdict(report)}")
    cats = report.get("categories") or {}
    lines.append("at the peak: " + " | ".join(f"{c.replace('_', ' ')} {mib(v)}"
                                             for c, v in cats.items() if v))
    if report.get("modules"):
        lines.append("saved activations by module: " + ", ".join(
            f"{m['module']} {mib(m['bytes'])}" for m in report["modules"][:5]))
    if report.get("params"):
        p = report["params"]
        lines.append(f"parameters: {p['trainable']:,} trainable, {p['frozen']:,} frozen")
    leak = report["leak"]
    if leak["detected"]:
        lines.append(f"LEAK: live memory grows {leak['bytes_per_step']:,.0f} bytes every step; "
                     f"{len(leak['survivors'])} tensors from earlier steps survive, e.g. "
                     + "; ".join(f"{s['shape']} {s['dtype']} {s['bytes']:,} B from {s['op']} in "
                                 f"{s['module']} (step {s['step']})" for s in leak["survivors"][:3]))
    elif len(leak["step_end_bytes"]) < 2:
        lines.append("leak: not measured (it takes two finished steps or more)")
    else:
        lines.append("leak: none (live memory at the end of each step does not grow)")
    return "\n".join(lines)


def markdown_block(title, tables, env=None, command=None):
    """A block to paste into a GitHub issue: versions, device, command line, then the tables."""
    env = env or environment("cpu")
    lines = [f"### {title}", "",
             f"- command: `{command or ' '.join(['python'] + sys.argv)}`",
             f"- device: {env['device']} ({env['cpu_cores']} cores)",
             f"- python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"CUDA {env['cuda'] or 'none'}", ""]
    for header, rows in tables:
        lines += [_markdown_table(header, rows), ""]
    return "\n".join(lines).rstrip()


def markdown_report(report):
    cats = [(c.replace("_", " "), mib(v)) for c, v in (report.get("categories") or {}).items()]
    return markdown_block(
        f"memcheck: peak {mib(report['peak_bytes'])} MiB in {report['peak_phase']} ({verdict(report)})",
        [(("phase", "live MiB", "peak MiB", "budget MiB"), _phase_rows(report)),
         (("at the peak", "MiB"), cats)],
        report["env"], report["command"])


# ---------------------------------------------------------------- diff

def diff(a, b):
    """Rows (what, A bytes, B bytes) for everything two reports measure, largest excess of B first."""
    rows = [("peak", a["peak_bytes"], b["peak_bytes"])]
    named = [p for p in PHASES if p in a["phases"] or p in b["phases"]]
    for name in named + sorted((set(a["phases"]) | set(b["phases"])) - set(named)):
        pa, pb = a["phases"].get(name, {}), b["phases"].get(name, {})
        if pa or pb:
            rows.append((f"{name} peak", pa.get("peak_bytes", 0), pb.get("peak_bytes", 0)))
    for c in CATEGORIES:
        rows.append((f"at peak: {c.replace('_', ' ')}", a["categories"].get(c, 0),
                     b["categories"].get(c, 0)))
    ma = {m["module"]: m["bytes"] for m in a.get("modules", [])}
    mb = {m["module"]: m["bytes"] for m in b.get("modules", [])}
    for m in sorted(set(ma) | set(mb)):
        rows.append((f"module {m}", ma.get(m, 0), mb.get(m, 0)))
    rows.append(("leak per step", a["leak"]["bytes_per_step"], b["leak"]["bytes_per_step"]))
    head, rest = rows[:1], rows[1:]
    rest.sort(key=lambda r: -(r[2] - r[1]))
    return head + rest


OUTPUT_FLAGS = {"report", "snapshot", "markdown"}  # where results go, not what was measured


def config_differences(a, b):
    keys = sorted((set(a.get("config", {})) | set(b.get("config", {}))) - OUTPUT_FLAGS)
    return [(k, a["config"].get(k), b["config"].get(k)) for k in keys
            if a["config"].get(k) != b["config"].get(k)]



def format_diff(a, b, name_a="A", name_b="B", markdown=False):
    header = ("", f"{name_a} MiB", f"{name_b} MiB", "B - A MiB", "B / A")
    rows = [(what, mib(x), mib(y), f"{(y - x) / MiB:+.1f}", f"{y / x:.2f}x" if x else "-")
            for what, x, y in diff(a, b) if (x or y or what == "peak") and what != "leak per step"]
    leak_a, leak_b = a["leak"]["bytes_per_step"], b["leak"]["bytes_per_step"]
    # A leak is often bytes, not MiB, per step; and it is flagged by its growth, not its size.
    rows.append(("leak per step (bytes)", f"{leak_a:,.0f}", f"{leak_b:,.0f}", f"{leak_b - leak_a:+,.0f}",
                 "LEAK in B" if b["leak"]["detected"] and not a["leak"]["detected"] else "-"))
    changed = config_differences(a, b)
    notes = (["different configurations: " + ", ".join(f"{k}: {x!r} -> {y!r}" for k, x, y in changed)]
             if changed else ["same configuration"])
    if markdown:
        return markdown_block(f"memcheck diff: {name_a} vs {name_b}",
                              [(("config", name_a, name_b), changed)] if changed else [],
                              a["env"], " ".join(["python"] + sys.argv)) + "\n\n" + _markdown_table(header, rows)
    return "\n".join(notes + ["", _table(header, rows)])


# ---------------------------------------------------------------- ablate: one run per suspect

def ablation_variants(args):
    """(name, extra flags) for each suspect, one change from the baseline; the baseline first."""
    other_targets = "all-linear" if args.targets != ("all-linear",) else "q_proj,v_proj"
    variants = [
        ("baseline", []),
        ("added tokens + resize " + ("off" if args.add_tokens else "on"),
         ["--no-add-tokens" if args.add_tokens else "--add-tokens"]),
        *[(f"checkpointing {c}", ["--ckpt", c]) for c in ("manual", "hf", "none") if c != args.ckpt],
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
# (and CPU autocast cannot run bf16 weights under fp16 at all), so ablate budgets them instead.
SLOW_ON_CPU = "16-bit precision on CPU takes minutes a step: measure it with --device cuda"


def _slow_on_cpu(args):
    return args.device == "cpu" and (args.precision != "32" or args.weights_dtype not in (None, "fp32"))


def _run_reference(argv, report_path, timeout=600, threads=None):
    """ref_train.py in its own process; (report or None, error line or None)."""
    import subprocess
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
    starts `python ref_train.py`, so that no variant inherits another's memory or state. On CPU one
    process per core runs at a time, each on one thread: a process spends seconds starting up on
    one core, and the figures are per process, so running side by side changes none of them.
    """
    from concurrent.futures import ThreadPoolExecutor
    import ref_train
    args = ref_train.parse_args(base_argv)
    jobs = 1 if args.device == "cuda" or run else max(1, os.cpu_count() or 1)
    run = run or functools.partial(_run_reference, threads=None if jobs == 1 else 1)
    if "--steps" not in base_argv:
        base_argv = [*base_argv, "--steps", str(steps)]
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
            if variant_args and _slow_on_cpu(variant_args) and not _slow_on_cpu(args):
                report, error = None, f"skipped: {SLOW_ON_CPU}"
                planned = budget(variant_args)["peak_bytes"]
            else:
                report, error = run([*base_argv, *flags], os.path.join(tmp, f"{i}.json"))
                planned = (report.get("budget") or {}).get("peak_bytes") if report else None
            ok = report is not None and error is None
            rows[i] = {"variant": name, "flags": flags, "error": error,
                       "peak_bytes": report["peak_bytes"] if ok else None,
                       "leak_bytes_per_step": report["leak"]["bytes_per_step"] if ok else None,
                       "budget_peak_bytes": planned,
                       "verdict": verdict(report) if ok else None}
            log(f"{name:<34} " + (f"peak {mib(rows[i]['peak_bytes']):>8} MiB  "
                                  f"({time.perf_counter() - started:.0f} s)" if ok
                                  else error if error.startswith("skipped") else f"FAILED: {error}"))
        list(pool.map(one, range(len(variants))))
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["delta_bytes"] = row["peak_bytes"] - base if row["peak_bytes"] is not None and base else None
    rows[1:] = sorted(rows[1:], key=lambda r: (r["delta_bytes"] is None, -(r["delta_bytes"] or 0)))
    return rows


def ablation_table(rows):
    header = ("variant", "peak MiB", "change MiB", "ratio", "leak B/step", "budget MiB", "verdict")
    base = rows[0]["peak_bytes"]
    out = []
    for r in rows:
        if r["error"]:
            skipped = r["error"].startswith("skipped")
            out.append((r["variant"], "skipped" if skipped else "failed", "-", "-", "-",
                        mib(r["budget_peak_bytes"]) if r["budget_peak_bytes"] else "-", r["error"][:90]))
            continue
        out.append((r["variant"], mib(r["peak_bytes"]),
                    f"{r['delta_bytes'] / MiB:+.1f}" if base else "-",
                    f"{r['peak_bytes'] / base:.2f}x" if base else "-",
                    f"{r['leak_bytes_per_step']:,.0f}",
                    mib(r["budget_peak_bytes"]) if r["budget_peak_bytes"] else "-", r["verdict"]))
    return header, out


# ---------------------------------------------------------------- sweep: memory against each variable

SWEEP_VARIABLES = {"bs": "sample", "seq": "token", "r": "unit of rank"}


def sweep(points, base_argv, log=print, steps=2):
    """Measure and predict each point ({flag: value}); returns one row per point."""
    import ref_train
    rows = []
    for point in points:
        argv = [*base_argv, "--steps", str(steps)]
        for flag, value in point.items():
            argv += [f"--{flag}", str(value)]
        row = dict(point)
        try:
            report = ref_train.train(ref_train.parse_args(argv), log=lambda *_: None)
            row.update(peak_bytes=report["peak_bytes"], budget_bytes=report["budget"]["peak_bytes"])
            row["error"] = row["peak_bytes"] / row["budget_bytes"] - 1
        except (ref_train.UsageError, torch.OutOfMemoryError) as e:
            row.update(peak_bytes=None, budget_bytes=None, error=None, failed=str(e).splitlines()[0])
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
        shape = {"quadratic_share": share,
                 "law": "quadratic (attention scores grow as seq^2)" if share > QUADRATIC_SHARE
                 else "linear"}
    return {"mib_per_unit": growth, "seq": shape}



def _quadratic_share(xs, ys):
    """Share of the peak's growth over the swept range that a seq^2 term explains (least squares)."""
    a = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0]
    quad = abs(float(coef[2])) * (xs[-1] ** 2 - xs[0] ** 2)
    return quad / max(abs(ys[-1] - ys[0]), 1.0)


def sweep_table(rows):
    keys = [k for k in rows[0] if k not in ("peak_bytes", "budget_bytes", "error", "failed")]
    header = (*keys, "measured MiB", "budget MiB", "error")
    out = [(*[r[k] for k in keys],
            mib(r["peak_bytes"]) if r["peak_bytes"] else "failed",
            mib(r["budget_bytes"]) if r["budget_bytes"] else "-",
            f"{r['error']:+.1%}" if r["error"] is not None else r.get("failed", "-")[:60]) for r in rows]
    return header, out


def growth_lines(growth):
    lines = [f"{v:.2f} MiB per extra {SWEEP_VARIABLES[k]}" for k, v in growth["mib_per_unit"].items()]
    if growth["seq"]:
        lines.append(f"sequence length: {growth['seq']['law']} "
                     f"(seq^2 explains {growth['seq']['quadratic_share']:.0%} of the growth)")
    return lines


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--plot needs matplotlib, which is optional: pip install matplotlib")
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
              "--r", "8", "--precision", "32", "--no-inject-items"]
BENCH_LOSS_CHUNKS = 8


class _Untracked:
    """Stands in for a Probe when only time is measured: no tracker, no overhead."""

    def phase(self, name):
        return contextlib.nullcontext()


def _reference_loop(args):
    """(step(probe) -> loss, modules, optimizer) for the reference trainer."""
    import ref_train
    model, items, batches, _, _ = ref_train.build(args)
    trainable = [p for m in (model, items) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    scaler = torch.amp.GradScaler(args.device, enabled=False)
    step = lambda probe: ref_train.train_step(model, items, optimizer, scaler, next(batches), args,
                                              probe, [])
    return step, torch.nn.ModuleDict({"lm": model, "ilora": items}), optimizer


def _peft_loop(args):
    """The same model, data and shapes through PEFT's LoRA and the model's own checkpointing."""
    from peft import LoraConfig, get_peft_model
    import ref_train
    model, batches, _, _ = ref_train.build_base(args)
    ref_train.enable_hf_checkpointing(model)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=list(args.targets)))
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


def _measure(make_loop, args, steps):
    """Peak bytes over `steps` tracked steps, and the median seconds of `steps` untracked ones."""
    step, model, optimizer = make_loop(args)
    with Probe(model, optimizer, device=args.device) as probe:
        for _ in range(steps):
            probe.step(step(probe))
    peak = probe.peak["peak_bytes"]
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
    args = ref_train.parse_args([*BENCH_BASE, *base_argv])
    rows = []

    def add(what, a, b, unit, target=None):
        ratio = a / b
        rows.append({"comparison": what, "a": a, "b": b, "unit": unit, "ratio": ratio,
                     "target": target, "met": None if target is None else ratio <= target})
        log(f"{what}: {ratio:.2f}" + (f" (target <= {target})" if target else ""))

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
    add("tracker overhead: tracked / untracked step", ref["tracked_seconds"], ref["seconds"], "s", 1.3)
    if args.device == "cpu":
        tracked, profiled = tracker_against_profiler(args)
        rows.append({"comparison": "tracker / torch.profiler: peak above start", "a": tracked,
                     "b": profiled, "unit": "bytes", "ratio": tracked / profiled, "target": "1 +- 0.01",
                     "met": abs(tracked / profiled - 1) <= 0.01})
        log(f"tracker / profiler: {tracked / profiled:.4f}")
    chunked_args = ref_train.parse_args([*BENCH_BASE, *base_argv, "--loss-chunks", str(BENCH_LOSS_CHUNKS)])
    chunked = _measure(_reference_loop, chunked_args, steps)
    add(f"reference --loss-chunks {BENCH_LOSS_CHUNKS} / PEFT: peak", chunked["peak_bytes"],
        peft["peak_bytes"], "bytes", 0.85)
    floor = memory_floor(chunked_args)
    add(f"reference --loss-chunks {BENCH_LOSS_CHUNKS} / memory floor", chunked["peak_bytes"], floor, "bytes")
    add(f"reference --loss-chunks {BENCH_LOSS_CHUNKS} / untracked reference: median step",
        chunked["seconds"], ref["seconds"], "s")
    return rows


def memory_floor(args):
    """What this training cannot do with less: parameters, LoRA state (weights, gradients, Adam),
    the checkpointed layer inputs, one layer's recomputation and one chunk of logits."""
    planned = budget(args)
    t = planned["terms"]
    return (t["params"] + t["gradients"] + t["optimizer_state"] + t["checkpointed_inputs"]
            + t["activations_per_layer"] + t["logits"])


def bench_table(rows):
    fmt = lambda v, unit: f"{v / MiB:.1f} MiB" if unit == "bytes" else f"{v * 1e3:.0f} ms"
    header = ("comparison", "A", "B", "A / B", "target", "met")
    return header, [(r["comparison"], fmt(r["a"], r["unit"]), fmt(r["b"], r["unit"]),
                     f"{r['ratio']:.3f}", r["target"] if r["target"] is not None else "-",
                     {True: "yes", False: "NO", None: "-"}[r["met"]]) for r in rows]


def _bench_command(argv):
    report_path, argv = _take(argv, "--report")
    markdown, argv = _take(argv, "--markdown", has_value=False)
    steps, argv = _take(argv, "--steps")
    if steps is not None and not (steps.isdigit() and int(steps) >= 2):
        raise ReportError(f"--steps {steps}: bench needs a whole number of steps, 2 or more")
    rows = bench(argv, steps=int(steps or 5))
    _print_and_save("memcheck bench", bench_table(rows), rows, markdown, report_path)
    return 0


def _print_and_save(title, table, rows, markdown, report_path):
    """The ending of ablate and bench: the table, the Markdown block if asked, the JSON if asked."""
    header, body = table
    print()
    print(_table(header, body))
    if markdown:
        print("\n" + markdown_block(title, [(header, body)]))
    if report_path:
        write_report(report_path, rows)


# ---------------------------------------------------------------- command line

def _budget_command(argv):
    import ref_train
    full = "--full" in argv
    args = ref_train.parse_args([a for a in argv if a != "--full"])
    lora = budget(args)
    columns = [("LoRA (this config)", lora)] + ([("full fine-tuning", budget(args, full=True))] if full else [])
    names = list(lora["terms"]) + [f"{p} peak" for p in lora["phases"]] + ["predicted peak"]
    rows = []
    for name in names:
        row = [name]
        for _, b in columns:
            value = (b["terms"].get(name) if name in b["terms"] else
                     b["peak_bytes"] if name == "predicted peak" else b["phases"][name.split()[0]])
            row.append(mib(value))
        rows.append(row)
    print(f"budget for --bs {args.bs} --seq {args.seq}, ckpt {args.ckpt}, precision {args.precision}, "
          f"{args.experts} experts of rank {args.r // args.experts}, targets {','.join(args.targets)}")
    print(_table(("term (MiB)", *[c for c, _ in columns]), rows))
    print("params by dtype: " + ", ".join(f"{k} {mib(v)} MiB" for k, v in lora["params_by_dtype"].items()))
    return 0


def _take(argv, flag, has_value=True):
    """Remove `flag` (and its value) from argv; returns (value or True/None, the rest)."""
    if flag not in argv:
        return None, argv
    i = argv.index(flag)
    if not has_value:
        return True, argv[:i] + argv[i + 1:]
    if i + 1 >= len(argv):
        raise ReportError(f"{flag} needs a value")
    return argv[i + 1], argv[:i] + argv[i + 2:]


def _ablate_command(argv):
    report_path, argv = _take(argv, "--report")
    markdown, argv = _take(argv, "--markdown", has_value=False)
    rows = ablate(argv)
    _print_and_save("memcheck ablate", ablation_table(rows), rows, markdown, report_path)
    return 0


_SWEEP_LISTS = {"--bs": ",", "--seq": ",", "--r": ",", "--experts": ",", "--ckpt": ",",
                "--impl": ",", "--targets": "|"}


def _sweep_command(argv):
    import itertools
    report_path, argv = _take(argv, "--report")
    plot_path, argv = _take(argv, "--plot")
    markdown, argv = _take(argv, "--markdown", has_value=False)
    axes = {}
    for flag, sep in _SWEEP_LISTS.items():
        value, argv = _take(argv, flag)
        if value is not None:
            axes[flag[2:]] = [v for v in value.split(sep) if v]
            if not axes[flag[2:]]:
                raise ReportError(f"{flag} {value!r}: expected values separated by {sep!r}")
    if not axes:
        raise ReportError("sweep needs at least one of " + ", ".join(_SWEEP_LISTS) +
                          " with a list of values, e.g. --bs 1,2,4")
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    for point in points:
        for k in ("bs", "seq", "r", "experts"):
            if k in point:
                try:
                    point[k] = int(point[k])
                except ValueError:
                    raise ReportError(f"--{k} {point[k]}: expected a comma list of integers")
    rows = sweep(points, argv)
    growth = fit_growth(rows)
    header, table = sweep_table(rows)
    print()
    print(_table(header, table))
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    if errors:
        print(f"worst budget error {max(errors):.1%} over {len(errors)} points")
    for line in growth_lines(growth):
        print(line)
    if markdown:
        print("\n" + markdown_block("memcheck sweep", [(header, table)]) + "\n\n" +
              "\n".join(f"- {line}" for line in growth_lines(growth)))
    if report_path:
        write_report(report_path, {"points": rows, "growth": growth})
    if plot_path:
        _plot(rows, plot_path)
    return 0 if errors else 1  # no point measured: say so in the exit code


def _diff_command(argv):
    markdown, argv = _take(argv, "--markdown", has_value=False)
    if len(argv) != 2:
        raise ReportError(f"diff takes two report files, got {len(argv)}: memcheck.py diff A.json B.json")
    a, b = (read_report(p) for p in argv)
    print(format_diff(a, b, os.path.basename(argv[0]), os.path.basename(argv[1]), markdown=markdown))
    return 0


COMMANDS = {"budget": _budget_command, "diff": _diff_command, "ablate": _ablate_command,
            "sweep": _sweep_command, "bench": _bench_command}


def main(argv=None):
    import ref_train
    import data
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"memcheck.py: error: {what}; expected one of {', '.join(COMMANDS)} (--help explains)",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ReportError, ref_train.UsageError, data.DataError) as e:
        print(f"memcheck.py {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
