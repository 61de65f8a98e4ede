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
import itertools
import math
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import budget
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
PADDING_LOOKAHEAD = 64  # batches read before training to tell whether the budget has a padding mask
CKPT_MODES = ("manual", "hf", "reentrant", "none")
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
MODEL_DIR = "a Hugging Face model directory (config.json and model.safetensors or pytorch_model.bin)"
# --targets auto, per config.model_type: the attention projections PEFT adapts by default, copied
# from peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (PEFT 0.21; peft is
# not imported at run time). phi3 is not in PEFT's table: its fused query/key/value projection.
# Another model type gets q_proj,v_proj when it has them.
DEFAULT_TARGETS = {
    "opt": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"), "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",), "gpt_neox": ("query_key_value",), "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}
# A tokenizer this small cannot be the model's: transformers returns a 0-5 token tokenizer for a
# folder without tokenizer files (Qwen2, Gemma, GPT-NeoX, GPT-2, OPT), while real pairs have at
# least 99% as many tokens as embedding rows (Llama 32000/32000, Qwen2 151643/151936, OPT
# 50265/50272). Below MIN_TOKENS tokens, or 1% of the rows, the stand-in is used instead.
MIN_TOKENS = 64


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
    g.add_argument("--targets", default="auto",
                   help="comma list of linear names; all-linear: every linear layer of the decoder "
                        "layers (GPT-2's Conv1D included); auto: the model type's attention "
                        "projections as PEFT picks them (q_proj,v_proj on OPT, Llama, Mistral, Qwen, "
                        "Gemma; c_attn on GPT-2; query_key_value on GPT-NeoX, Falcon, Bloom; "
                        "qkv_proj on Phi-3; q_proj,v_proj,fc1,fc2 on Phi)")
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
                   help="compute lm_head + loss fused, over N slices of the vocabulary, with the "
                        "gradient taken in forward: the bs x seq x vocab logits never exist at once "
                        "and backward recomputes nothing")
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


def parse_args(argv=None, budget_only=False):
    """The flags, checked. budget_only: the model is only built on the meta device, for a budget, so
    a --model directory needs no weights and --device cuda no CUDA device here."""
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
    if args.device == "cuda" and not torch.cuda.is_available() and not budget_only:
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
        check_model_dir(args.model, need_weights=not budget_only)
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


def check_model_dir(path, need_weights=True):
    """A local --model must hold a config and weights (only a config, to budget it): say which is
    missing before loading anything."""
    directory = os.path.expanduser(path)
    names = sorted(os.listdir(directory))
    if not names:
        raise UsageError(f"--model {path}: an empty directory; expected {MODEL_DIR}")
    if "config.json" not in names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UsageError(f"--model {path}: no config.json (it holds {shown}); expected {MODEL_DIR}")
    if need_weights and not any(name in names for name in WEIGHTS_FILES):
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
                         f"({memcheck.first_line(e)})") from e
    max_positions = getattr(config or OPTConfig(), "max_position_embeddings", None)
    if max_positions is not None and args.seq > max_positions:  # before the weights are read
        raise UsageError(f"--seq {args.seq}: {args.model} holds at most {max_positions} positions")
    notes = []
    for attempt in ("requested", "eager"):
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
            break
        except Exception as e:
            if memcheck.is_out_of_memory(e):  # the weights did not fit: that is the finding, not bad input
                raise
            if attempt == "requested" and args.attn == "sdpa" and _no_sdpa(e):
                # Bloom, Gemma2: fall back as transformers' own default would; the budget reads the
                # model's config, so it follows. args.attn is what ran (the report's config).
                notes.append(f"attention: {type(config).__name__.removesuffix('Config')} does not support "
                             "PyTorch's scaled_dot_product_attention; using eager attention (it stores "
                             "bs x heads x seq^2 scores; the budget counts them)")
                args.attn = "eager"
                continue
            raise _load_error(args, e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) < max(MIN_TOKENS, rows / 100):
        # transformers returns a 0-5 token tokenizer for a folder without tokenizer files: resizing
        # to it would shrink the vocabulary, and the run would measure a different model.
        notes.append(f"tokenizer: the one in {args.model} has {len(tokenizer)} token(s) for "
                     f"{rows} embedding rows, so it cannot be the model's (a folder without tokenizer "
                     "files); using the stand-in BPE trained on the catalogue")
        tokenizer = None
    elif tokenizer is None:
        notes.append(f"tokenizer: none in {args.model}; using the stand-in BPE trained on the catalogue")
    return model, tokenizer, "\n".join([source, *notes])


def _no_sdpa(error):
    message = memcheck.first_line(error)
    return "scaled_dot_product_attention" in message or "sdpa" in message.lower()


def _load_error(args, error):
    """What failed to load the model, as a UsageError naming the file or the flag to change."""
    message = memcheck.first_line(error)  # (no SDPA support is not an error: load_model falls back to eager)
    if isinstance(error, ValueError):  # transformers' word on the config or the architecture
        return UsageError(f"--model {args.model}: cannot load it as a causal language model ({message})")
    # Anything else came from reading the weights: safetensors, torch.load or the file system.
    return UsageError(f"--model {args.model}: cannot read the weights in {_weights_file(args.model)} "
                      f"({message}); is the file truncated, or still downloading?")


def _hf_cache():
    from huggingface_hub.constants import HF_HUB_CACHE
    return HF_HUB_CACHE


def prepare_vocabulary(model, tokenizer, stand_in, mean_resizing=True):
    """Add the placeholder tokens and resize the embeddings, as the real stack does.

    A stand-in tokenizer trained here has a small vocabulary of its own, so the model keeps its size
    and grows by the added tokens, as it would with its real tokenizer (and never has fewer rows
    than the stand-in has tokens).
    """
    added = data.add_special_tokens(tokenizer)
    size = max(model.config.vocab_size + added, len(tokenizer)) if stand_in else len(tokenizer)
    model.resize_token_embeddings(size, mean_resizing=mean_resizing)


def resolve_targets(model, targets, known):
    """--targets with "auto" replaced by the model type's default (DEFAULT_TARGETS)."""
    if "auto" not in targets:
        return tuple(targets)
    model_type = getattr(model.config, "model_type", None)
    default = DEFAULT_TARGETS.get(model_type)
    if default is None and {"q_proj", "v_proj"} <= set(known):
        default = ("q_proj", "v_proj")
    if default is None:
        raise UsageError(f"--targets auto: no default targets for model type {model_type}; name them: "
                         f"the decoder's linear layers are {', '.join(known) or 'none'}, or all-linear")
    return tuple(dict.fromkeys(n for t in targets for n in (default if t == "auto" else (t,))))


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
    args.targets = resolve_targets(model, args.targets, known)  # what ran: the report's config
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
    batches = data.batches(samples, titles, tokenizer, args.bs, args.seq, ids, args.seed)
    return model, batches, max(titles), source


def build(args, meta=False):
    """Everything the loop needs, built in the order the real stack builds it.

    Returns (model, item modules, batches, where the weights came from, adapted layer names).
    meta=True gives the same modules on the meta device, unprepared for training (no
    checkpointing, no train mode): what the budget reads.
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
        return model, items, batches, source, adapted
    if args.ckpt == "manual":
        checkpoint_layers(model)
    elif args.ckpt in ("hf", "reentrant"):
        enable_hf_checkpointing(model, reentrant=args.ckpt == "reentrant")
    model.train()
    items.train()
    return model, items, batches, source, adapted


def first_batches(args, batches):
    """The run's first batches (up to PADDING_LOOKAHEAD): enough to tell whether it pads."""
    return list(itertools.islice(batches, min(args.steps, PADDING_LOOKAHEAD)))


def has_padding(batches):
    """Whether a batch has padding: then SDPA gets a mask instead of is_causal, and every layer
    saves it (a term of the budget)."""
    return any(not b["attention_mask"].numpy().all() for b in batches)


def plan(args, model=None, items=None, full=False, padded=None):
    """memcheck's budget for this run; the modules are built on the meta device when not given.

    padded: whether a batch of the run has padding; when not given, read off its first batches."""
    if model is None:
        model, items, batches, *_ = build(args, meta=True)
        if padded is None:
            padded = has_padding(first_batches(args, batches))
    return budget.budget(model, bs=args.bs, seq=args.seq, checkpointing=args.ckpt != "none",
                         autocast_dtype=dtypes(args)[1], loss_chunks=args.loss_chunks,
                         device=args.device, extra=[items], full=full, padded=bool(padded))


# ---------------------------------------------------------------- the step

def lm_loss(head, hidden, labels, chunks=1):
    """Mean next-token cross-entropy over the labelled positions, optionally in chunks.

    With chunks > 1 the head and the loss run fused over slices of the vocabulary
    (_ChunkedLinearCrossEntropy): each slice's logits are made, used and dropped in forward, so
    only 1/chunks of the bs x seq x vocab logits exists at a time, and backward recomputes nothing.
    """
    n_targets = (labels[:, 1:] != data.IGNORE).sum()
    if chunks > 1:
        return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, n_targets,
                                                chunks, torch.is_grad_enabled())
    return _loss_sum(head, hidden[:, :-1], labels[:, 1:]) / n_targets


def _loss_sum(head, hidden, labels):
    logits = head(hidden).float()  # the loss in fp32, as transformers computes it
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=data.IGNORE,
                           reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The head and the mean cross-entropy fused, with the gradient taken in forward, in chunks.

    Takes the whole hidden states and labels (bs x seq) and shifts them itself. The logits are made
    one slice of the vocabulary at a time, for every position at once: a chunk is 1/chunks of
    them, and the matrix products stay as large as the plain path's (slices of the positions would
    stream the whole head weight through the CPU twice per slice). Each chunk's logits (16-bit
    under autocast, then fp32, as head(hidden).float() would be) are folded into a running
    log-sum-exp and, as in flash attention, into a running softmax-weighted sum of the head's rows,
    rescaled when the running maximum grows; the gradient of the loss sum with respect to the hidden
    states is then that sum over the log-sum-exp's exponent minus the target's row of the head
    (softmax minus one-hot, times the head's weight; zero at ignored labels). What is kept for
    backward is that gradient, bs x seq x hidden in the hidden states' dtype, the last position's
    zero included: backward only scales it by grad_output / n_targets, and the logits are never made
    again. A head that trains (weight or bias) needs the normalised softmax of each chunk, so then
    a first pass finds the log-sum-exp and a second makes every chunk's logits again, keeping the
    head's fp32 gradient too. Nothing is kept when nothing needs a gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, n_targets, chunks, grad_enabled):
        need_h, need_w, need_b = (need and grad_enabled for need in ctx.needs_input_grad[:3])
        kind, f32 = hidden.device.type, torch.float32
        # Under autocast the plain path runs the head in autocast's dtype: cast each slice of the
        # head here, and keep autocast out of the rest, whose dtypes are chosen explicitly.
        compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        two_pass = need_w or need_b
        with torch.autocast(kind, enabled=False):
            bs, seq, width = hidden.shape
            h = hidden[:, :-1].to(compute).reshape(-1, width)
            y = labels[:, 1:].reshape(-1)
            valid = y != data.IGNORE
            slices = [(int(r[0]), int(r[-1]) + 1)
                      for r in torch.arange(weight.shape[0]).tensor_split(chunks) if len(r)]

            def logits(w, start, end):   # w: the head's rows start:end, in the compute dtype
                b = None if bias is None else bias[start:end].to(compute)
                return F.linear(h, w, b).float()

            # Each position's target logit, as the head's product would round it.
            targets = y.clamp(min=0)
            rows = weight[targets].to(compute)
            target = torch.linalg.vecdot(h.float(), rows.float())
            if bias is not None:
                target += bias[targets].to(compute).float()
            target = target.to(compute).float()
            running_max = torch.full((h.shape[0],), -math.inf, dtype=f32, device=h.device)
            sum_exp = torch.zeros_like(running_max)
            weighted = torch.zeros(h.shape, dtype=f32, device=h.device) if need_h else None
            for start, end in slices:
                w = weight[start:end].to(compute)   # cast once per chunk (a copy under autocast)
                z = logits(w, start, end)
                new_max = torch.maximum(running_max, z.amax(dim=1))
                rescale = (running_max - new_max).exp_()[:, None]
                z.sub_(new_max[:, None]).exp_()       # exp(logits - running max), in place
                sum_exp.mul_(rescale[:, 0]).add_(z.sum(dim=1))
                if need_h and not two_pass:
                    weighted.mul_(rescale)
                    if compute == f32:
                        weighted.addmm_(z, w)
                    else:
                        weighted += torch.mm(z.to(compute), w)
                running_max = new_max
                del z, w
            lse = running_max + sum_exp.log()
            total = torch.where(valid, lse - target, 0).sum()
            grad_w = torch.zeros(weight.shape, dtype=f32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=f32, device=bias.device) if need_b else None
            if need_h and not two_pass:
                weighted.div_(sum_exp[:, None])      # the softmax-weighted rows of the head
                weighted.sub_(rows)
            elif two_pass:
                for start, end in slices:            # d(loss sum) / d(logits), chunk by chunk
                    w = weight[start:end].to(compute)
                    p = logits(w, start, end).sub_(lse[:, None]).exp_()
                    inside = valid & (y >= start) & (y < end)
                    p.scatter_add_(1, (y - start).clamp(0, end - start - 1)[:, None], inside[:, None].to(f32).neg())
                    p.masked_fill_(~valid[:, None], 0)
                    if need_b:
                        grad_b[start:end] = p.sum(dim=0)
                    p = p.to(compute)
                    if need_h:
                        weighted.add_(torch.mm(p, w))
                    if need_w:
                        grad_w[start:end] = torch.mm(p.t(), h)
                    del p, w
            grad_h = None
            if need_h:
                weighted.masked_fill_(~valid[:, None], 0)
                grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                grad_h[:, :-1] = weighted.view(bs, seq - 1, width)  # the last position predicts nothing
                del weighted
        ctx.save_for_backward(grad_h, grad_w, grad_b, n_targets)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n_targets

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b, n_targets = ctx.saved_tensors
        scale = grad_output / n_targets
        return (None if grad_h is None else grad_h * scale,
                None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0]),
                None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1]),
                None, None, None, None)


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

SNAPSHOT_ENTRIES = 200_000
# torch.cuda.memory's history settings, richest first: (stacks, context).
SNAPSHOT_SETTINGS = (("all", "all"), ("python", "all"), ("python", None))


def record_allocation_history(log):
    """Start torch.cuda.memory's allocation history with the richest stack traces that work here.

    torch 2.11 fails a checkpointed layer's recompute in backward while it records stack traces
    ("SystemError: <built-in method dropout ...> returned NULL without setting an exception",
    pytorch/pytorch#179536). So each setting first runs a tiny checkpointed layer's backward, under
    a probe as the run will be, and the first that survives it is kept.
    """
    layer = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)).cuda()
    x = torch.ones(2, 8, device="cuda", requires_grad=True)
    for stacks, context in SNAPSHOT_SETTINGS:
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES, stacks=stacks,
                                                 context=context)
        try:
            with memcheck.Probe(device="cuda"):
                checkpoint(layer, x, use_reentrant=False).sum().backward()
        except SystemError:
            torch.cuda.memory._record_memory_history(enabled=None)
            continue
        if (stacks, context) != SNAPSHOT_SETTINGS[0]:
            log(f"snapshot: this torch fails checkpointing while it records "
                f"{'C++ stack traces' if context else 'stack traces'} (pytorch/pytorch#179536); "
                f"recording {'Python stacks only' if context else 'allocations without stack traces'}")
        return True
    log("snapshot: this torch fails checkpointing while it records allocations "
        "(pytorch/pytorch#179536); no snapshot is written")
    return False


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
    recording = bool(args.snapshot) and record_allocation_history(log)
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
            config.update(targets=list(args.targets), attn=args.attn)  # auto and a fallback resolved
            log(source)
            fused = ilora.fused_experts(model) if "all-linear" in args.targets else []
            if fused:
                log(f"not adapted: {len(fused)} {fused[0][1]} modules ({fused[0][0]}, ...) hold their "
                    "experts' weights fused in 3-D tensors, not linear layers; all-linear adapts the "
                    "linear layers only")
            n_trainable, n_frozen = count_params(modules)
            extra["params"] = {"trainable": n_trainable, "frozen": n_frozen, "adapted": len(adapted)}
            # The run's first batches, made now (torch.tensor() from lists is no allocation the
            # tracker sees), tell whether it pads: a term of the budget.
            first = first_batches(args, batches)
            extra["budget"] = plan(args, model, items, padded=has_padding(first))
            batches = itertools.chain(first, batches)
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
        if recording:
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
