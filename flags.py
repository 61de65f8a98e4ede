"""ref_train.py's flags, parsed and checked once. argparse only, so --help never waits for torch."""
import argparse
import contextlib
import errno
import os
import shlex
import sys
import tempfile

DEFAULT_MODEL = "facebook/opt-125m"
# Lightning's precision names -> (weights' dtype, autocast dtype or None)
PRECISIONS = {"32": ("fp32", None), "16-mixed": ("fp32", "fp16"), "bf16-mixed": ("fp32", "bf16"),
              "16-true": ("fp16", None), "bf16-true": ("bf16", None)}
DTYPE_NAMES = ("fp32", "fp16", "bf16")
TRUE_PRECISION = {"fp32": "32", "fp16": "16-true", "bf16": "bf16-true"}  # weights in it, no autocast
IMPLS = ("lean", "einsum")  # ilora.IMPLS (a test checks they agree); ilora imports torch
CKPT_MODES = ("manual", "hf", "reentrant", "none")
STRATEGIES = ("none", "ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in each process it starts
MIN_SEQ = 16
MAX_MEMORY_MIB = 2 ** 43  # 2**63 bytes (memcheck's too): beyond any device
# A step's global batch is built in host memory (the budget builds every rank's, to see whether any
# row pads): about 3 GB at 2**24 tokens.
MAX_TOKENS = 2 ** 24
FLOAT32_MAX = 3.4028234663852886e38   # --alpha reaches the weights as float32
MAX_LR = 3.4e37   # AdamW's first step is 10x the rate (1 / (1 - beta1)), in float32
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
MODEL_DIR = "a Hugging Face model directory (config.json and model.safetensors or pytorch_model.bin)"
DESCRIPTION = """\
The reference trainer: iLoRA on a causal LM in plain PyTorch, with exact memory figures.

Trains the gated LoRA (ilora.py) with AdamW on recommendation prompts and measures every phase
(load, forward, backward, optimizer) with memcheck. Its peak is what the training should cost:
paste its output as the baseline of a bug report, and compare your own stack's report with
`python memcheck.py diff`. Figures are MiB (2^20 bytes). Nothing is downloaded: the model comes
from a local directory or the local Hugging Face cache; opt-125m falls back to its architecture
with seeded random weights (memory does not depend on weight values)."""
EXAMPLES = """\
examples:
  python ref_train.py --bs 2 --seq 128                      the baseline of the OOM report
  python ref_train.py --ckpt none --report a.json           what checkpointing saves
  python ref_train.py --precision 16-mixed --weights-dtype bf16 --device cuda   iLoRA's precision
  python ref_train.py --inject-leak --steps 5               what a leak looks like
  torchrun --nproc_per_node 2 ref_train.py --strategy fsdp --bs 1   two processes, FSDP2"""


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


# A renamed flag -> its name now: the baseline commands in older reports still say the old one.
RENAMED = {"--r": "--lora-r (torchrun reads --r as a prefix of its own flags)"}


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):  # no abbreviations: a flag renamed must not turn into another one
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        for arg in map(str, sys.argv[1:] if args is None else args):
            renamed = RENAMED.get(arg.split("=")[0])
            if renamed:
                raise UsageError(f"{arg}: renamed {renamed}")
        return super().parse_known_args(args, namespace)

    def error(self, message):  # one line, no usage block: the message names the value
        raise UsageError(message)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" only where there is one
        hidden = action.default is None or action.default is False
        return action.help if hidden else super()._get_help_string(action)


def _model_and_data(p):
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local directory or a name in the local Hugging Face cache; the default "
                        "falls back to its architecture with random weights when not cached")
    g.add_argument("--data", metavar="DIR",
                   help="a MovieLens-100K directory (u.data, u.item); without it, synthetic users")
    g.add_argument("--add-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="add the placeholder tokens and call resize_token_embeddings to hold them "
                        "(suspect #1; --vocab sets the rows instead)")
    g.add_argument("--vocab", type=int, metavar="ROWS",
                   help="resize the embeddings to ROWS rows (a probed stack's, which its baseline "
                        "command gives); default: what the tokens need (the tokenizer's size; with the "
                        "stand-in tokenizer, the model's rows plus the placeholders; none resized "
                        "with --no-add-tokens)")
    g.add_argument("--inject-items", action=argparse.BooleanOptionalAction, default=True,
                   help="overwrite the placeholders' embeddings with projected item vectors")
    g.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="attention kernel: eager stores bs x heads x seq^2 scores")


def _shape(p):
    g = p.add_argument_group("shape of the run")
    g.add_argument("--bs", type=int, default=2, help="batch size (per rank under --strategy)")
    g.add_argument("--seq", type=int, default=128,
                   help=f"tokens per sample, {MIN_SEQ} or more (pad or cut to exactly this)")
    g.add_argument("--steps", type=int, default=5, help="optimizer steps (>= 3 to see a leak)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the adapters")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW's learning rate")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when torch sees a GPU")
    g.add_argument("--strategy", choices=STRATEGIES, default="none",
                   help="under torchrun: DistributedDataParallel, or FSDP2 (each decoder layer "
                        "sharded, then the rest); --bs is per rank")


def _lora(p):
    g = p.add_argument_group("gated LoRA")
    g.add_argument("--lora-r", dest="r", type=int, default=8,
                   help="total LoRA rank, shared by the experts (PEFT's r, iLoRA's lora_r)")
    g.add_argument("--alpha", type=float, default=32, help="scaling = alpha / (r / experts)")
    g.add_argument("--experts", type=int, default=4, help="experts; each has rank r/experts")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (iLoRA uses 0.1)")
    g.add_argument("--targets", default="auto",
                   help="comma list of linear names; all-linear: every linear layer of the decoder "
                        "layers (GPT-2's Conv1D included); auto: the model type's attention "
                        "projections as PEFT picks them (q_proj,v_proj on OPT, Llama, Mistral, Qwen, "
                        "Gemma; c_attn on GPT-2; query_key_value on GPT-NeoX, Falcon, Bloom; "
                        "qkv_proj on Phi-3; q_proj,v_proj,fc1,fc2 on Phi)")
    g.add_argument("--impl", choices=IMPLS, default="lean",
                   help="lean: gate the rank slices, apply B once; einsum: iLoRA's per-expert outputs")
    g.add_argument("--lora-dtype", choices=("fp32", "match"), default="fp32",
                   help="fp32 LoRA weights on any model (iLoRA), or the model's dtype")


def _memory(p):
    g = p.add_argument_group("memory")
    g.add_argument("--ckpt", choices=CKPT_MODES, default="manual",
                   help="gradient checkpointing: per decoder layer in this loop, the model's own "
                        "(hf; reentrant: use_reentrant=True without input grads, as older "
                        "transformers and PEFT ran it), or off")
    g.add_argument("--ckpt-every", type=int, default=1, metavar="N",
                   help="checkpoint only every N-th decoder layer, from the first, as transformers' "
                        "every_n_layers does: the others keep what they save (--ckpt manual)")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="32",
                   help="Lightning's precision names; *-mixed keeps fp32 weights under autocast")
    g.add_argument("--weights-dtype", choices=DTYPE_NAMES,
                   help="the weights' dtype under a *-mixed precision (bf16 under 16-mixed is "
                        "iLoRA's setup); 32 and *-true name their own")
    g.add_argument("--loss-chunks", type=int, default=1, metavar="N",
                   help="compute lm_head + loss fused, over N slices of the vocabulary, with the "
                        "gradient taken in forward: the bs x seq x vocab logits never exist at once "
                        "and backward recomputes nothing")
    g.add_argument("--max-memory", type=float, metavar="MiB",
                   help="raise out-of-memory when live tensors pass this (tests the OOM path on CPU)")
    g.add_argument("--inject-leak", action="store_true",
                   help="keep every step's gate with its graph in a list, as a careless loop would")


def _output(p):
    g = p.add_argument_group("output")
    g.add_argument("--report", metavar="PATH", help="write the memcheck JSON report here")
    g.add_argument("--snapshot", metavar="PATH",
                   help="CUDA only: dump torch.cuda.memory's snapshot for pytorch.org/memory_viz")
    g.add_argument("--markdown", action="store_true", help="also print a block for a GitHub issue")


def _processes(p):
    g = p.add_argument_group("many processes (the budget only; under torchrun, its environment's)")
    g.add_argument("--world-size", type=int, default=1,
                   help="processes of --strategy, one per GPU: the budget is each rank's")


def build_parser(budget_only=False):
    """ref_train.py's flags; budget_only adds the budget's own (--world-size)."""
    p = _Parser(prog="ref_train.py", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=_Help)
    for group in (_model_and_data, _shape, _lora, _memory, _output) + ((_processes,) if budget_only else ()):
        group(p)
    return p


def _world_size_checks(args, argv, budget_only):
    """The world size's checks: the budget's flag, or torchrun's environment."""
    if budget_only:
        return [(args.world_size >= 1, f"--world-size {args.world_size}: must be 1 or more"),
                (args.world_size * args.bs * args.seq <= MAX_TOKENS or args.bs * args.seq > MAX_TOKENS,
                 f"--world-size {args.world_size} with --bs {args.bs} --seq {args.seq}: "
                 f"{args.world_size * args.bs * args.seq:,} tokens a step in all; at most {MAX_TOKENS:,} "
                 "(the budget builds every rank's batch to see whether any row pads)"),
                (args.strategy != "none" or args.world_size == 1,
                 f"--world-size {args.world_size} with --strategy none: one process; use --strategy "
                 "ddp or fsdp")]
    world = os.environ.get("WORLD_SIZE", "1")
    return [(args.strategy == "none" or all(v in os.environ for v in TORCHRUN_ENV),
             f"--strategy {args.strategy}: needs torchrun's environment ({', '.join(TORCHRUN_ENV)} are "
             f"unset); run: torchrun --nproc_per_node N ref_train.py {shlex.join(argv)}"),
            (args.strategy != "none" or world == "1",
             f"--strategy none under torchrun (WORLD_SIZE={world}): every rank would train the same rows "
             "alone and write the same report; pass --strategy ddp or fsdp")]


def _value_checks(args, argv, budget_only=False):
    """(holds, the one-line error when it does not) for each flag's value; argv for the messages."""
    own_weights = PRECISIONS[args.precision][0]
    return _world_size_checks(args, argv, budget_only) + [
        (args.bs >= 1, f"--bs {args.bs}: must be 1 or more"),
        (args.seq >= MIN_SEQ, f"--seq {args.seq}: must be {MIN_SEQ} or more"),
        (args.bs * args.seq <= MAX_TOKENS,
         f"--bs {args.bs} with --seq {args.seq}: {args.bs * args.seq:,} tokens a step; at most {MAX_TOKENS:,} "
         "(2**24: the batch is built in host memory, about 3 GB at that)"),
        (args.steps >= 1, f"--steps {args.steps}: must be 1 or more"),
        (args.r >= 1, f"--lora-r {args.r}: must be 1 or more"),
        (args.experts >= 1, f"--experts {args.experts}: must be 1 or more"),
        (args.r % max(args.experts, 1) == 0,
         f"--lora-r {args.r}: must be divisible by --experts {args.experts} (each expert owns r/experts rows)"),
        (0 <= args.dropout < 1, f"--dropout {args.dropout}: must be in [0, 1)"),
        (args.ckpt_every >= 1, f"--ckpt-every {args.ckpt_every}: must be 1 or more (every N-th layer)"),
        (args.ckpt_every == 1 or args.ckpt == "manual",
         f"--ckpt-every {args.ckpt_every} with --ckpt {args.ckpt}: only this loop's own checkpointing "
         "(--ckpt manual) picks its layers"),
        (args.loss_chunks >= 1,
         f"--loss-chunks {args.loss_chunks}: must be 1 or more (slices of the vocabulary)"),
        (args.vocab is None or args.vocab >= 1, f"--vocab {args.vocab}: must be 1 or more rows"),
        (-2 ** 63 <= args.seed < 2 ** 64,
         f"--seed {args.seed}: must be between -2**63 and 2**64 - 1 (torch.manual_seed's range)"),
        (0 < args.lr <= MAX_LR,
         f"--lr {args.lr}: must be a positive number, at most 3.4e37 (AdamW's first step, 10x it, "
         "in float32)"),
        (0 < args.alpha <= FLOAT32_MAX,
         f"--alpha {args.alpha}: must be a positive number a float32 holds (<= 3.4e38)"),
        (not (args.inject_leak and args.experts == 1),
         "--inject-leak with --experts 1: one expert needs no gate, so there is no gate to keep; "
         "use --experts 2 or more"),
        (args.max_memory is None or 0 < args.max_memory <= MAX_MEMORY_MIB,
         f"--max-memory {args.max_memory}: must be a positive number of MiB, at most 2**43"),
        # Reentrant checkpointing runs the layers' forward without a graph unless an input needs a
        # gradient; without the items' projector nothing before the layers is trainable.
        (not (args.ckpt == "reentrant" and not args.inject_items),
         "--ckpt reentrant with --no-inject-items: no input of the checkpointed layers requires "
         "grad, so the loss has no gradient and no LoRA weight can get one; use --inject-items "
         "or --ckpt hf"),
        (not (args.precision == "16-mixed" and args.lora_dtype == "match" and args.weights_dtype == "fp16"),
         "--lora-dtype match with fp16 weights under --precision 16-mixed: the gradient scaler "
         "cannot unscale fp16 gradients; use --lora-dtype fp32"),
        (not (args.strategy != "none" and args.ckpt == "reentrant"),
         f"--ckpt reentrant with --strategy {args.strategy}: its second backward (the router's) "
         "comes after the gradients are reduced; use --ckpt manual or hf"),
        (args.weights_dtype in (None, own_weights) or args.precision.endswith("-mixed"),
         f"--weights-dtype {args.weights_dtype} with --precision {args.precision}: that precision trains "
         f"{own_weights} weights; use --precision {TRUE_PRECISION.get(args.weights_dtype)} for "
         f"{args.weights_dtype} weights, or a *-mixed one to keep them under autocast"),
        (args.model != "", "--model '': an empty name; give a model directory or a name in the local cache"),
        (args.data != "", "--data '': an empty path; give a MovieLens-100K directory (u.data, u.item)"),
        (args.data in (None, "") or os.path.isdir(args.data),
         f"--data {args.data}: " + ("a file, not a directory" if os.path.isfile(args.data or "")
                                    else "no such directory") + " (expected MovieLens-100K's u.data, u.item)"),
    ]


def check_output_path(flag, path):
    """Fail now, not after the run, on a file that cannot be written."""
    if path is None:
        return
    if not path:
        raise UsageError(f"{flag} '': an empty path; give a file name")
    directory = os.path.dirname(os.path.realpath(path))   # a link's: the report is written there
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: not a regular file (a device or a pipe); give a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {path}: " + (f"{directory} is a file, not a directory" if
                                                os.path.exists(directory) else
                                                f"the directory {directory} does not exist"))
    # Creating a file is the only test that holds everywhere: os.access says yes to root in a
    # read-only mount, and /proc takes no new files whatever its mode bits say.
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
    """A local --model must hold a config.json (with no weights, the run uses random ones): say what
    is missing before loading anything."""
    looks_like_path = path.startswith((".", os.sep, "~")) or os.path.exists(path)
    if not looks_like_path:
        return  # a name in the local Hugging Face cache, looked up when the model loads
    directory = os.path.expanduser(path)
    if not os.path.isdir(directory):
        raise UsageError(f"--model {path}: " + ("a file, not a directory; expected " + MODEL_DIR
                                               if os.path.isfile(directory) else "no such directory"))
    names = sorted(os.listdir(directory))
    if not names:
        raise UsageError(f"--model {path}: an empty directory; expected {MODEL_DIR}")
    if "config.json" not in names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UsageError(f"--model {path}: no config.json (it holds {shown}); expected {MODEL_DIR}")


def _resolve_device(args, budget_only):
    if args.device == "cuda" and budget_only:
        return
    import torch  # after parsing: --help and bad values have answered already
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build sees no CUDA device; use --device cpu or auto")
    if args.snapshot and args.device != "cuda":
        raise UsageError(f"--snapshot {args.snapshot}: needs --device cuda (the snapshot is the CUDA "
                         "allocator's history)")


def parse_args(argv=None, budget_only=False):
    """The flags, checked; the returned namespace is only read from then on.

    budget_only: the model is only built on the meta device, for a budget, so --device cuda needs
    no CUDA device here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(budget_only).parse_args(argv)
    for holds, message in _value_checks(args, argv, budget_only):
        if not holds:
            raise UsageError(message)
    if not budget_only:  # under torchrun, its environment's
        args.world_size = int(os.environ["WORLD_SIZE"]) if args.strategy != "none" else 1
    for flag, path in (("--report", args.report), ("--snapshot", args.snapshot)):
        check_output_path(flag, path)
    if args.model.startswith("~"):  # a quoted ~ the shell left alone
        args.model = os.path.expanduser(args.model)
    check_model_dir(args.model)
    args.targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    _resolve_device(args, budget_only)
    return args


def ckpt_label(args):
    """--ckpt as the run's summary line says it: manual, or manual/2 for every 2nd layer."""
    return args.ckpt + (f"/{args.ckpt_every}" if args.ckpt_every > 1 else "")


def print_error(prog, error):
    """The one-line error, printed once: under torchrun by rank 0 (every rank exits 2)."""
    if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
        print(f"{prog}: error: {error}", file=sys.stderr)


def printer():
    """print, flushed (live through a pipe or tee); once the reader has closed the pipe (`| head`),
    the rest goes to /dev/null: the run and its report go on."""
    def say(*values):
        try:
            print(*values, flush=True)
        except OSError as e:   # quietly for a closed pipe or a terminal gone (EIO); else said once
            if not isinstance(e, BrokenPipeError) and e.errno != errno.EIO:
                tell(f"ref_train.py: stdout: {e.strerror}; the rest of the output is dropped (a --report "
                     "keeps the figures)")
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return say


def tell(line):
    """A line on stderr, unless the terminal is gone (a hangup): the report holds what it says."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


def exit_on_help_or_bad_flags(argv, prog="ref_train.py"):
    """Answer --help, or a bad value in one line with exit code 2, before the caller imports torch."""
    try:
        args = build_parser().parse_args(argv)  # --help prints and exits here
        for holds, message in _value_checks(args, argv):
            if not holds:
                raise UsageError(message)
    except UsageError as e:
        print_error(prog, e)
        sys.exit(2)
