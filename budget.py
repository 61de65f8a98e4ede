"""budget: what training should take, from the model and the run's shapes, before it runs.

memcheck.py's companion: copy it beside memcheck.py and the probe's report gets a budget, and with it
a verdict on the measured peak. Each kind of decoder layer is traced on the meta device (trace_layers):
nothing is allocated, and any architecture that runs on meta is budgeted as it runs; where one cannot, a
per-token estimate calibrated on OPT stands. Needs torch and memcheck.py, nothing else.
"""
import contextlib
import copy
import inspect
import io
import sys
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from memcheck import (AS_EXPECTED, BETWEEN_PHASES, CATEGORIES, Tracker, _adapter, _aliases_input,
                      _bytes_by_dtype, _largest_temporary, _strategy, _unique_params, decoder_layers,
                      embedding_module, first_line, flattened_by_fsdp1, fsdp2_cast_dtypes, mib, named_warnings,
                      rank_and_world, signed_mib, stepped_params, unwrapped_optimizer)

BUDGET_TOLERANCE = 0.10  # the budget's accuracy target: beyond it, a peak is an excess
# Which decoder linears share an input: adapting any of them makes autograd save that input once.
_SHARED_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                  "fc1": "mlp input", "up_proj": "mlp input", "gate_proj": "mlp input"}
# Inputs autograd saves anyway: the attention output (saved by SDPA) and the MLP activation.
_ALREADY_SAVED = {"out_proj", "o_proj", "fc2", "down_proj"}
STAND_IN_ELEMENTS = 1 << 20  # at most about this many elements stand in for an optimizer's parameters
STEADY_STEP = 1000  # a step count past every warm-up (RAdam's rectification starts at its 6th)
_MEASURED_STEPS = {}   # (optimizer class, scale, groups' options and stand-ins) -> _measured_step's
_META_OUTPUTS = {}   # (op, its arguments' layouts) -> its outputs' (_MetaKernelsRemembered)
# torch.optim's optimizers that choose foreach on CUDA when left the choice (Adafactor, LBFGS do not)
_FOREACH_ON_CUDA = ("Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop",
                    "Rprop", "SGD")


def _dtype_bytes(dtype):
    return torch.empty((), dtype=dtype, device="meta").element_size()


def cuda_workspaces(device):
    """Bytes the CUDA allocator gives cuBLAS's workspaces, which no tensor owns (0 off CUDA).

    There is one per library handle and stream, made at a thread's first matrix product: forward's,
    and backward's on autograd's own thread. Measured, whether or not they exist yet: the
    workspaces are cleared, a linear layer runs forward and backward in each float dtype (with a
    bias too, cuBLASLt's path), and the growth of the allocated bytes is theirs.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    before = torch.cuda.memory_allocated(device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            w = torch.ones(8, 8, device=device, dtype=dtype, requires_grad=True)
            x = torch.ones(4, 8, device=device, dtype=dtype, requires_grad=True)
            torch.nn.functional.linear(x, w, w[0].detach()).sum().backward()
            (x @ w).sum().backward()
            del w, x
        except RuntimeError:  # a dtype this GPU has no kernels for
            pass
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.memory_allocated(device) - before)


def _is_linear(module):
    """nn.Linear, or transformers' Conv1D (GPT-2's: weight [in, out], out = nf), duck-typed."""
    return isinstance(module, torch.nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def _features(module):
    """(in, out) features of a linear layer (_is_linear)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf


def _structure(model):
    """The few numbers the budget needs, read off a model (on the meta device or not)."""
    config = model.config
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    # Leaf name -> the original linear, seen through any adapter wrapped around it.
    linears, adapted, lora = {}, {}, None
    inner = set()
    # (the first adapted layer: PEFT's layers_to_transform may leave the first without adapters)
    adapted_layer = next((l for l in layers if any(_adapter(m) for m in l.modules())), layers[0])
    for name, module in adapted_layer.named_modules():
        leaf = name.rpartition(".")[2]
        found = _adapter(module)
        if found is not None:
            base, lora = found
            adapted[leaf] = linears[leaf] = base
            inner.update(id(m) for m in module.modules() if m is not module)
        elif _is_linear(module) and id(module) not in inner:
            linears[leaf] = module
    embeddings, wrapped_head = embedding_module(model.get_input_embeddings()), model.get_output_embeddings()
    head = embedding_module(wrapped_head)
    hidden = embeddings.embedding_dim
    # The MLP's width under each family's name (OPT, Llama and most; GPT-2; Falcon), the one the
    # layers were built with where a config has two (an OPT config read by a Llama class), else 4 x hidden.
    widths = [v for k in ("ffn_dim", "intermediate_size", "n_inner", "ffn_hidden_size")
              if isinstance(v := getattr(config, k, None), int)]
    built = {n for m in linears.values() for n in _features(m)}
    ffn = next((v for v in widths if v in built), widths[0] if widths else 4 * hidden)
    return {
        "layers": config.num_hidden_layers,
        "hidden": hidden,
        "kv": _features(linears["k_proj"])[1] if "k_proj" in linears else hidden,
        "heads": config.num_attention_heads,
        "ffn": ffn,
        "gated_mlp": "gate_proj" in linears or "gate_up_proj" in linears,
        "vocab": head.out_features,
        "head_trains": head.weight.requires_grad,
        # PEFT's trainable tokens on a tied head merge their rows into a copy of the whole matrix,
        # which the head's forward saves for backward
        "head_copy": head.weight.nbytes if hasattr(wrapped_head, "token_adapter") else 0,
        "dropout": float(getattr(config, "dropout", 0.0) or 0.0),
        "attn": getattr(config, "_attn_implementation", None) or "sdpa",
        "weights_dtype": embeddings.weight.dtype,
        "linears": {n: _features(m) for n, m in linears.items()},
        "adapted": {n: _features(m) for n, m in adapted.items()},
        "lora": lora or {"r": 0, "experts": 1, "impl": "lean", "dropout": 0.0},
    }


class _Captured(Exception):
    """Raised by a pre-hook to stop a forward once the traced layer's inputs are known."""


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


_GROUPED_MM = {getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None)} - {None}


class _GroupedMmOnMeta(torch.autograd.Function):
    """torch's grouped matmul of tokens (rows of a, grouped by offs) with experts' weights b, on
    meta: what it saves (a for b's gradient, b for a's, and offs) and what its backward makes."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a if b.requires_grad else None, b if a.requires_grad else None, offs)
        ctx.shapes = a.shape, b.shape
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return (grad.new_empty(a_shape) if ctx.needs_input_grad[0] else None,
                grad.new_empty(b_shape) if ctx.needs_input_grad[1] else None, None)


class _KernelsOnMeta(torch.overrides.TorchFunctionMode):
    """Meta's kernels, made to save what CPU's and CUDA's save.

    On meta, SDPA takes its math path, which saves the bs x heads x seq^2 attention weights. On
    CPU and CUDA a fused kernel runs, which saves a log-sum-exp instead: trace with one (the CPU
    kernel). Where the CPU takes the math path too, it is left as it is: attention dropout (on CUDA
    the fused kernels take it, and keep no mask), and fewer key heads than query heads without
    enable_gqa (Falcon's multi-query attention).

    Grouped matmul (transformers' routed experts: tokens sorted by expert, one matmul per expert's
    rows) has a meta kernel for CUDA's bf16 only. Its shapes do not depend on the routing: it is
    run as _GroupedMmOnMeta."""

    def __init__(self, device_type="cpu"):
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v, mask, dropout_p, is_causal, scale, gqa = _sdpa_args(*args, **kwargs)
            fused = dropout_p == 0 or self.device_type == "cuda"
            if fused and (gqa or k.shape[-3] == q.shape[-3]):
                if mask is not None and mask.dtype == torch.bool:   # made a float bias, as torch does
                    mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device)
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)[0]
        if func in _GROUPED_MM:
            a, b = args[:2]
            offs = args[2] if len(args) > 2 else kwargs.get("offs")
            if a.device.type == "meta" and a.dim() == 2 and b.dim() == 3 and offs is not None:
                out = _GroupedMmOnMeta.apply(a, b, offs)
                return out if kwargs.get("out_dtype") is None else out.to(kwargs["out_dtype"])
        return func(*args, **kwargs)


# torch's autocast policies (aten/src/ATen/autocast_mode.cpp) for the ops a decoder layer calls,
# by the name of its Python function or method.
# In the autocast dtype, on CPU and CUDA:
_AUTOCAST_LOWER = {"linear", "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm",
                   "einsum", "conv1d", "conv2d", "prelu", "scaled_dot_product_attention"}
# In fp32, on CUDA (on CPU only losses are, and the loss is in no layer). Softmax, log_softmax and
# the cumulative ops take dtype=float32 rather than a cast input; they save the same.
_AUTOCAST_FP32_CUDA = {"softmax", "log_softmax", "layer_norm", "rms_norm", "group_norm", "pow",
                       "__pow__", "rsqrt", "exp", "expm1", "log", "log1p", "reciprocal", "cumsum",
                       "cumprod", "prod", "softplus", "logsumexp", "norm", "cosine_similarity"}


class _AutocastOnMeta(torch.overrides.TorchFunctionMode):
    """torch.autocast for meta tensors, which it leaves alone: the inputs of the ops above are cast
    (as autograd ops, so what autograd saves is the cast copy, as under autocast). A leaf that
    trains in fp32 is cast once per forward, as autocast caches it; frozen weights are cast at every
    call. `weight_copies` collects the storages of casts of `weights` (storage keys).

    Autocast's own switch is on inside, for code that turns it off where it keeps a part in fp32
    (torch.autocast("cuda", enabled=False)): nothing is cast there. transformers' maybe_autocast
    skips the switch for meta tensors, so the parts it keeps in fp32 are cast here.
    (The switch is per thread; the trace is not meant to run in two threads at once.)"""

    def __init__(self, dtype, device_type, weights=()):
        super().__init__()
        self.dtype, self.device_type = dtype, device_type
        self.weights, self.weight_copies, self.cache, self._refs = set(weights), set(), {}, []
        self.fp32 = _AUTOCAST_FP32_CUDA if device_type == "cuda" else set()

    def __enter__(self):
        self._outer = (torch.is_autocast_enabled(self.device_type),
                       torch.get_autocast_dtype(self.device_type))
        torch.set_autocast_enabled(self.device_type, True)
        torch.set_autocast_dtype(self.device_type, self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_autocast_enabled(self.device_type, self._outer[0])
        torch.set_autocast_dtype(self.device_type, self._outer[1])
        self.cache.clear()   # as autocast's, when it exits
        return super().__exit__(*exc)

    def _cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.dtype in (dtype, torch.float64):
            return t
        cacheable = dtype == self.dtype and t.dtype == torch.float32 and t.is_leaf and t.requires_grad
        if cacheable and id(t) in self.cache:
            return self.cache[id(t)][1]
        out = t.to(dtype)
        if t.untyped_storage()._cdata in self.weights:
            # (forgotten when freed: a storage made later may take its address)
            storage = out.untyped_storage()
            self.weight_copies.add(storage._cdata)
            forget = lambda _, key=storage._cdata: self.weight_copies.discard(key)
            self._refs.append(weakref.ref(storage, forget))
        if cacheable:
            self.cache[id(t)] = (t, out)   # (t kept, so that its id is not reused)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        dtype = self.dtype if name in _AUTOCAST_LOWER else torch.float32 if name in self.fp32 else None
        if dtype is not None and torch.is_autocast_enabled(self.device_type):
            args, kwargs = pytree.tree_map(lambda t: self._cast(t, dtype), (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _described(value):
    """What a meta kernel's output depends on, of one argument: a dense meta tensor's layout, or a
    value and its type (2 and 2.0 are equal, and make outputs of other dtypes)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or value.layout != torch.strided:
            raise TypeError("not a dense meta tensor")
        return value.shape, value.stride(), value.storage_offset(), value.dtype
    if isinstance(value, (list, tuple)):
        return tuple(map(_described, value))
    hash(value)   # (a TypeError where it is not a plain value)
    return type(value), value


def _fresh_layouts(out, inputs):
    """(pytree spec, each output's layout and storage bytes) of a meta kernel's outputs; "run" where
    one is not a new storage (_unsafe_view returns its input's, its schema saying nothing)."""
    leaves, spec = pytree.tree_flatten(out)
    storages = {t.untyped_storage()._cdata for t in inputs}
    try:
        layouts = [(*_described(t), t.untyped_storage().nbytes()) for t in leaves]
    except (TypeError, AttributeError):   # an output of another device (zeros_like(device="cpu")), or none
        return "run"
    return "run" if any(t.untyped_storage()._cdata in storages for t in leaves) else (spec, layouts)


class _MetaKernelsRemembered(TorchDispatchMode):
    """Each meta kernel's outputs, remembered by its inputs' layouts: torch's meta kernels are mostly
    Python (0.2 ms for a product, 2 ms for a layer norm), and a trace repeats the same ops at the
    same shapes (a layer run twice, budgets of one model at one shape). Only ops that make new
    tensors from tensors (no factories, views or in-place ops) are remembered, as fresh storages of
    the sizes their kernels gave. A dispatch mode entered before it would not see the ops it answers:
    it is used only where none is (but trackers of other devices, which ignore meta tensors)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable or _aliases_input(func):
            return func(*args, **kwargs)
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not tensors:   # (a factory: its dtype may be the default's, its device the default's)
            return func(*args, **kwargs)
        try:   # (and the default dtype: that of a tensor made from an integer one and a float)
            key = (func, _described(args), _described(tuple(sorted(kwargs.items()))),
                   torch.get_default_dtype())
        except TypeError:
            return func(*args, **kwargs)
        remembered = _META_OUTPUTS.get(key)
        if remembered is None or remembered == "run":
            out = func(*args, **kwargs)
            if remembered is None:
                _META_OUTPUTS[key] = _fresh_layouts(out, tensors)
            return out
        spec, layouts = remembered
        return pytree.tree_unflatten([torch.empty(0, dtype=dtype, device="meta").set_(
            torch.UntypedStorage(nbytes, device="meta"), offset, shape, stride)
            for shape, stride, offset, dtype, nbytes in layouts], spec)


def _meta_kernels_remembered():
    """_MetaKernelsRemembered where no dispatch mode below it would miss the ops it answers."""
    stack = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode_stack", None)
    unseen = stack is not None and all(isinstance(m, Tracker) and m.device_type != "meta" for m in stack())
    return _MetaKernelsRemembered() if unseen else contextlib.nullcontext()


class _CaughtOnMeta(Exception):
    """The model's own code caught an error on meta, and went on."""


class _CaughtErrors(torch.overrides.TorchFunctionMode):
    """Keeps the first error a torch function raises: a model whose own code catches it (an adapter
    that returns zeros on any error, say) would otherwise be traced as running, and wrongly."""

    def __init__(self):
        super().__init__()
        self.first = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except Exception as e:
            self.first = self.first or e
            raise


@contextlib.contextmanager
def _model_code_watched():
    """Around the model's code run on meta: what it prints is not the run's, and an error that it
    catches and goes on after makes the trace wrong, so it is raised once the code is done."""
    errors, printed = _CaughtErrors(), io.StringIO()
    with errors, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        yield
    if errors.first is not None:
        raise _CaughtOnMeta(f"{type(errors.first).__name__}: {first_line(errors.first)}")


def _autocast_on_meta(dtype, device, weights):
    return (contextlib.nullcontext() if dtype is None
            else _AutocastOnMeta(dtype, torch.device(device).type, weights))


class _Unwrapped(torch.nn.Module):
    """Calls a layer's class forward, past a forward set on the instance (as manual checkpointing
    does): the trace wants what the layer saves when it runs, as it does when it is recomputed."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return type(self.layer).forward(self.layer, *args, **kwargs)


def _on_meta(tensor, requires_grad=None):
    """A meta tensor of `tensor`'s shape and dtype; a floating one requires grad as `tensor` does,
    or as `requires_grad` says."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if not out.is_floating_point():
        return out
    return out.requires_grad_(tensor.requires_grad if requires_grad is None else requires_grad)


def _is_cache(value):
    """transformers' KV cache, which a layer takes by name (past_key_values, cache) or by position
    (GPT-2's)."""
    return any(c.__name__ == "Cache" for c in type(value).__mro__)


def _cache_tensors(cache, depth=3):
    """The tensors a KV cache holds, in its attributes' lists and objects (its layers' keys, values)."""
    if isinstance(cache, torch.Tensor):
        return [cache]
    if depth == 0 or isinstance(cache, (str, bytes, int, float, type(None))):
        return []
    values = cache if isinstance(cache, (list, tuple)) else list(getattr(cache, "__dict__", {}).values())
    return [t for v in values for t in _cache_tensors(v, depth - 1)]


# What transformers reads off a batch's values, and what the trace answers on meta instead.
_META_ANSWERS = {"fast_all": True, "find_packed_sequence_indices": None}


@contextlib.contextmanager
def _unpadded_on_meta():
    """transformers reads values off a batch: whether it has padding, from its mask
    (masking_utils.fast_all; transformers 5.17's OPT makes one of ones when given none), and
    without a KV cache (config.use_cache off, as the HF Trainer sets it) whether it packs several
    sequences in a row, from its position ids (find_packed_sequence_indices). On meta there is
    nothing to read: the trace is of a batch of whole sequences without padding (the budget counts
    padding's mask apart), so every such read answers "all true", "none packed". (The other read of
    fast_all, of a cache's part of the mask, comes only after a first forward; and the patch is
    process-wide, like the trace's other switches.)"""
    masking = sys.modules.get("transformers.masking_utils")
    reads = {name: getattr(masking, name) for name in _META_ANSWERS if hasattr(masking, name)}
    for name, read in reads.items():
        answer = _META_ANSWERS[name]
        setattr(masking, name,
                lambda t, read=read, answer=answer: answer if t.device.type == "meta" else read(t))
    try:
        yield
    finally:
        for name, read in reads.items():
            setattr(masking, name, read)



# ---------------------------------------------------------------- one decoder layer, traced on meta

def _is_fsdp_hook(hook):
    """FSDP2's forward hooks: its state's methods, bound, or wrapped (fully_shard of a group of modules)."""
    return getattr(inspect.unwrap(hook), "__qualname__", "").startswith("FSDPState.")


@contextlib.contextmanager
def _training_unchecked(model):
    """The model in train mode, transformers' own checkpointing, layerdrop (the peak is the step
    that drops no layer) and FSDP2's hooks off (the forward they wrap is what is traced; FSDP2's
    would gather the real shards); all as they were afterwards,
    its parameters the same objects (functional_call puts new ones in a ParameterDict: PEFT's
    trainable tokens, which the user's optimizer would then no longer step)."""
    modes = [(m, m.training) for m in model.modules()]
    parameters = [(m, dict(m._parameters)) for m in model.modules()]
    model.train()
    checkpointing = [m for m in model.modules() if m.__dict__.get("gradient_checkpointing") is True]
    for m in checkpointing:
        m.gradient_checkpointing = False
    dropping = [(m, m.layerdrop) for m in model.modules() if "layerdrop" in m.__dict__]
    for m, _ in dropping:
        m.layerdrop = 0.0
    hooked = [(m, name, getattr(m, name)) for m in model.modules()
              for name in ("_forward_pre_hooks", "_forward_hooks")
              if any(map(_is_fsdp_hook, getattr(m, name).values()))]
    for m, name, hooks in hooked:
        setattr(m, name, type(hooks)((k, h) for k, h in hooks.items() if not _is_fsdp_hook(h)))
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m in checkpointing:
            m.gradient_checkpointing = True
        for m, layerdrop in dropping:
            m.layerdrop = layerdrop
        for m, name, hooks in hooked:
            setattr(m, name, hooks)
        for m, kept in parameters:
            m._parameters.update(kept)


def _as_run(autocast_dtype, device, weights):
    """The modes that make meta tensors behave as the run: its kernels, and its autocast."""
    return _KernelsOnMeta(torch.device(device).type), _autocast_on_meta(autocast_dtype, device, weights)


@contextlib.contextmanager
def _tracked_as_run(device):
    """Trackers of what a forward on meta makes, entered: the meta device's, and on a CPU run the
    CPU's, where what a model makes with no device named lands (OPT's layerdrop draw, which
    transformers 5.17 makes whether or not a layer drops)."""
    trackers = [Tracker("meta")] + ([Tracker("cpu")] if torch.device(device).type == "cpu" else [])
    with contextlib.ExitStack() as entered:
        yield [entered.enter_context(tracker) for tracker in trackers]


def _held_since(trackers, starts, skipped):
    """The bytes `trackers` hold, `skipped`'s storages aside: (made by each one's start event, since)."""
    made = [(r.created <= start, r.nbytes) for tracker, start in zip(trackers, starts)
            for k, r in tracker.live.items() if k not in skipped]
    return sum(n for before, n in made if before), sum(n for before, n in made if not before)


def _layer_inputs(model, state, ids, inputs, autocast_dtype, device, weights, input_grads):
    """Every decoder layer's call (args, kwargs, hidden: its hidden states taken out, described as
    (shape, dtype, requires_grad)), from a forward on meta stopped as the last layer starts, and what
    that forward holds then, in bytes: (made before the layers, made by them), and whether the input
    embeddings' output is apart from the first layer's input (OPT adds positions). input_grads: whether
    the first layer's input requires grad (None: as this forward from token ids makes it).

    `inputs` gathers, by storage, what every layer takes besides the hidden states (layers of other
    kinds take other masks: Gemma2's sliding window), made once by the model and kept until backward
    (kept: a storage freed meanwhile could see its address reused, and a new one taken for it)."""
    layers, calls, captured = decoder_layers(model), [], {}
    key = lambda t: t.untyped_storage()._cdata
    embedded = model.get_input_embeddings().register_forward_hook(   # (update returns None: no new output)
        lambda module, args, output: captured.update(embedded=key(output)))

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = [*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states")]
        inputs.update((key(t), t) for t in pytree.tree_leaves(
            [v for v in rest if not _is_cache(v)]) if isinstance(t, torch.Tensor))
        changed = None
        if module is layers[0]:
            captured.update(first=key(hidden), starts=[tracker.event for tracker in trackers])
            if input_grads is not None and hidden.requires_grad != input_grads:
                hidden = hidden.detach().requires_grad_(input_grads)   # (the same storage)
                changed = (((hidden, *args[1:]), kwargs) if args
                           else (args, dict(kwargs, hidden_states=hidden)))
        # (the hidden states described, not kept: a layer's input is no longer held at the last's)
        calls.append(((None, *args[1:]) if args else args,
                      {k: v for k, v in kwargs.items() if k != "hidden_states"},
                      (hidden.shape, hidden.dtype, hidden.requires_grad)))
        if module is layers[-1]:
            # What the model's own forward made before its layers and still holds, their first
            # input aside (masks, rotary tables, OPT's embeddings and position embeddings); and
            # what the layers made that it still holds, this layer's input and the KV cache (counted
            # apart, layer by layer) aside: the outputs beside the hidden states that the loop
            # keeps (Bloom's attention weights), which a layer that is not checkpointed saves anyway
            own = {key(hidden)} | {key(t) for v in rest if _is_cache(v) for t in _cache_tensors(v)}
            captured["held"] = _held_since(trackers, captured["starts"], own | {captured["first"]})
            raise _Captured
        return changed

    capturing = [each.register_forward_pre_hook(capture, with_kwargs=True) for each in layers]
    kernels, cast = _as_run(autocast_dtype, device, weights)
    try:
        # Nothing is saved: the layers before are checkpointed, as far as this forward knows.
        # (fork_rng: a model may draw on the CPU's generator, as OPT's layerdrop does)
        with kernels, cast, _unpadded_on_meta(), torch.random.fork_rng(devices=[]), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: t), \
                _tracked_as_run(device) as trackers:
            torch.func.functional_call(model, state, (), {"input_ids": ids})
    except _Captured:
        pass
    finally:
        for h in [*capturing, embedded]:
            h.remove()
    return calls, captured["held"], captured.get("embedded") != captured["first"]


def _for_trace(args, kwargs, hidden, cache):
    """A captured call with `cache` (an empty KV cache, or None) for the one it took, which by now
    holds the other layers' keys and values, its hidden states a new meta leaf as described: (args,
    kwargs, hidden states)."""
    args = tuple(cache if _is_cache(a) else a for a in args)
    kwargs = {k: cache if _is_cache(v) else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = cache is not None
    shape, dtype, requires_grad = hidden
    hidden = torch.empty(shape, dtype=dtype, device="meta").requires_grad_(requires_grad)
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs, hidden


def _empty_cache(model, calls):
    """An empty KV cache of the kind the model's forward made (None where it made none, or one this
    cannot make again)."""
    made = next((v for args, kwargs, _ in calls for v in (*args, *kwargs.values()) if _is_cache(v)), None)
    try:
        return None if made is None else type(made)(config=model.config)
    except Exception:   # (traced without one, as before the cache was traced)
        return None


def _unsaved_in_cache(args, kwargs, saved):
    """The bytes of the keys and values a call's KV cache holds that are not `saved` (by storage):
    a layer with nothing to train saves none of them."""
    held = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for v in (*args, *kwargs.values())
            if _is_cache(v) for t in _cache_tensors(v) if t.device.type == "meta"}
    return sum(n for key, n in held.items() if key not in saved)


def _renewed(args, kwargs):
    """The call with a copy of its empty KV cache: each run of a layer fills its own."""
    renew = lambda v: copy.deepcopy(v) if _is_cache(v) else v
    return tuple(map(renew, args)), {k: renew(v) for k, v in kwargs.items()}


def _with_padding_mask(layer, args, kwargs, hidden):
    """The call with the mask transformers gives every layer when a batch has padding, where the
    model passes it: by keyword, or by position (GPT-2's blocks)."""
    bs, seq = hidden.shape[:2]
    mask = torch.empty(bs, 1, seq, seq, dtype=torch.bool, device="meta")
    names = list(inspect.signature(type(layer).forward).parameters)[1:]
    at = names.index("attention_mask") if "attention_mask" in names else len(args)
    if at < len(args):
        return (*args[:at], mask, *args[at + 1:]), kwargs
    return args, dict(kwargs, attention_mask=mask)


def _run_layer(layer, layer_state, call, inputs, autocast_dtype, device, weights, padded):
    """Forward and backward of `layer` on meta, under trackers: {"trains": whether backward runs
    through the layer; "saved": unique bytes saved for backward, the layer's input included,
    parameters and the inputs every layer shares (masks, rotary tables) not; "saved_input": the part
    of it that is the layer's input (under checkpointing, the input kept); "weight_copies": the part
    of it that is autocast's copies of weights; "dropout_noise": the part that is dropout's noise
    (on meta, as on CPU, dropout multiplies by a noise tensor of the input's dtype; CUDA's fused
    kernel keeps a bool mask instead, of "dropout_noise_numel" bytes); "hidden_bytes": the layer
    input's element size; "backward": the backward's peak above what it starts with; "forward": the
    forward's peak, its temporaries included; "forward_unsaved": the same in a forward that saves
    nothing, as checkpointing's first; "shared_inputs": the shared inputs' bytes; "shared_saved":
    the storages of those the layer saves; "cache_unsaved": what a KV cache keeps of it unsaved}."""
    args, kwargs, hidden = call
    shared = set(inputs) | weights
    tracker, forward, shared_saved = Tracker("meta"), Tracker("meta"), set()

    def pack(t):
        if t.device.type == "meta":
            key = t.untyped_storage()._cdata
            if key not in shared:
                tracker.track(t, "saved")
            elif key in inputs:
                shared_saved.add(key)
        return t

    if padded:
        args, kwargs = _with_padding_mask(layer, args, kwargs, hidden)
    # first as checkpointing runs it (what it would save is let go at once), then as backward needs
    unsaved, (kernels, cast) = Tracker("meta"), _as_run(autocast_dtype, device, weights)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: t), kernels, cast, unsaved:
        torch.func.functional_call(_Unwrapped(layer), layer_state, *_renewed(args, kwargs))
    kernels, cast = _as_run(autocast_dtype, device, weights)
    renewed = _renewed(args, kwargs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernels, cast, forward:
        out = torch.func.functional_call(_Unwrapped(layer), layer_state, *renewed)
    out = out if isinstance(out, torch.Tensor) else out[0]
    saved, cache_unsaved = tracker.live_bytes, _unsaved_in_cache(*renewed, saved=tracker.live)
    saved_input = getattr(tracker.live.get(hidden.untyped_storage()._cdata), "nbytes", 0)
    copies = (sum(r.nbytes for k, r in tracker.live.items() if k in cast.weight_copies)
              if autocast_dtype is not None else 0)
    # dropout's noise: what the forward made with empty_like (then filled by bernoulli_)
    made = {k: forward.live.get(k) for k in tracker.live}
    noise = [r for k, r in tracker.live.items()
             if made[k] is not None and made[k].op == "empty_like" and made[k]._dtype.is_floating_point]
    grad_out = torch.empty(out.shape, dtype=out.dtype, device="meta")
    tracker.start_window()
    start = tracker.live_bytes
    if out.requires_grad:   # (a layer with nothing to train, its input not requiring grad, has none)
        with tracker, kernels:
            torch.autograd.backward(out, grad_out)
    return {"trains": out.requires_grad, "saved": saved, "saved_input": saved_input,
            "dropout_noise": sum(r.nbytes for r in noise),
            "dropout_noise_numel": sum(r.nbytes // r._dtype.itemsize for r in noise),
            "weight_copies": copies, "hidden_bytes": hidden.element_size(), "forward": forward.peak_bytes,
            "forward_unsaved": unsaved.peak_bytes,
            "shared_inputs": sum(t.untyped_storage().nbytes() for k, t in inputs.items()
                                 if k not in weights),
            "shared_saved": shared_saved, "backward": tracker.peak_bytes - start,
            "cache_unsaved": cache_unsaved}


def _kinds(model, state, calls):
    """Each decoder layer's (kind, meta state): layers alike in their class, parameters (names,
    shapes, dtypes, which train) and input (the captured call's description) trace alike."""
    names = {id(m): n for n, m in model.named_modules()}
    for layer, (_, _, input_described) in zip(decoder_layers(model), calls):
        prefix = names[id(layer)] + "."
        layer_state = {"layer." + n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}
        parameters = tuple((n, t.shape, t.dtype, t.requires_grad) for n, t in layer_state.items())
        yield (type(layer), input_described, parameters), layer_state


def trace_layers(model, *, bs, seq, full=False, autocast_dtype=None, device="cpu", padded=False,
                 input_grads=None, kv_cache=False):
    """What each decoder layer keeps for backward, and what its backward needs on top, in bytes: a
    dict per layer, traced once for each kind of layer (alike in their class, parameters, which of
    them train, and their input), which its layers share.

    The model runs on the meta device (nothing is allocated): its parameters and buffers are
    replaced by meta tensors, a forward at bs x seq runs up to the last decoder layer, taking every
    layer's inputs, and a layer of each kind then runs forward and backward, in train mode, under a
    tracker, with the kernels CPU and CUDA run (_KernelsOnMeta) and the run's autocast
    (_AutocastOnMeta, with the device's policies). A gated LoRA layer gets a meta gate; full=True
    trains every parameter; padded=True gives the layers the bool mask transformers makes for a
    batch with padding (the model's forward before them runs without one); input_grads: whether
    the first layer's input requires grad (None: as the model's forward from token ids makes it);
    kv_cache: whether the run's forward makes a KV cache, each layer then traced with an empty one
    (which keeps copies of keys and values: a fused projection's output is then not saved whole).

    Each dict: its kind's figures (_run_layer's), and the model's, the same in every dict:
    {"shared_inputs": what the model makes once for every layer (masks, rotary tables), which
    checkpointing keeps as inputs; "shared_saved": the part of it that the layers save;
    "model_held": what the model's forward made before its layers and holds as the last starts,
    those and the embeddings' outputs (OPT's position embeddings too), the first layer's input
    aside; "outputs_held": what the layers before made and it still holds, the layer's input and the
    KV cache aside (Bloom's attention weights); "embeddings_apart": whether the embeddings' output
    is apart from the first layer's input}. Raises what the model raises where it cannot run on meta."""
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    state = {n: _on_meta(t, True if full else None) for n, t in model.named_parameters()}
    state.update((n, _on_meta(t)) for n, t in model.named_buffers())
    weights = {t.untyped_storage()._cdata for t in state.values()}
    # one gate for every layer, as the router makes it: it trains, so what multiplies it is saved
    gated = [m for m in layers.modules() if getattr(m, "n_experts", 1) > 1 and hasattr(m, "base")]
    gate = torch.empty(bs, gated[0].n_experts, device="meta", requires_grad=True) if gated else None
    inputs = {gate.untyped_storage()._cdata: gate} if gated else {}
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: (args, dict(kwargs, gate=gate)),
                                         with_kwargs=True) for m in gated]
    try:
        with _training_unchecked(model), _model_code_watched(), _meta_kernels_remembered():
            ids = torch.zeros(bs, seq, dtype=torch.long, device="meta")
            calls, (model_held, outputs_held), embeddings_apart = _layer_inputs(
                model, state, ids, inputs, autocast_dtype, device, weights, input_grads)
            cache = _empty_cache(model, calls) if kv_cache else None
            kinds, per_layer = {}, []
            for layer, call, (kind, layer_state) in zip(layers, calls, _kinds(model, state, calls)):
                if kind not in kinds:
                    kinds[kind] = _run_layer(layer, layer_state, _for_trace(*call, cache), inputs,
                                             autocast_dtype, device, weights, padded)
                per_layer.append(kinds[kind])
    finally:
        for h in hooks:
            h.remove()
    shared_saved = set().union(*(each.pop("shared_saved") for each in kinds.values()))
    model_figures = {"model_held": model_held, "outputs_held": outputs_held,
                     "embeddings_apart": embeddings_apart,
                     "shared_saved": sum(inputs[k].untyped_storage().nbytes() for k in shared_saved)}
    for each in kinds.values():
        each.update(model_figures)
    return per_layer


# ---------------------------------------------------------------- the budget per rank

def _shard_bytes(params, world, rank):
    """(padded shard, this rank's shard, all-gathered) bytes of parameters FSDP2 shards together.

    Each is cut along dim 0 into world chunks of ceil(rows / world) rows: every rank stores its
    chunk padded to that, the last ranks' padding being the longest (or the whole chunk); the
    optimizer's state is made like the shard's unpadded view; the all-gather gives world chunks."""
    padded = local = 0
    for p in params:
        rows = p.shape[0] if p.dim() else 1
        per_rank = -(-rows // world)
        row_bytes = p.numel() // rows * p.element_size() if rows else 0
        padded += per_rank * row_bytes
        local += max(0, min(per_rank, rows - rank * per_rank)) * row_bytes
    return padded, local, padded * world


def _fsdp_terms(groups, trained, world, rank):
    """FSDP2's terms on `rank`, from its groups of parameters (each decoder layer's, then the
    root's: the rest); trained: the ids of the parameters that train."""
    sizes = [_shard_bytes(g, world, rank) for g in groups]
    trains = [_shard_bytes([p for p in g if id(p) in trained], world, rank) for g in groups]
    return {
        "params": sum(s[0] for s in sizes),                # this rank's shards, padded
        "trainable_params": sum(t[1] for t in trains),
        "gradients": sum(t[0] for t in trains),            # views of reduce-scatter's outputs
        "gathered_root_params": sizes[-1][2],
        "gathered_layer_params": max((s[2] for s in sizes[:-1]), default=0),
        # the flat buffers they are all-gathered into (on one rank, shards are copied out directly)
        "all_gather_buffers": max((s[2] for s in sizes[:-1]), default=0) if world > 1 else 0,
        "root_all_gather_buffer": sizes[-1][2] if world > 1 else 0,
        # a group's gradients whole, copied into one flat input, and its shard of the output
        "reduce_scatter_buffers": max(2 * t[2] + t[0] for t in trains),
    }


def rank_terms(model, extra, trained, *, strategy, world_size, rank):
    """The terms that differ from one process's on one rank of `strategy` ("ddp", "fsdp"), in bytes.

    DDP keeps the whole model on every rank, and a flat gradient bucket for each group of trainable
    parameters (of one dtype, up to bucket_cap_mb, 25 MiB; the first 1 MiB): together as large as
    the trainable parameters. FSDP2 (fully_shard on each decoder layer, then the root) keeps this
    rank's shards of every parameter, frozen ones included, and of the gradients and the
    optimizer's state (_fsdp_terms)."""
    if strategy == "ddp":
        return {"ddp_gradient_buckets": sum(p.numel() * p.element_size() for p in
                                            _unique_params([model, *extra]) if id(p) in trained)}
    if strategy != "fsdp":
        return {}
    groups = [_unique_params([layer]) for layer in decoder_layers(model)]
    in_layers = {id(p) for g in groups for p in g}
    groups.append([p for p in _unique_params([model, *extra]) if id(p) not in in_layers])
    return _fsdp_terms(groups, trained, world_size, rank)


def _held_bytes(params, *, strategy, world_size, rank, padded):
    """Bytes of `params` on this rank: under FSDP2 their shards, padded (as gradients are) or the
    unpadded local view (as the optimizer's state and temporaries are)."""
    if strategy == "fsdp":
        return _shard_bytes(params, world_size, rank)[0 if padded else 1]
    return sum(p.numel() * p.element_size() for p in params)


def _each_layers_gradients(model, trained, **placement):
    """The bytes of each decoder layer's gradients on this rank."""
    trained = {id(p) for p in trained}
    return [_held_bytes([p for p in layer.parameters() if id(p) in trained], padded=True, **placement)
            for layer in decoder_layers(model)]


def _gradient_terms(model, trained, layer_gradients, *, traced, **placement):
    """The gradients' own moments, in bytes on this rank. "layer_gradients": the last decoder
    layer's, which its traced backward makes (0 for the per-token estimate, which leaves them out);
    "outside_layers_gradients": those of trained parameters outside the decoder layers; and
    "tied_head_gradient": a trained weight the head shares with the input embeddings, whose head
    gradient autograd holds until the embeddings' comes, at the end of backward, then adds; and
    "head_gradient": a trained head weight's, which its backward makes whole."""
    in_layers = {id(p) for p in _unique_params(decoder_layers(model))}
    outside = [p for p in trained if id(p) not in in_layers]
    head = embedding_module(model.get_output_embeddings()).weight
    trains = any(p is head for p in trained)
    tied = head is embedding_module(model.get_input_embeddings()).weight and trains
    return {"layer_gradients": layer_gradients[-1] if traced else 0,
            "head_gradient": head.numel() * head.element_size() if trains else 0,
            "outside_layers_gradients": _held_bytes(outside, padded=True, **placement),
            "tied_head_gradient": head.numel() * head.element_size() if tied else 0}


def _held_terms(model, layers, terms, *, bs, seq, gradients_held, input_leaf, loss_held):
    """What a step holds over from the one before, in bytes. "<phase>_held_gradients": the
    gradients, in the phases gradients_held names; "input_leaf": the input embeddings' output where
    it is a leaf that requires grad (transformers' enable_input_require_grads) apart from the first
    layer's input (which the layers count; input_leaf "apart": known to be, as injected items make a
    new tensor of it, else as the trace finds it): the graph holds it through forward's end and backward;
    "<phase>_held_input_leaf": that leaf and its gradient from the step before, alive as long as the
    loop holds its loss (the phases loss_held names)."""
    weight = embedding_module(model.get_input_embeddings()).weight
    leaf = bs * seq * weight.shape[-1] * weight.element_size() if input_leaf else 0
    apart = input_leaf == "apart" or layers[-1]["embeddings_apart"]
    # (a held leaf and its gradient outlive the graph, whether or not a layer saved the leaf)
    return {"input_leaf": leaf if apart else 0,
            **{f"{phase}_held_gradients": terms["gradients"] if phase in gradients_held else 0
               for phase in ("forward", "backward")},
            **{f"{phase}_held_input_leaf": 2 * leaf if phase in loss_held else 0
               for phase in ("forward", "optimizer")}}


def _stand_ins(groups, elements, scale):
    """CPU zeros for each parameter of each group, in order, of its dtype and elements[id]/scale."""
    return [dict(group, params=[torch.zeros(max(1, round(elements[id(p)] / scale)), dtype=p.dtype,
                                            requires_grad=True) for p in group["params"]])
            for group in groups]


def _as_on_cuda(kind, group):
    """A group as torch steps it on CUDA: foreach where one of torch's optimizers that choose it
    there is left the choice, but for a differentiable step, or Adam's with a tensor learning rate
    without capturable (torch's own exceptions)."""
    left = group.get("foreach") is None and not group.get("fused") and not group.get("differentiable")
    tensor_lr = kind.__name__ in ("Adam", "AdamW") and isinstance(group.get("lr"), torch.Tensor) \
        and not group.get("capturable")
    chooses = kind.__module__.startswith("torch.optim") and kind.__name__ in _FOREACH_ON_CUDA
    return dict(group, foreach=True) if chooses and left and not tensor_lr else group


def _steps_made(stepping):
    """The peak of a step, the first's state made: an early one, and one past every warm-up (RAdam's
    rectified steps make more; ASGD averages from a step on, seen in the step after its count)."""
    stepping.step()
    with Tracker("cpu") as early:
        stepping.step()
    for state in stepping.state.values():   # (steps counted as tensors or ints)
        step = state.get("step")
        if step is not None:
            state["step"] = step.fill_(STEADY_STEP) if isinstance(step, torch.Tensor) else STEADY_STEP
    stepping.step()
    with Tracker("cpu") as late:
        stepping.step()
    return max(early.peak_bytes, late.peak_bytes)


def _step_temporary(optimizer, trained, *, on_cuda, **placement):
    """(bytes, None) an optimizer's step makes beyond its state, on this rank (its shards, under
    FSDP2): measured, its class stepping CPU stand-ins of what it trains (its groups and options, the
    parameters in its order, each one's elements on this rank divided by one factor, which
    elementwise temporaries scale with), as CUDA runs it where the budget is CUDA's. None: the
    reference's AdamW, over `trained`. Where the stand-ins cannot step: (one of every parameter it
    trains, as foreach AdamW makes, why)."""
    ids = {id(p) for p in trained}
    if optimizer is None:
        kind, groups = torch.optim.AdamW, [{"params": list(trained)}]
    else:
        kind = type(unwrapped_optimizer(optimizer))
        groups = [dict(group, params=[p for p in group["params"] if id(p) in ids])
                  for group in unwrapped_optimizer(optimizer).param_groups]
    groups = [_as_on_cuda(kind, g) if on_cuda else g for g in groups if g["params"]]
    if not groups:
        return 0, None
    elements = {id(p): _held_bytes([p], padded=False, **placement) // p.element_size()
                for g in groups for p in g["params"]}
    scale = max(1, -(-sum(elements.values()) // STAND_IN_ELEMENTS))
    # the same steps measured once a process (each budget of a sweep, each report's), whatever the
    # learning rate a scheduler has set
    options = [sorted((k, type(v) if k in ("lr", "initial_lr") else repr(v))
                      for k, v in g.items() if k != "params") for g in groups]
    sizes = [[(elements[id(p)], p.dtype) for p in g["params"]] for g in groups]
    key = (kind, scale, repr(options), repr(sizes))
    if key not in _MEASURED_STEPS:
        _MEASURED_STEPS[key] = _measured_step(kind, groups, elements, scale)
    measured, why = _MEASURED_STEPS[key]
    if why is not None:   # one of every parameter it trains, as foreach AdamW makes
        measured = _held_bytes([p for g in groups for p in g["params"]], padded=False, **placement)
    return measured, why


def _measured_step(kind, groups, elements, scale):
    """(the bytes of the larger of an early and a late step, on stand-ins, scaled back; None), or
    (None, why it could not run)."""
    try:
        # (not in a probe's tracker, if its report is made inside it; on CPU whatever the default)
        with _disable_current_modes(), torch.device("cpu"):
            stepping = kind(_stand_ins(groups, elements, scale))
            for group in stepping.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            return _steps_made(stepping) * scale, None
    except Exception as e:   # (one that needs CUDA tensors, or matrices)
        return None, (f"{kind.__name__}'s step could not run on stand-ins ({type(e).__name__}: "
                      f"{first_line(e)}); its temporary is taken as one of every trained parameter, as "
                      "foreach AdamW makes")


# torch.optim's optimizers: state tensors the size of each parameter they step, from a group's options
_STATES = {"Adam": lambda group: 2 + bool(group.get("amsgrad")), "Adadelta": 2, "Adagrad": 1,
           "Adamax": 2, "ASGD": 1, "NAdam": 2, "RAdam": 2, "Rprop": 2,
           "RMSprop": lambda group: 1 + (group.get("momentum", 0) != 0) + bool(group.get("centered")),
           "SGD": lambda group: int(group.get("momentum", 0) != 0)}
_STATES["AdamW"] = _STATES["Adam"]


def optimizer_states(optimizer):
    """How many times its trained parameters' bytes an optimizer keeps as state: by its class and
    each group's options for torch's own (groups weighed by their trained bytes); for another, as
    its state after a step holds (Adafactor keeps row and column factors); AdamW's 2 for none
    given, or another before its first step. Several (a list): each weighed by the bytes it trains."""
    if isinstance(optimizer, (list, tuple)):
        trains = [sum(p.nbytes for p in stepped_params(o) if p.requires_grad) for o in optimizer]
        weighed = sum(optimizer_states(o) * n for o, n in zip(optimizer, trains))
        return weighed / sum(trains) if sum(trains) else 2
    optimizer = unwrapped_optimizer(optimizer)
    if optimizer is None:
        return 2
    states = _STATES.get(type(optimizer).__name__)
    if states is not None and type(optimizer).__module__.startswith("torch.optim"):
        per_group = [(states(group) if callable(states) else states,
                      sum(p.nbytes for p in group["params"] if p.requires_grad))
                     for group in optimizer.param_groups]
        trained = sum(n for _, n in per_group)
        return sum(k * n for k, n in per_group) / trained if trained else 2
    stepped = [(p, state) for p, state in optimizer.state.items() if state]
    kept = sum(t.nbytes for _, state in stepped for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    return kept / sum(p.nbytes for p, _ in stepped) if stepped else 2


def _optimizer_terms(optimizer, trained, trainable_bytes, *, on_cuda, **placement):
    """(the optimizer's state and its step's temporary, in bytes on this rank; what of them is an
    estimate, and why). Of several, the step's temporary is the largest (they step in turn)."""
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    temporaries = [_step_temporary(o, trained, on_cuda=on_cuda, **placement) for o in optimizers]
    return ({"optimizer_state": round(optimizer_states(optimizer) * trainable_bytes),
             "optimizer_temporary": max((t for t, _ in temporaries), default=0)},
            [why for _, why in temporaries if why])


# ---------------------------------------------------------------- the budget

def _per_layer(checkpointing, n_layers):
    """checkpointing as a flag per decoder layer: True or False for all, N for every N-th layer from
    the first (transformers' every_n_layers; True is 1, False 0), or a flag per layer already."""
    if isinstance(checkpointing, int):
        return [bool(checkpointing) and i % checkpointing == 0 for i in range(n_layers)]
    if len(checkpointing) != n_layers:
        raise ValueError(f"checkpointing: {len(checkpointing)} flags for {n_layers} decoder layers")
    return [bool(c) for c in checkpointing]


def _estimated_layer(s, *, bs, seq, act, mask, full, casts_weights):
    """One decoder layer by the per-token estimate, calibrated on OPT, in the trace's terms: layer
    input, the residual before the MLP, q, k, v and the attention output, SDPA's log-sum-exp, the
    MLP activation (three of them for a gated MLP), two residual-dropout masks, the inputs of
    adapted linears, and each adapter's own: r/E-wide expert activations (lean), or E x out
    per-expert outputs (einsum); LoRA dropout keeps its output and its mask. "lora_per_token": the
    adapters' own part, kept in both cases to explain the per-layer figure."""
    h, lora, tokens = s["hidden"], s["lora"], bs * seq
    adapted = s["linears"] if full else s["adapted"]
    lora_dropout = 0 if full else lora["dropout"]
    # Saved per token in one decoder layer, in bytes.
    per_token = act * (2 * h + h + 2 * s["kv"] + h + (3 if s["gated_mlp"] else 1) * s["ffn"])
    per_token += 4 * s["heads"] if s["attn"] == "sdpa" else 0   # log-sum-exp, fp32
    per_token += 2 * h * mask if s["dropout"] > 0 else 0
    groups = {_SHARED_INPUTS.get(n, n) for n in adapted if n not in _ALREADY_SAVED}
    if lora_dropout == 0:
        per_token += sum(act * (h if g.endswith("input") else adapted[g][0]) for g in groups)
    lora_per_token = 0
    if not full:
        for name, (d_in, d_out) in adapted.items():
            r, experts = lora["r"], lora["experts"]
            if experts == 1:
                lora_per_token += 4 * r
            elif lora["impl"] == "lean":
                lora_per_token += 4 * 2 * r
            else:
                lora_per_token += 4 * (r + experts * d_out)
            if lora_dropout > 0:
                lora_per_token += d_in * (4 + mask)
    eager_scores = bs * s["heads"] * seq * seq * 4 if s["attn"] == "eager" else 0  # softmax in fp32
    # Autocast copies what is not in its dtype: the weights, or only LoRA's fp32 ones (which the
    # estimate leaves out).
    copies = sum(i * o for i, o in s["linears"].values()) * act if casts_weights else 0
    return {"trains": True, "makes_gradients": False,
            "saved": tokens * (per_token + lora_per_token) + eager_scores,
            "weight_copies": copies,
            "backward": tokens * act * (s["ffn"] + 2 * h), "forward": 0, "forward_unsaved": 0,
            "model_held": 0, "outputs_held": 0, "shared_inputs": 0, "shared_saved": 0,
            "embeddings_apart": True, "cache_unsaved": 0, "saved_input": tokens * h * act,
            "hidden_bytes": act, "lora_per_token": lora_per_token}


def _traced_layer(traced, *, on_cuda):
    """The trace's figures in place of the estimate's."""
    # (on CUDA, dropout's fused kernel keeps a bool mask where the trace has the noise)
    bool_masks = traced["dropout_noise"] - traced["dropout_noise_numel"] if on_cuda else 0
    return {"trains": traced["trains"], "makes_gradients": True,
            "saved": traced["saved"] - traced["weight_copies"] - bool_masks,
            "saved_input": traced["saved_input"], "weight_copies": traced["weight_copies"],
            "backward": traced["backward"], "forward": traced["forward"],
            "forward_unsaved": traced["forward_unsaved"],
            "model_held": traced["model_held"], "outputs_held": traced["outputs_held"],
            "embeddings_apart": traced["embeddings_apart"], "hidden_bytes": traced["hidden_bytes"],
            "cache_unsaved": traced["cache_unsaved"],
            "shared_inputs": traced["shared_inputs"], "shared_saved": traced["shared_saved"]}


def _terms(s, layers, *, bs, seq, act, mask, full, checkpointed, loss_chunks, trainable_bytes,
           casts_weights, param_bytes, positions):
    """The budget's terms, in bytes, from the model's structure and each layer's figures (the last
    layer's stand for a layer's); checkpointed: per layer, whether it is; positions: those of a
    sequence the logits are made for."""
    layer = layers[-1]
    h, lora, tokens, hidden_bytes = s["hidden"], s["lora"], bs * seq, layer["hidden_bytes"]
    # what the model makes once for every layer: kept as inputs where a layer is checkpointed,
    # else the part the layers save
    shared = layer["shared_inputs" if any(checkpointed) else "shared_saved"]
    kept_inputs = sum(checkpointed) * tokens * h * hidden_bytes
    head_gradient = s["vocab"] * h * 4 if loss_chunks > 1 and (full or s["head_trains"]) else 0   # fp32
    adapted = s["linears"] if full else s["adapted"]
    return {
        "params": param_bytes,
        "trainable_params": trainable_bytes,
        "gradients": trainable_bytes,
        "activations_per_layer": layer["saved"],
        "backward_temporaries_per_layer": layer["backward"],
        "shared_layer_inputs": shared,
        "lora_activations_per_layer": tokens * layer["lora_per_token"],
        "einsum_expert_outputs_per_layer": (tokens * 4 * lora["experts"] * sum(o for _, o in adapted.values())
                                            if lora["impl"] == "einsum" and lora["experts"] > 1 and not full
                                            else 0),
        "attention_mask_per_layer": layer["attention_mask"],
        # keys and values the forward's KV cache keeps that no layer saves (layers with nothing to train)
        "kv_cache_unsaved": sum(l["cache_unsaved"] for l in layers),
        "dropout_masks_per_layer": tokens * ((2 * h * mask if s["dropout"] > 0 else 0)
                                             + (sum(d for d, _ in adapted.values()) * mask
                                                if not full and lora["dropout"] > 0 else 0)),
        "checkpointed_inputs": kept_inputs,
        "saved_activations": kept_inputs + sum(l["saved"] for l, c in zip(layers, checkpointed) if not c)
                             + tokens * h * hidden_bytes    # + the final norm's input
                             + (bs * seq * seq if layer["attention_mask"] else 0)  # + the bool mask, once
                             + shared,
        "logits": bs * positions * s["vocab"] * 4 // loss_chunks,   # one fp32 copy
        "head_token_copy": s["head_copy"] if loss_chunks == 1 else 0,   # (the fused loss has its own head)
        "logits_16bit": (bs * positions * s["vocab"] * act // loss_chunks) if act < 4 else 0,
        # chunked: the gradients the fused head and loss take in forward and keep for backward
        # (the hidden states', in their dtype, the last position's zero included; the head's, fp32)
        "kept_loss_gradient": (tokens * h * _dtype_bytes(s["weights_dtype"]) + head_gradient
                               if loss_chunks > 1 else 0),
        # chunked, what its forward holds beside a chunk's logits: the hidden states' gradient as
        # the fp32 sum it gathers in (and the head's), and in the head's compute dtype each
        # position's target row of the head, the shifted hidden states (a copy, unless one
        # sequence's already are in it) and, in 16 bits, a chunk's product with the head
        "loss_forward_buffers": (bs * (seq - 1) * h * (4 + act * (1 + (bs > 1 or act != hidden_bytes)
                                                                  + (act < 4))) + head_gradient
                                 if loss_chunks > 1 else 0),
        # Autocast re-casts each frozen weight at every call and the copy is saved for backward:
        # lm_head's (under the fused loss, a slice) and every layer's, but a checkpointed layer's
        # only while it is recomputed (its forward saved nothing).
        "autocast_weight_copies": ((s["vocab"] * h // loss_chunks * act if casts_weights else 0)
                                   + sum(l["weight_copies"] for l, c in zip(layers, checkpointed) if not c)),
    }


def _layers_forward(layers, *, training, gathered, buffer, hidden, checkpointed):
    """The peak of the decoder layers' forward, inside the layer that holds the most: the model's
    forward holding what it made before the layers (embeddings' outputs, masks, rotary tables), the
    layers before it their saved activations (or their checkpointed input), and its own input and
    forward's peak (as checkpointing runs it, saving nothing, where it is checkpointed)."""
    peak = held_before = 0
    for i, (layer, recomputed) in enumerate(zip(layers, checkpointed)):
        own = layer["forward_unsaved"] if recomputed else layer["forward"]
        # the outputs the loop keeps of the layer before, saved by it unless it is checkpointed
        kept = layer["outputs_held"] if i and checkpointed[i - 1] else 0
        peak = max(peak, held_before + hidden + kept + own)
        if i:   # FSDP2 gathers a layer while it keeps the last layer's flat all-gather buffer: a third
            peak = max(peak, held_before + hidden + kept + buffer)
        held_before += ((hidden if recomputed else layer["saved"] + layer["weight_copies"])
                        + layer["cache_unsaved"])
    return training + gathered + buffer + layers[-1]["model_held"] + peak


def _layers_backward(terms, layers, layer_gradients, *, training, gathered, buffer, hidden, checkpointed):
    """The peak of the decoder layers' backward, which goes from the last layer to the first; hidden:
    the bytes of one hidden state; checkpointed: per layer, whether it is; layer_gradients: each
    layer's gradients' bytes. Each layer's backward comes with the activations (or checkpointed
    inputs) of the layers before it still held, its own, and the gradients of the layers after it
    and outside them (its own its traced backward makes). A checkpointed layer recomputes its
    forward first (whose own peak, its temporaries included, can be the higher). A tied head's
    gradient, held until the embeddings' comes, stands in the gradients term for the weight's. A
    layer that backward does not run through (nothing in it or before it trains) holds nothing."""
    outside_layers = terms["outside_layers_gradients"]
    if terms["backward_held_gradients"]:   # made before, counted in `training`: backward adds to them
        outside_layers, layer_gradients = 0, [0] * len(layers)
    # Beside the layers': the gradient in flight (in the final norm's input's place), the bool mask
    # and the inputs every layer shares, which checkpointing keeps too (a padded batch's mask is
    # bs x seq x seq). lm_head's autocast copy went with its backward.
    beside = terms["saved_activations"] - sum(hidden if c else layer["saved"]
                                              for layer, c in zip(layers, checkpointed))
    peak = held = 0
    after = sum(layer_gradients)
    for layer, recomputed, gradients in zip(layers, checkpointed, layer_gradients):
        per_layer = layer["saved"] + layer["weight_copies"]
        held += hidden if recomputed else per_layer   # this layer's and those before it
        after -= gradients
        # (a recomputed layer saves its checkpointed input again: the same tensor)
        own = (max(per_layer - layer["saved_input"] + layer["backward"], layer["forward"]) if recomputed
               else layer["backward"])
        own += 0 if layer["makes_gradients"] else gradients   # (the estimate's backward leaves them out)
        if layer["trains"]:
            peak = max(peak, held + own + outside_layers + after)
    return training + gathered + buffer + beside + peak


def _phases(terms, layers, layer_gradients, *, tokens, h, checkpointed, loss_chunks, logits_kept):
    """Each phase's peak, from the terms and each layer's figures and gradients' bytes; logits_kept:
    the 16-bit logits live through the loss (a model's own forward returns them).

    Under FSDP2 the root's parameters stay all-gathered from forward's start to backward's end,
    and a layer's are all-gathered while it computes, through a flat buffer (all_gather_buffers;
    none on one rank); in backward the next layer's are prefetched. Zero terms elsewhere."""
    steady = (terms["params"] + terms["optimizer_state"] + terms.get("cuda_workspaces", 0)
              + terms.get("ddp_gradient_buckets", 0))
    root, gathered = terms.get("gathered_root_params", 0), terms.get("gathered_layer_params", 0)
    buffer = terms.get("all_gather_buffers", 0)
    # gradients made before, alive in forward, and in backward (which then adds to them)
    held = terms["backward_held_gradients"]
    in_forward = steady + root + terms["forward_held_gradients"] + terms["forward_held_input_leaf"]
    training = steady + root + held + terms["input_leaf"]
    saved = terms["saved_activations"] + terms["autocast_weight_copies"]
    hidden = tokens * h * layers[-1]["hidden_bytes"]   # a hidden state (the final norm's, through the loss)
    if loss_chunks == 1:
        # forward ends with the logits and their log-softmax; backward starts with the log-softmax
        # (saved), the loss's gradient and the logits' gradient. ref_train's 16-bit logits exist
        # only until .float() has copied them: a spike below the log-softmax's. A head with
        # trainable tokens saves its merged copy, and its backward makes its gradient.
        copy = terms["head_token_copy"]
        forward_peak = (in_forward + saved + hidden + 2 * terms["logits"] + copy
                        + (terms["logits_16bit"] if logits_kept else 0))
        backward_start = training + buffer + saved + 3 * terms["logits"] + copy
        # then a trained head's backward: the logits' gradient, and the head's and the hidden
        # states' gradients it makes
        backward_start = max(backward_start, training + buffer + saved + terms["logits"]
                             + terms["head_gradient"] + hidden + 2 * copy)
    else:
        # The head and the loss fused: in forward, one chunk of fp32 logits at a time (exp'd in
        # place; under 16-bit beside its 16-bit copy), while the hidden states' gradient (and the
        # head's, when it trains) fills up, then is kept for backward, which only scales it into a
        # copy. Nothing is recomputed.
        kept = terms["kept_loss_gradient"]
        forward_peak = (in_forward + saved + hidden + terms["logits"] + terms["logits_16bit"]
                        + terms["loss_forward_buffers"])
        backward_start = training + buffer + saved + 2 * kept
    # (inside the layers, the model's forward holds the leaf anyway; the output holds the cache;
    # FSDP2, the last layer's flat all-gather buffer until backward's first all-gather)
    forward_peak += terms["input_leaf"] + terms["kv_cache_unsaved"] + buffer
    forward_peak = max(forward_peak, _layers_forward(layers, training=in_forward, gathered=gathered,
                                                     buffer=buffer, hidden=hidden, checkpointed=checkpointed))
    if root:
        # FSDP2 frees the root's flat all-gather buffer only once the first layer's parameters
        # are copied out of theirs: both groups and their buffers, and the embeddings' outputs
        forward_peak = max(forward_peak, in_forward + terms["root_all_gather_buffer"] + gathered + buffer
                           + 3 * hidden)
    in_layers = _layers_backward(terms, layers, layer_gradients, training=training, gathered=gathered,
                                 buffer=buffer, hidden=hidden, checkpointed=checkpointed)
    # FSDP2 reduce-scatters a group's gradients once its backward is done (the root's last)
    reduce_scatter = (training + gathered + terms["gradients"] - held + terms["reduce_scatter_buffers"]
                      if "reduce_scatter_buffers" in terms else 0)
    # the end: every gradient made (a tied weight's two summed, beside both; the input leaf's)
    backward_end = (training + terms["gradients"] - held + 2 * terms["tied_head_gradient"]
                    + terms["input_leaf"])
    return {"forward": forward_peak, "backward": max(backward_start, in_layers, reduce_scatter, backward_end),
            "optimizer": (steady + terms["gradients"] + terms["optimizer_temporary"]
                          + terms["optimizer_held_input_leaf"])}


def _categories(terms, phases, peak_phase, loss_chunks):
    """What the peak holds, by memcheck's categories."""
    trainable_bytes = terms["trainable_params"]
    # FSDP2's parameters gathered whole: the root's, and a layer's (in backward none at its start,
    # two in a layer's: the rest of what it gathers, its flat buffers, is temporaries)
    gathered = (terms.get("gathered_root_params", 0) + terms.get("gathered_layer_params", 0)
                if peak_phase != "optimizer" else 0)
    categories = {
        "trainable_params": trainable_bytes, "frozen_params": terms["params"] - trainable_bytes + gathered,
        "gradients": (terms["gradients"] if peak_phase == "optimizer"
                      else terms[f"{peak_phase}_held_gradients"]),
        "optimizer_state": terms["optimizer_state"],
        "activations": terms["saved_activations"] + terms["autocast_weight_copies"]
                       + (terms["logits"] + terms["head_token_copy"] if loss_chunks == 1
                          else terms["kept_loss_gradient"]),
    }
    if peak_phase == "optimizer":
        categories["activations"] = 0
    categories["temporaries"] = phases[peak_phase] - sum(categories.values())
    return categories


def _layers(model, s, *, bs, seq, act, mask, full, padded, casts_weights, autocast_dtype, device,
            **seen):
    """(each decoder layer's figures, how they were had): traced, else the per-token estimate.
    Layers of one kind share one dict. seen: what trace_layers takes of the run (input_grads,
    kv_cache)."""
    estimated = _estimated_layer(s, bs=bs, seq=seq, act=act, mask=mask, full=full,
                                 casts_weights=casts_weights)
    padded = padded and s["attn"] == "sdpa"
    traced, bias_traced = [None] * s["layers"], False
    # traced under the mask a padded batch gets, else without it (a layer this trace cannot give
    # one), else not at all (an op that reads values, or a decoder this trace cannot call)
    for masked in (True, False) if padded else (False,):
        try:
            traced, bias_traced = trace_layers(model, bs=bs, seq=seq, full=full, device=device, padded=masked,
                                               autocast_dtype=autocast_dtype, **seen), masked
            method = "traced"
            break
        except _CaughtOnMeta as e:
            method = f"formula: the layer does not run on meta ({e}; the model's own code caught it)"
        except Exception as e:
            method = f"formula: the layer does not run on meta ({type(e).__name__}: {first_line(e)})"
    on_cuda = torch.device(device).type == "cuda"
    kinds = {}
    for each in traced:
        if id(each) in kinds:
            continue
        layer = kinds[id(each)] = dict(estimated)
        if each is not None:
            layer.update(_traced_layer(each, on_cuda=on_cuda))
        # padded=True: some batch has padding, so SDPA gets an explicit mask instead of is_causal,
        # and each layer's call turns it into a float bias, bs x 1 x seq x seq, which it saves for
        # backward (a layer that saves nothing, none).
        layer["attention_mask"] = bs * seq * seq * act if padded else 0
        if not bias_traced and layer["saved"]:   # (traced under the mask, the bias is in its figures)
            layer["saved"] += layer["attention_mask"]
        layer["model_held"] += bs * seq * seq if layer["attention_mask"] else 0   # its bool mask, made once
    return [kinds[id(each)] for each in traced], method


def budget(model, *, bs, seq, checkpointing, autocast_dtype=None, loss_chunks=1, device="cpu",
           extra=(), full=False, padded=False, cuda_workspace_bytes=None, strategy="none",
           world_size=1, rank=0, shifted_logits=True, input_grads=None, gradients_held=(),
           input_leaf=False, loss_held=(), kv_cache=False, optimizer=None):
    """Predict training memory from a model and the run's shapes; every term in bytes.

    model: the causal LM with its adapters, on any device (meta: nothing is allocated).
    checkpointing: True, False, N (every N-th decoder layer, as transformers' every_n_layers), or a
    flag per decoder layer. extra: other modules trained with it (iLoRA's router, projector). The
    LoRA rank, experts, form and dropout are read off the adapted layers, the attention kernel and
    the weights' dtype off the model. full=True: full fine-tuning (every parameter trained). On
    CUDA, cuBLAS's workspaces count too: cuda_workspace_bytes when given, else measured
    (cuda_workspaces). strategy "ddp" or "fsdp" budgets `rank` of world_size processes, each at bs x
    seq (rank_terms). shifted_logits: logits for every position but the last, 16-bit ones freed once
    copied to fp32 (ref_train's loss); False: a model's own forward's, for every position, returned
    and alive through its loss. input_grads: whether the first decoder layer's input requires grad
    (None: as the model's forward makes it); gradients_held: the phases ("forward", "backward") in
    which gradients made before are alive (Lightning frees them after the next forward; accumulation
    keeps them); input_leaf: whether the embeddings' output is a leaf that requires grad; loss_held:
    the phases ("optimizer", "forward") into which the loop holds the loss, and that leaf with it;
    kv_cache: whether the forward makes a KV cache (use_cache in training, without checkpointing);
    optimizer: the one the run steps (or a list of them), read for its state (optimizer_states) and
    its step's temporary (None: torch's AdamW). Each kind of layer is traced ("method": "traced"),
    else estimated per token ("formula: ", why)."""
    s = _structure(model)
    checkpointed = _per_layer(checkpointing, s["layers"])
    act = _dtype_bytes(autocast_dtype or s["weights_dtype"])
    on_cuda = torch.device(device).type == "cuda"
    mask = 1 if on_cuda else act                       # dropout masks: bool on CUDA, act dtype on CPU
    casts_weights = autocast_dtype is not None and autocast_dtype != s["weights_dtype"]
    layers, method = _layers(model, s, bs=bs, seq=seq, act=act, mask=mask, full=full, padded=padded,
                             casts_weights=casts_weights, autocast_dtype=autocast_dtype, device=device,
                             input_grads=input_grads, kv_cache=kv_cache)
    # (a layer that backward does not run through saves nothing, checkpointed or not)
    checkpointed = [c and layer["trains"] for c, layer in zip(checkpointed, layers)]
    by_dtype = _bytes_by_dtype(params := _unique_params([model, *extra]))
    trained = params if full else [p for p in params if p.requires_grad]
    terms = _terms(s, layers, bs=bs, seq=seq, act=act, mask=mask, full=full, loss_chunks=loss_chunks,
                   checkpointed=checkpointed, trainable_bytes=sum(p.nbytes for p in trained),
                   casts_weights=casts_weights, param_bytes=sum(by_dtype.values()),
                   positions=seq - 1 if shifted_logits else seq)
    placement = dict(strategy=strategy, world_size=world_size, rank=rank)
    terms.update(rank_terms(model, extra, {id(p) for p in trained}, **placement))
    optimizer_terms, estimated = _optimizer_terms(optimizer, trained, terms["trainable_params"],
                                                  on_cuda=on_cuda, **placement)
    terms.update(optimizer_terms)
    layer_gradients = _each_layers_gradients(model, trained, **placement)
    terms.update(_gradient_terms(model, trained, layer_gradients, traced=method == "traced", **placement))
    terms.update(_held_terms(model, layers, terms, bs=bs, seq=seq, gradients_held=gradients_held,
                             input_leaf=input_leaf, loss_held=loss_held))
    if on_cuda and (cuda_workspace_bytes is not None or torch.cuda.is_available()):
        # (budgeting for CUDA on a machine without it, they are not known: the term is absent)
        terms["cuda_workspaces"] = (cuda_workspaces(device) if cuda_workspace_bytes is None
                                    else cuda_workspace_bytes)
    phases = _phases(terms, layers, layer_gradients, tokens=bs * seq, h=s["hidden"],
                     checkpointed=checkpointed, loss_chunks=loss_chunks, logits_kept=not shifted_logits)
    peak_phase = max(phases, key=phases.get)
    return {"full": full, "method": method, "estimated": estimated, "terms": terms, "phases": phases,
            "params_by_dtype": by_dtype, "peak_phase": peak_phase, "peak_bytes": phases[peak_phase],
            "categories": _categories(terms, phases, peak_phase, loss_chunks)}


def _masked(seen):
    """Whether the probed run's SDPA gets a mask: padding or a caller's mask, or packed sequences
    where no KV cache is made (transformers then masks them)."""
    return seen.get("padded") is True or (seen.get("padded") == "packed" and not seen.get("kv_cache"))


def _placement(model):
    """The strategy, world size and rank of a probed model's process: what its budget is per rank (on
    one process, a strategy only where its wrapper is there: DDP's buckets, FSDP2's gathers)."""
    rank, world_size = rank_and_world()
    strategy = _strategy(model) or ("ddp" if world_size > 1 else "none")
    return {"strategy": strategy, "world_size": world_size, "rank": rank}


def probed(stack, phases):
    """(the budget of the stack memcheck's probe watched (its _Stack) at the shapes and autocast of
    its largest training batch, less what the CUDA allocator held beyond tracked tensors in
    `phases`; None, and why, before a training forward or for a model the budget cannot read)."""
    seen = stack.seen
    if getattr(getattr(stack.lm, "config", None), "is_encoder_decoder", False):
        return None, (f"no budget: {type(stack.lm).__name__} is an encoder-decoder model; the budget "
                      "reads decoder-only causal LMs")
    if stack.lm is None or "bs" not in seen:
        return None, "no budget: no training forward of a Hugging Face causal LM was seen"
    if flattened_by_fsdp1(stack.model):
        return None, ("no budget: FSDP1 (FullyShardedDataParallel) flattens the parameters and hides "
                      "the layers' shapes; the budget reads DDP and FSDP2 (fully_shard)")
    cast_dtypes = fsdp2_cast_dtypes(stack.model)
    if cast_dtypes:
        return None, (f"no budget: FSDP2's MixedPrecisionPolicy gathers the parameters in "
                      f"{', '.join(cast_dtypes)} and computes in it; the budget "
                      "reads autocast (torch.autocast), not a policy")
    untracked = [s["untracked_bytes"] for name, s in phases.items()
                 if name != "load" and "untracked_bytes" in s]
    # what the optimizer steps beside the model, as parameters of a module (a plain tensor keeps
    # its requires_grad: a Parameter made of it would require grad)
    Parameter = torch.nn.Parameter
    beside = torch.nn.ParameterList(p if isinstance(p, Parameter) else Parameter(p, p.requires_grad)
                                    for p in stack.outside)
    try:
        return budget(stack.lm, bs=int(seen["bs"]), seq=int(seen["seq"]),
                      checkpointing=stack.checkpointing(), device=stack.device,
                      extra=[stack.model, beside],
                      autocast_dtype=getattr(torch, seen["autocast"]) if seen["autocast"] else None,
                      cuda_workspace_bytes=min(untracked, default=None),
                      input_grads=seen.get("input_grads"), padded=_masked(seen),
                      gradients_held=seen.get("gradients_held", ()),
                      input_leaf=seen.get("input_leaf", False), loss_held=seen.get("loss_held", ()),
                      kv_cache=seen.get("kv_cache", False),
                      optimizer=stack.optimizers or None, **_placement(stack.model),
                      shifted_logits=False), None   # a model's own forward and loss: every position's logits
    except (ValueError, AttributeError, KeyError, IndexError) as e:  # not a decoder the budget can read
        return None, (f"no budget: the budget cannot read {type(stack.lm).__name__} "
                      f"({type(e).__name__}: {first_line(e)})")


def verdict(report):
    """The measured training peak against the budget, in plain words, with the weighty warnings, and
    why the budget is an estimate where its layers could not be traced."""
    planned = report.get("budget") or {}
    method, measured = planned.get("method", ""), report.get("peak_bytes")
    why = method.removeprefix("formula: ")
    estimates = [f"the budget is a per-token estimate: {why}"] if why != method else []
    estimates += dict.fromkeys(planned.get("estimated", []))   # (several optimizers failing alike: once)
    return _verdict(report) + "".join(f"; {e}" for e in estimates if measured)


def _verdict(report):
    """The verdict's words on the peak, the budget and the weighty warnings."""
    planned, named = report.get("budget"), named_warnings(report)
    if not planned or not (report.get("peak_bytes") or report.get("oom")):
        return report.get("no_budget", "no budget to compare with") + named
    if report.get("status", "ok") not in ("ok", "oom") and not report.get("steps"):
        return f"no verdict: the run stopped ({report['status']}) before its first step ended{named}"
    ratio = report["peak_bytes"] / planned["peak_bytes"]
    oom = report.get("oom")
    if oom:   # (the failed allocation is never made: what was live as it failed)
        live, needs = oom.get("live_bytes"), planned["peak_bytes"]
        when = (f"with {mib(live)} MiB live ({live / needs:.2f}x the budget)" if type(live) is int
                else f"after a peak of {mib(report['peak_bytes'])} MiB ({ratio:.2f}x the budget)")
        return f"the budget for this setup is {mib(needs)} MiB; the OOM came in {oom['phase']} {when}{named}"
    if abs(ratio - 1) <= AS_EXPECTED:
        return f"measured peak {ratio:.2f}x the budget: " + (named[2:] or "as expected")
    if ratio < 1:
        below = "the budget overcounts this configuration" if ratio < 1 - BUDGET_TOLERANCE else "within 10%"
        return f"measured peak {ratio:.2f}x the budget: below it, {below}{named}"
    excess = {c: report["categories"].get(c, 0) - planned["categories"].get(c, 0) for c in CATEGORIES}
    worst = max(excess, key=excess.get)
    when = report["peak_phase"] if report["peak_phase"] == BETWEEN_PHASES else f"during {report['peak_phase']}"
    where = (f"the excess is in {worst.replace('_', ' ')} ({signed_mib(excess[worst])}) {when}"
             + (_largest_temporary(report) if worst == "temporaries" else ""))
    if ratio > 1 + BUDGET_TOLERANCE:
        return f"measured peak {ratio:.1f}x the budget: {where}{named}"
    return f"measured peak {ratio:.2f}x the budget, within 10%: {where}{named}"
