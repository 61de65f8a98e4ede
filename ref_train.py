"""The reference trainer: iLoRA on a causal LM in plain PyTorch, with exact memory figures.

    python ref_train.py --bs 2 --seq 128

Trains the gated LoRA (ilora.py) on LLaRA-style prompts (data.py) with AdamW, manual gradient
checkpointing and Lightning's precision names, and measures every phase with memcheck.Probe. Its
peak is what the training should cost; compare your own stack's with `memcheck.py diff`.
Nothing is downloaded: the model comes from a local path or the local Hugging Face cache, and the
default falls back to opt-125m's architecture with seeded random weights (memory does not depend on
weight values).
"""
import argparse
import functools
import math
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import data
import ilora
import memcheck

DEFAULT_MODEL = "facebook/opt-125m"
PRECISIONS = {  # Lightning's names -> (weights' dtype, autocast dtype or None)
    "32": (torch.float32, None),
    "16-mixed": (torch.float32, torch.float16),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "16-true": (torch.float16, None),
    "bf16-true": (torch.bfloat16, None),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_SEQ = 16
CKPT_MODES = ("manual", "hf", "reentrant", "none")
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
MODEL_DIR = "a Hugging Face model directory (config.json and model.safetensors or pytorch_model.bin)"


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message names the value
        raise UsageError(message)


def build_parser():
    p = _Parser(description=__doc__.split("\n\n")[0] + " Figures are MiB (2^20 bytes).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local directory or a name in the local Hugging Face cache; the default "
                        "falls back to its architecture with random weights when not cached")
    g.add_argument("--data", metavar="DIR",
                   help="a MovieLens-100K directory (u.data, u.item); default: synthetic users")
    g.add_argument("--add-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="add the placeholder tokens and call resize_token_embeddings (suspect #1)")
    g.add_argument("--inject-items", action=argparse.BooleanOptionalAction, default=True,
                   help="overwrite the placeholders' embeddings with projected item vectors")
    g.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="attention kernel: eager stores bs x heads x seq^2 scores")
    g = p.add_argument_group("shape of the run")
    g.add_argument("--bs", type=int, default=2, help="batch size")
    g.add_argument("--seq", type=int, default=128, help="tokens per sample (pad or cut to exactly this)")
    g.add_argument("--steps", type=int, default=5, help="optimizer steps (>= 3 to see a leak)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g = p.add_argument_group("gated LoRA")
    g.add_argument("--r", type=int, default=8, help="total LoRA rank, shared by the experts")
    g.add_argument("--alpha", type=float, default=32)
    g.add_argument("--experts", type=int, default=4, help="experts; each has rank r/experts")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (iLoRA uses 0.1)")
    g.add_argument("--targets", default="q_proj,v_proj", help="comma list of linear names, or all-linear")
    g.add_argument("--impl", choices=ilora.IMPLS, default="lean",
                   help="lean: gate the rank slices, apply B once; einsum: iLoRA's per-expert outputs")
    g.add_argument("--lora-dtype", choices=("fp32", "match"), default="fp32",
                   help="fp32 LoRA weights on any model (iLoRA), or the model's dtype")
    g = p.add_argument_group("memory")
    g.add_argument("--ckpt", choices=CKPT_MODES, default="manual",
                   help="gradient checkpointing: per decoder layer in this loop, the model's own "
                        "(hf; reentrant: use_reentrant=True without input grads, as the pinned "
                        "stack ran it), or off")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="32",
                   help="Lightning's precision names; *-mixed keeps fp32 weights under autocast")
    g.add_argument("--weights-dtype", choices=tuple(DTYPES),
                   help="override the weights' dtype (bf16 under 16-mixed is iLoRA's setup)")
    g.add_argument("--loss-chunks", type=int, default=1,
                   help="compute lm_head + loss over N checkpointed slices of the sequence, so the "
                        "bs x seq x vocab logits never exist at once")
    g.add_argument("--max-memory", type=float, metavar="MiB",
                   help="raise out-of-memory when live tensors pass this (tests the OOM path on CPU)")
    g.add_argument("--inject-leak", action="store_true",
                   help="keep every step's gate with its graph in a list, as a careless loop would")
    g = p.add_argument_group("output")
    g.add_argument("--report", metavar="PATH", help="write the memcheck JSON report here")
    g.add_argument("--snapshot", metavar="PATH",
                   help="CUDA only: dump torch.cuda.memory's snapshot for pytorch.org/memory_viz")
    g.add_argument("--markdown", action="store_true", help="also print a block for a GitHub issue")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    checks = [
        (args.bs >= 1, f"--bs {args.bs}: must be 1 or more"),
        (args.seq >= MIN_SEQ, f"--seq {args.seq}: must be {MIN_SEQ} or more"),
        (args.steps >= 1, f"--steps {args.steps}: must be 1 or more"),
        (args.r >= 1, f"--r {args.r}: must be 1 or more"),
        (args.experts >= 1, f"--experts {args.experts}: must be 1 or more"),
        (args.r % max(args.experts, 1) == 0,
         f"--r {args.r}: must be divisible by --experts {args.experts} (each expert owns r/experts rows)"),
        (0 <= args.dropout < 1, f"--dropout {args.dropout}: must be in [0, 1)"),
        (1 <= args.loss_chunks < args.seq,
         f"--loss-chunks {args.loss_chunks}: must be between 1 and seq - 1 = {args.seq - 1}"),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr {args.lr}: must be a positive number"),
        (math.isfinite(args.alpha) and args.alpha > 0, f"--alpha {args.alpha}: must be a positive number"),
        (not (args.inject_leak and args.experts == 1),
         "--inject-leak with --experts 1: one expert needs no gate, so there is no gate to keep; "
         "use --experts 2 or more"),
        (args.max_memory is None or args.max_memory > 0,
         f"--max-memory {args.max_memory}: must be a positive number of MiB"),
        # Reentrant checkpointing runs the layers' forward without a graph unless an input needs a
        # gradient; without the items' projector nothing before the layers is trainable, so the loss
        # would have no gradient at all and backward could not run.
        (not (args.ckpt == "reentrant" and not args.inject_items),
         "--ckpt reentrant with --no-inject-items: no input of the checkpointed layers requires "
         "grad, so the loss has no gradient and no LoRA weight can get one; use --inject-items "
         "or --ckpt hf"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build sees no CUDA device; use --device cpu or auto")
    if (args.precision == "16-mixed" and args.lora_dtype == "match"
            and DTYPES.get(args.weights_dtype) == torch.float16):
        raise UsageError("--lora-dtype match with fp16 weights under --precision 16-mixed: the "
                         "gradient scaler cannot unscale fp16 gradients; use --lora-dtype fp32")
    for flag, path in (("--report", args.report), ("--snapshot", args.snapshot)):
        check_output_path(flag, path)
    if args.snapshot and args.device != "cuda":
        raise UsageError(f"--snapshot {args.snapshot}: needs --device cuda (the snapshot is the CUDA "
                         "allocator's history)")
    looks_like_path = args.model.startswith((".", os.sep, "~")) or os.path.exists(args.model)
    if looks_like_path and not os.path.isdir(os.path.expanduser(args.model)):
        raise UsageError(f"--model {args.model}: no such directory")
    if looks_like_path:
        check_model_dir(args.model)
    if args.data is not None and not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data}: no such directory (expected MovieLens-100K's u.data, u.item)")
    args.targets = tuple(t for t in args.targets.split(",") if t)
    return args


def check_output_path(flag, path):
    """Fail now, not after the run, on a file that cannot be written."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {path}: the directory {directory} does not exist")
    # Creating a file is the only test that holds everywhere: os.access says yes to root in a
    # read-only mount, and /proc takes no new files whatever its mode bits say. A report is
    # written the same way (a temporary file beside it, then renamed).
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ref_train-check-")
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create a file in {directory} ({e.strerror}); "
                         "give a path in a writable directory")
    os.close(fd)
    os.remove(probe)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file exists and is not writable")


def check_model_dir(path):
    """A local --model must hold a config and weights: say which is missing before loading anything."""
    directory = os.path.expanduser(path)
    names = sorted(os.listdir(directory))
    if not names:
        raise UsageError(f"--model {path}: an empty directory; expected {MODEL_DIR}")
    if "config.json" not in names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UsageError(f"--model {path}: no config.json (it holds {shown}); expected {MODEL_DIR}")
    if not any(name in names for name in WEIGHTS_FILES):
        raise UsageError(f"--model {path}: config.json but no weights ({' or '.join(WEIGHTS_FILES[::2])})")


def _weights_file(path):
    """The weights file a local model directory loads from, for error messages."""
    for name in WEIGHTS_FILES:
        if os.path.exists(os.path.join(os.path.expanduser(path), name)):
            return os.path.join(path, name)
    return path


def dtypes(args):
    """(weights' dtype, autocast dtype or None) for the precision and the override."""
    weights, autocast = PRECISIONS[args.precision]
    return DTYPES.get(args.weights_dtype, weights), autocast


# ---------------------------------------------------------------- model, tokenizer, data

def load_model(args, weights_dtype, meta=False):
    """(model, tokenizer or None, a line saying where the weights came from). Never downloads.

    meta=True builds the same architecture on the meta device: shapes only, no memory, for the budget.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, OPTConfig
    from transformers.utils import logging

    logging.set_verbosity_error()  # keep the output to the figures; errors still show
    logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    except OSError as e:
        if args.model != DEFAULT_MODEL:
            raise UsageError(f"--model {args.model}: not a local model directory and not in the local "
                             f"Hugging Face cache ({_hf_cache()}); nothing is downloaded") from e
        config = None
    except ValueError as e:  # a config.json without model_type, or of an unknown one
        raise UsageError(f"--model {args.model}: its config.json is not a model's config "
                         f"({_first_line(e)})") from e
    max_positions = getattr(config or OPTConfig(), "max_position_embeddings", None)
    if max_positions is not None and args.seq > max_positions:  # before the weights are read
        raise UsageError(f"--seq {args.seq}: {args.model} holds at most {max_positions} positions")
    try:
        if config is None or meta:
            config = config or OPTConfig()  # OPTConfig()'s defaults are exactly opt-125m's
            config._attn_implementation = args.attn
            torch.manual_seed(args.seed)
            with torch.device("meta" if meta else "cpu"):
                model = AutoModelForCausalLM.from_config(config).to(weights_dtype)
            source = (f"model: {DEFAULT_MODEL} is not in the local cache ({_hf_cache()}); using its "
                      "architecture from OPTConfig() with seeded random weights (memory does not "
                      "depend on weight values)")
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                         dtype=weights_dtype, attn_implementation=args.attn)
            source = f"model: {args.model} from local files"
    except Exception as e:
        if memcheck.is_out_of_memory(e):  # the weights did not fit: that is the finding, not bad input
            raise
        raise _load_error(args, e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer.vocab_size == 0:
        tokenizer = None  # transformers returns an empty tokenizer for a folder without one
    return model, tokenizer, source


def _load_error(args, error):
    """What failed to load the model, as a UsageError naming the file or the flag to change."""
    message = _first_line(error)
    if "scaled_dot_product_attention" in message or "sdpa" in message.lower():
        return UsageError(f"--attn {args.attn}: {args.model} does not support PyTorch's "
                          "scaled_dot_product_attention; use --attn eager")
    if isinstance(error, ValueError):  # transformers' word on the config or the architecture
        return UsageError(f"--model {args.model}: cannot load it as a causal language model ({message})")
    # Anything else came from reading the weights: safetensors, torch.load or the file system.
    return UsageError(f"--model {args.model}: cannot read the weights in {_weights_file(args.model)} "
                      f"({message}); is the file truncated, or still downloading?")


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _hf_cache():
    from huggingface_hub.constants import HF_HUB_CACHE
    return HF_HUB_CACHE


def prepare_vocabulary(model, tokenizer, stand_in, mean_resizing=True):
    """Add the placeholder tokens and resize the embeddings, as the real stack does.

    A stand-in tokenizer trained here has a small vocabulary of its own, so the model keeps its size
    and grows by the added tokens, as it would with its real tokenizer.
    """
    added = data.add_special_tokens(tokenizer)
    model.resize_token_embeddings(model.config.vocab_size + added if stand_in else len(tokenizer),
                                  mean_resizing=mean_resizing)


def decoder_layers(model):
    layers = memcheck.decoder_layers(model)
    if layers is None:
        raise UsageError(f"--model {model.name_or_path}: no list of "
                         f"{model.config.num_hidden_layers} decoder layers found")
    return layers


def checkpoint_layers(model):
    """Manual gradient checkpointing: each decoder layer keeps only its inputs for backward.

    The gate goes through torch.utils.checkpoint as an input, so the recomputation in backward runs
    under the same gate even though the use_gate() scope of the forward pass has closed.
    """
    for layer in decoder_layers(model):
        layer.forward = functools.partial(_checkpointed, layer.forward)


def enable_hf_checkpointing(model, reentrant=False):
    """The model's own gradient checkpointing, under either of transformers' names.

    reentrant=True reproduces the pinned stack: use_reentrant=True and no hook that makes the
    embeddings' output require grad. Transformers 5 adds that hook itself when checkpointing is
    enabled; the real stack's pinned transformers and PEFT did not, so it is removed again. Then a
    checkpointed layer whose inputs do not require grad gives its LoRA no gradient (unless the
    injected item embeddings bring one in), which memcheck's no_grad warning names.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.disable_input_require_grads()


def _checkpointed(forward, *args, **kwargs):
    def run(gate, *args):
        with ilora.use_gate(gate):
            return forward(*args, **kwargs)
    return checkpoint(run, ilora.current_gate(), *args, use_reentrant=False)


def build_base(args, meta=False):
    """The model with its vocabulary prepared, the tokenizer and the catalogue; no adapters yet."""
    weights_dtype, _ = dtypes(args)
    model, tokenizer, source = load_model(args, weights_dtype, meta)  # checks --seq against the config
    known = ilora.linear_names(model)
    unknown = [t for t in args.targets if t != "all-linear" and t not in known]
    if unknown or not args.targets:
        raise UsageError(f"--targets {','.join(args.targets) or '(empty)'}: unknown "
                         f"{', '.join(unknown) or 'list'}; the decoder's linear layers are "
                         f"{', '.join(known)}, or all-linear")
    titles, samples = (data.movielens_catalogue(args.data, args.seed) if args.data
                       else data.synthetic_catalogue(args.seed))
    stand_in = tokenizer is None
    if stand_in:
        tokenizer = data.train_tokenizer(titles)
    if args.add_tokens:
        # The real stack resizes with transformers' default, mean_resizing, and so do we; the new
        # rows are drawn at random, so seed first: a run must not depend on what ran before it.
        torch.manual_seed(args.seed)
        prepare_vocabulary(model, tokenizer, stand_in, mean_resizing=not meta)
    model.to("meta" if meta else args.device)
    ids = data.placeholder_ids(tokenizer, args.add_tokens)
    batches = None if meta else data.batches(samples, titles, tokenizer, args.bs, args.seq, ids, args.seed)
    return model, batches, max(titles), source


def build(args, meta=False):
    """Everything the loop needs, built in the order the real stack builds it.

    Returns (model, item modules, batches, where the weights came from, adapted layer names).
    meta=True gives the same modules on the meta device and no batches: what the budget reads.
    """
    weights_dtype, _ = dtypes(args)
    device = torch.device("meta" if meta else args.device)
    model, batches, n_items, source = build_base(args, meta)
    lora_dtype = torch.float32 if args.lora_dtype == "fp32" else None
    torch.manual_seed(args.seed)
    adapted = ilora.add_gated_lora(model, args.targets, args.r, args.alpha, args.experts,
                                   args.dropout, args.impl, lora_dtype)
    with torch.device(device):
        items = ilora.ItemModules(n_items, model.get_input_embeddings().embedding_dim, args.experts,
                                  args.inject_items)
    items.to(dtype=lora_dtype or weights_dtype)
    if meta:
        return model, items, None, source, adapted
    if args.ckpt == "manual":
        checkpoint_layers(model)
    elif args.ckpt in ("hf", "reentrant"):
        enable_hf_checkpointing(model, reentrant=args.ckpt == "reentrant")
    model.train()
    items.train()
    return model, items, batches, source, adapted


def plan(args, model=None, items=None, full=False):
    """memcheck's budget for this run; the modules are built on the meta device when not given."""
    if model is None:
        model, items, *_ = build(args, meta=True)
    return memcheck.budget(model, bs=args.bs, seq=args.seq, checkpointing=args.ckpt != "none",
                           autocast_dtype=dtypes(args)[1], loss_chunks=args.loss_chunks,
                           device=args.device, extra=[items], full=full)


# ---------------------------------------------------------------- the step

def lm_loss(head, hidden, labels, chunks=1):
    """Mean next-token cross-entropy over the labelled positions, optionally in sequence chunks.

    With chunks > 1 each slice's logits are made, used and dropped inside a checkpoint, and made
    again in backward: only one slice of bs x seq x vocab logits exists at a time.
    """
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    n_targets = (labels != data.IGNORE).sum()
    if chunks == 1:
        return _loss_sum(head, hidden, labels) / n_targets
    total = sum(checkpoint(_loss_sum, head, h, y, use_reentrant=False)
                for h, y in zip(hidden.tensor_split(chunks, dim=1), labels.tensor_split(chunks, dim=1)))
    return total / n_targets


def _loss_sum(head, hidden, labels):
    logits = head(hidden).float()  # the loss in fp32, as transformers computes it
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=data.IGNORE,
                           reduction="sum")


def forward_loss(model, items, batch, args):
    embeds = model.get_input_embeddings()(batch["input_ids"])
    if args.inject_items:
        embeds = items.inject(embeds, batch["item_ids"])
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    return lm_loss(model.get_output_embeddings(), hidden, batch["labels"], args.loss_chunks)


def train_step(model, items, optimizer, scaler, batch, args, probe, leaked):
    """One optimizer step, each phase measured. Returns the loss as a float, for logging only."""
    _, autocast_dtype = dtypes(args)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    with probe.phase("forward"), torch.autocast(args.device, autocast_dtype,
                                                enabled=autocast_dtype is not None):
        gate = items.gate(batch["history"], batch["history_len"])
        with ilora.use_gate(gate):
            loss = forward_loss(model, items, batch, args)
    if args.inject_leak and gate is not None:
        leaked.append(gate)  # the careless pattern: a list that outlives the step
    # The model's own checkpointing (--ckpt hf, reentrant) recomputes layers in backward and finds
    # the gate through the scope, so backward runs inside it too. Reentrant checkpointing recomputes
    # each layer inside a backward of its own, which would free the router's graph at the first
    # layer and fail at the second: the layers get a leaf copy of the gate, and its gradient goes
    # through the router once, after the layers'.
    inner = gate.detach().requires_grad_() if args.ckpt == "reentrant" and gate is not None else gate
    with probe.phase("backward"), ilora.use_gate(inner):
        scaler.scale(loss).backward()
        if inner is not gate and inner.grad is not None:
            gate.backward(inner.grad)
    with probe.phase("optimizer"):
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ---------------------------------------------------------------- the run

def count_params(*modules):
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) - trainable


def train(args, log=print):
    """Train and measure; returns the report dict (also written to --report, even on OOM)."""
    weights, autocast = dtypes(args)
    if args.device == "cpu" and autocast is not None and weights not in (torch.float32, autocast):
        # (the budget of this combination works anywhere; only running it needs a GPU)
        raise UsageError(f"--weights-dtype {args.weights_dtype} with --precision {args.precision}: CPU "
                         "autocast leaves layer_norm's weights in the weights' dtype and cannot mix "
                         "them with its activations; run this combination with --device cuda")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    probe = memcheck.Probe(device=args.device, max_memory_mib=args.max_memory, config=config)
    if args.snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    extra = {}
    leaked = []
    failure = None
    try:
        with probe:
            with probe.phase("load"):
                model, items, batches, source, adapted = build(args)
                trainable = [p for m in (model, items) for p in m.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(trainable, lr=args.lr)
                scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "16-mixed")
                modules = nn.ModuleDict({"lm": model, "ilora": items})
                probe.attach(modules, optimizer)
            log(source)
            n_trainable, n_frozen = count_params(modules)
            extra["params"] = {"trainable": n_trainable, "frozen": n_frozen, "adapted": len(adapted)}
            extra["budget"] = plan(args, model, items)
            log(f"adapted {len(adapted)} linear layers ({', '.join(args.targets)}), "
                f"r={args.r}, experts={args.experts}, impl={args.impl}, ckpt={args.ckpt}, "
                f"precision={args.precision}, weights={dtypes(args)[0]}, device={args.device}")
            torch.manual_seed(args.seed)
            for _ in range(args.steps):
                loss = train_step(model, items, optimizer, scaler, next(batches), args, probe, leaked)
                s = probe.step(loss)
                log(f"step {s['step']:>3} | loss {s['loss']:.4f} | {s['seconds'] * 1e3:7.0f} ms | "
                    f"live {memcheck.mib(s['live_bytes']):>7} MiB | peak {memcheck.mib(s['peak_bytes']):>7} MiB")
    except BaseException as e:  # the probe has recorded how the run ended (oom, error, interrupted)
        failure = e
        raise
    finally:
        if args.snapshot and torch.cuda.is_available():
            torch.cuda.memory._dump_snapshot(args.snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        report = dict(probe.report(), **extra)
        if args.report:
            memcheck.write_report(args.report, report)
        if failure is not None:
            failure.report = report  # for main(), which says where the run stopped
            # The figures so far, for a run that ended while measuring; bad input has none to show.
            if not isinstance(failure, (UsageError, data.DataError)):
                log(memcheck.format_report(report))
                if probe.oom:
                    log(f"report written to {args.report}" if args.report else "(no --report given)")
    return report


def main(argv=None):
    prog = os.path.basename(sys.argv[0])
    try:
        args = parse_args(argv)
        report = train(args, log=functools.partial(print, flush=True))  # live through a pipe or tee
    except (UsageError, data.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        report = getattr(e, "report", None)  # none when Ctrl-C came before training started
        where = ("" if report is None else f" at step {len(report['steps']) + 1}"
                 if "forward" in report["phases"] else " while loading")
        saved = f"report written to {args.report}" if report and args.report else "no report written"
        print(f"{prog}: interrupted{where}; {saved}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except Exception as e:
        if memcheck.is_out_of_memory(e):  # CUDA's, or a CPU allocation that failed; already reported
            return 1
        raise
    print(memcheck.format_report(report))
    if args.markdown:
        print("\n" + memcheck.markdown_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
