"""The reference trainer: iLoRA on a causal LM in plain PyTorch, with exact memory figures.

    python ref_train.py --bs 2 --seq 128

Trains the gated LoRA (ilora.py) on LLaRA-style prompts (data.py) with AdamW, manual gradient
checkpointing and Lightning's precision names, and measures every phase with memcheck.Probe. Its
peak is what the training should cost; compare your own stack's with `memcheck.py diff`.
Nothing is downloaded: the model comes from a local path or the local Hugging Face cache, and the
default falls back to opt-125m's architecture with seeded random weights (memory does not depend on
weight values). Beside it: flags.py, models.py, fused_loss.py (--loss-chunks), distributed.py.
"""
import contextlib
import functools
import itertools
import os
import sys

import flags
from flags import UsageError, parse_args

if __name__ == "__main__":  # answer --help and bad values before torch loads (seconds when busy)
    flags.exit_on_help_or_bad_flags(sys.argv[1:])

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import budget
import data
import distributed
import fused_loss
import ilora
import memcheck
import models

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PADDING_LOOKAHEAD = 64  # batches read before training to tell whether the budget has a padding mask


def dtypes(args):
    """(weights' dtype, autocast dtype or None) for the precision and the override."""
    weights, autocast = flags.PRECISIONS[args.precision]
    return DTYPES[args.weights_dtype or weights], DTYPES.get(autocast)


# ---------------------------------------------------------------- model, adapters, data

def _checkpointed(forward, *args, **kwargs):
    def run(gate, *args):
        with ilora.use_gate(gate):
            return forward(*args, **kwargs)
    return checkpoint(run, ilora.current_gate(), *args, use_reentrant=False)


def checkpoint_layers(model, every=1):
    """Manual gradient checkpointing: each decoder layer (every `every`-th from the first, as
    transformers' every_n_layers) keeps only its inputs for backward. The gate is one of them: the
    recomputation in backward runs under it, after the forward's use_gate() scope has closed."""
    for layer in models.decoder_layers(model)[::every]:
        layer.forward = functools.partial(_checkpointed, layer.forward)


def enable_hf_checkpointing(model, reentrant=False):
    """The model's own gradient checkpointing, under either of transformers' names. reentrant=True
    is older transformers and PEFT: use_reentrant=True, without the hook that makes the embeddings'
    output require grad (transformers 5's): a checkpointed layer whose inputs need no gradient gives
    its LoRA none (unless the injected items bring one), as memcheck's no_grad warning says."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.disable_input_require_grads()


def build_base(args, meta=False):
    """(model with its vocabulary prepared, batches, items in the catalogue, setup): no adapters yet.

    setup holds what the flags left open and this run resolved: where the weights came from, the
    targets ("auto" replaced), the attention kernel (eager where SDPA is not) and the vocabulary."""
    model, tokenizer, source = models.load_model(args, dtypes(args)[0], meta)
    known = ilora.linear_names(model)
    targets = models.resolve_targets(model, args.targets, known)
    unknown = [t for t in targets if t != "all-linear" and t not in known]
    if unknown or not targets:
        raise UsageError(f"--targets {','.join(targets) or '(empty)'}: unknown "
                         f"{', '.join(unknown) or 'list'}; the decoder's linear layers are "
                         f"{', '.join(known)}, or all-linear")
    titles, samples = (data.movielens_catalogue(args.data, args.seed) if args.data
                       else data.synthetic_catalogue(args.seed))
    stand_in = tokenizer is None
    if stand_in:
        tokenizer = data.train_tokenizer(titles, args.vocab, args.add_tokens)
    # (resizing draws the new rows at random, as the real stack's mean_resizing does: seed first)
    torch.manual_seed(args.seed)
    resized = models.prepare_vocabulary(model, tokenizer, stand_in, args.add_tokens, not meta, args.vocab)
    vocab = model.get_output_embeddings().weight.shape[0]
    if args.loss_chunks > vocab:
        raise UsageError(f"--loss-chunks {args.loss_chunks}: at most the vocabulary's {vocab} rows")
    model.to("meta" if meta else args.device)
    ids = data.placeholder_ids(tokenizer, args.add_tokens)
    batches = distributed.rank_rows(data.batches(samples, titles, tokenizer, args.bs * args.world_size,
                                                 args.seq, ids, args.seed), args)  # the global batch
    setup = {"source": f"{source}\n{resized}", "targets": targets, "attn": model.config._attn_implementation,
             "vocab": vocab}
    return model, batches, max(titles), setup


def build(args, meta=False):
    """(model, item modules, batches, setup), built in the order the real stack builds them.

    setup: build_base's, plus the names of the adapted layers. meta=True gives the same modules on
    the meta device, unprepared for training (no checkpointing, no train mode): what the budget reads.
    """
    model, batches, n_items, setup = build_base(args, meta)
    lora_dtype = torch.float32 if args.lora_dtype == "fp32" else None
    torch.manual_seed(args.seed)
    setup["adapted"] = ilora.add_gated_lora(model, setup["targets"], args.r, args.alpha, args.experts,
                                            args.dropout, args.impl, lora_dtype)
    with torch.device("meta" if meta else args.device):
        items = ilora.ItemModules(n_items, model.get_input_embeddings().embedding_dim, args.experts,
                                  args.inject_items)
    items.to(dtype=lora_dtype or dtypes(args)[0])
    if meta:
        return model, items, batches, setup
    if args.ckpt == "manual":
        checkpoint_layers(model, args.ckpt_every)
    elif args.ckpt in ("hf", "reentrant"):
        enable_hf_checkpointing(model, reentrant=args.ckpt == "reentrant")
    model.train()
    items.train()
    return model, items, batches, setup


def first_batches(args, batches):
    """The run's first batches (up to PADDING_LOOKAHEAD): enough to tell whether it pads."""
    return list(itertools.islice(batches, min(args.steps, PADDING_LOOKAHEAD)))


def has_padding(batches):
    """Whether a batch has padding: then SDPA gets a mask instead of is_causal, and every layer
    saves it (a term of the budget)."""
    return any(not b["attention_mask"].numpy().all() for b in batches)


def plan(args, model=None, items=None, full=False, padded=None):
    """The budget (budget.py) for this run, of modules built on meta unless given; `padded` (whether
    a batch has padding) read off the run's first batches, when not given."""
    if model is None or args.strategy == "fsdp":  # FSDP2 runs a sharded layer only from its root
        model, items, batches, _ = build(args, meta=True)
        if padded is None:
            padded = has_padding(first_batches(args, batches))
    leaf = args.ckpt == "hf" and ("apart" if args.inject_items else True)  # transformers makes one
    return budget.budget(model, bs=args.bs, seq=args.seq, autocast_dtype=dtypes(args)[1], input_leaf=leaf,
                         checkpointing=args.ckpt != "none" and args.ckpt_every, loss_chunks=args.loss_chunks,
                         device=args.device, extra=[items], full=full, padded=bool(padded),
                         input_grads=args.inject_items or None, loss_held=("optimizer",),
                         **distributed.placement(args))


# ---------------------------------------------------------------- the step

def target_count(labels):
    return (labels[:, 1:] != data.IGNORE).sum()


def lm_loss(head, hidden, labels, chunks=1, n_targets=None):
    """Next-token cross-entropy summed over the labelled positions, divided by n_targets (default:
    their count, the mean); fused with the head in chunks of the vocabulary when chunks > 1: the
    bs x seq x vocab logits never exist at once."""
    n_targets = target_count(labels) if n_targets is None else n_targets
    if chunks > 1:
        return fused_loss.chunked_lm_loss(head, hidden, labels, n_targets, chunks, data.IGNORE)
    logits = head(hidden[:, :-1]).float()  # the loss in fp32, as transformers computes it
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=data.IGNORE,
                           reduction="sum") / n_targets


def forward_loss(model, items, batch, args, n_targets=None):
    embeds = model.get_input_embeddings()(batch["input_ids"])
    if args.inject_items:
        embeds = items.inject(embeds, batch["item_ids"])
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    del embeds  # the decoder is done with them: not held through the loss, the forward's peak
    return lm_loss(model.get_output_embeddings(), hidden, batch["labels"], args.loss_chunks, n_targets)


class ILoraModel(nn.Module):
    """The language model and iLoRA's item modules as one module whose forward gives the loss: what
    DDP and FSDP2 wrap. Its children keep the names the reports give them (lm, ilora)."""

    def __init__(self, model, items, args):
        super().__init__()
        self.lm, self.ilora, self.args = model, items, args

    def forward(self, batch, n_targets=None):
        """(loss, gate): the loss of batch's rows divided by n_targets (default: their own count)."""
        gate = self.ilora.gate(batch["history"], batch["history_len"])
        with ilora.use_gate(gate):
            return forward_loss(self.lm, self.ilora, batch, self.args, n_targets), gate


def train_step(trained, optimizer, scaler, batch, args, probe, leaked):
    """One optimizer step of `trained` (an ILoraModel, or DDP / FSDP2 around one), each phase
    measured. Returns the global batch's loss as a float, for logging only."""
    _, autocast_dtype = dtypes(args)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    world = distributed.world_size(args)
    with probe.phase("forward"), torch.autocast(args.device, autocast_dtype,
                                                enabled=autocast_dtype is not None):
        # Each rank's loss is its rows' share of the global batch's mean (divided by the target
        # count of all ranks), so that the losses of the ranks add up to the global batch's.
        n_targets = distributed.global_sum(target_count(batch["labels"]), args) if world > 1 else None
        loss, gate = trained(batch, n_targets)
    if args.inject_leak and gate is not None:
        leaked.append(gate)  # the careless pattern: a list that outlives the step
    # The model's own checkpointing (--ckpt hf, reentrant) recomputes layers in backward and finds
    # the gate through the scope, so backward runs inside it too. Reentrant checkpointing recomputes
    # each layer in a backward of its own, which would free the router's graph at the first layer:
    # the layers get a leaf copy of the gate, whose gradient goes through the router once, after.
    inner = gate.detach().requires_grad_() if args.ckpt == "reentrant" and gate is not None else gate
    with probe.phase("backward"), ilora.use_gate(inner):
        # DDP and FSDP2 average the ranks' gradients: scaled by the world size, that is the sum's
        scaler.scale(loss * world if world > 1 else loss).backward()
        if inner is not gate and inner.grad is not None:
            gate.backward(inner.grad)
    with probe.phase("optimizer"):
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return distributed.global_sum(loss.detach(), args).item()


# ---------------------------------------------------------------- the run

SNAPSHOT_ENTRIES = 200_000
# torch.cuda.memory's history settings, richest first: (stacks, context).
SNAPSHOT_SETTINGS = (("all", "all"), ("python", "all"), ("python", None))


def record_allocation_history(log):
    """Start torch.cuda.memory's allocation history with the richest stack traces that work here:
    torch 2.11 fails a checkpointed layer's recompute while it records stack traces ("SystemError:
    <built-in method dropout ...> returned NULL", pytorch/pytorch#179536), so each setting first runs
    a tiny checkpointed layer's backward under a probe, as the run will, and the first that survives
    it is kept."""
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


def check_runnable(args):
    weights, autocast = dtypes(args)
    if args.device == "cpu" and autocast is not None and weights not in (torch.float32, autocast):
        # (the budget of this combination works anywhere; only running it needs a GPU)
        raise UsageError(f"--weights-dtype {args.weights_dtype} with --precision {args.precision}: CPU "
                         "autocast leaves layer_norm's weights in the weights' dtype and cannot mix "
                         "them with its activations; run this combination with --device cuda")


def describe(args, model, modules, setup, log):
    """Say what runs, and return the report's fields that the probe does not measure."""
    log(setup["source"])
    fused = ilora.fused_experts(model) if "all-linear" in setup["targets"] else []
    if fused:
        log(f"not adapted: {len(fused)} {fused[0][1]} modules ({fused[0][0]}, ...) hold their "
            "experts' weights fused in 3-D tensors, not linear layers; all-linear adapts the "
            "linear layers only")
    log(f"adapted {len(setup['adapted'])} linear layers ({', '.join(setup['targets'])}), "
        f"r={args.r}, experts={args.experts}, impl={args.impl}, ckpt={flags.ckpt_label(args)}, "
        f"precision={args.precision}, weights={dtypes(args)[0]}, device={args.device}")
    trainable, frozen = count_params(modules)
    dtype = str(dtypes(args)[0]).removeprefix("torch.")
    return {"params": dict(trainable=trainable, frozen=frozen, adapted=len(setup["adapted"]), dtype=dtype)}


def train(args, log=print):
    """Train and measure; returns the report dict (also written to --report, even on OOM)."""
    check_runnable(args)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    probe = memcheck.Probe(device=args.device, max_memory_mib=args.max_memory, config=config)
    recording = bool(args.snapshot) and record_allocation_history(log)
    extra, leaked, failure = {}, [], None
    try:
        with probe:
            with probe.phase("load"):
                model, items, batches, setup = build(args)
                modules = ILoraModel(model, items, args)
                trained = distributed.wrap(modules, args)
                trainable = [p for p in modules.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(trainable, lr=args.lr)
                scaler = distributed.grad_scaler(args)
                probe.attach(modules, optimizer)
            extra.update(describe(args, model, modules, setup, log))
            # The run's first batches, made now (torch.tensor() from lists is no allocation the
            # tracker sees), tell whether it pads: a term of the budget.
            first = first_batches(args, batches)
            config.update(targets=list(setup["targets"]), attn=setup["attn"], vocab_rows=setup["vocab"],
                          padded=has_padding(first))
            extra["budget"] = plan(args, model, items, padded=config["padded"])
            batches = itertools.chain(first, batches)
            torch.manual_seed(args.seed)
            for _ in range(args.steps):
                loss = train_step(trained, optimizer, scaler, next(batches), args, probe, leaked)
                s = probe.step(loss)
                log(f"step {s['step']:>3} | loss {s['loss']:.4f} | {s['seconds'] * 1e3:7.0f} ms | "
                    f"live {memcheck.mib(s['live_bytes']):>7} MiB | peak {memcheck.mib(s['peak_bytes']):>7} MiB")
    except BaseException as e:  # the probe has recorded how the run ended (oom, error, interrupted)
        failure = e
        raise
    finally:
        report = finish(args, probe, extra, recording, failure, log)
    return report


def shown(report, args):
    """The report as printed: in words, a row per rank, and with --markdown a block for an issue."""
    ranks = ["", distributed.rank_table(report)] if "ranks" in report else []
    markdown = ["", memcheck.markdown_report(report, more=ranks)] if args.markdown else []
    return "\n".join([memcheck.format_report(report), *ranks, *markdown])


def finish(args, probe, extra, recording, failure, log):
    """Write the report (and the snapshot) however the run ended; say where a failed run stopped."""
    if recording:
        torch.cuda.memory._dump_snapshot(distributed.rank_path(args.snapshot, args))
        torch.cuda.memory._record_memory_history(enabled=None)
    if probe.oom and "budget" not in extra:   # out of memory while loading: budgeted on meta
        with contextlib.suppress(Exception):   # (not in place of the OOM: the report still comes)
            extra["budget"] = plan(args)
    report = dict(probe.report(), **extra)
    report = distributed.gather_reports(report, args, failed=failure is not None)
    path = distributed.report_path(args, failure)
    if path:
        memcheck.write_report(path, report)
    if failure is not None:
        failure.report, failure.report_path = report, path  # for main(), which says where the run stopped
        # The figures so far, for a run that ended while measuring; bad input has none to show.
        if not isinstance(failure, (UsageError, data.DataError)):
            log(shown(report, args))
            if probe.oom:
                log(f"report written to {path}" if path else "(no --report given)")
            distributed.say_how_a_rank_ended(report, path, args)
    return report


def main(argv=None):
    prog = os.path.basename(sys.argv[0])
    try:
        args = parse_args(argv)
        with distributed.process_group(args) as rank:  # rank 0 speaks for all
            log = flags.printer() if rank == 0 else lambda *_: None
            report = train(args, log=log)
    except (UsageError, data.DataError) as e:
        flags.print_error(prog, e)
        return 2
    except KeyboardInterrupt as e:
        report = getattr(e, "report", None)  # none when Ctrl-C came before training started
        where = ("" if report is None else f" at step {len(report['steps']) + 1}"
                 if "forward" in report["phases"] else " while loading")
        saved = f"report written to {e.report_path}" if getattr(e, "report_path", None) else "no report written"
        flags.tell(f"{prog}: interrupted{where}; {saved}")
        return 128 + getattr(e, "signum", 2)  # as a shell reports it: 130 for Ctrl-C (SIGINT 2)
    except Exception as e:
        if memcheck.is_out_of_memory(e):  # CUDA's, or a CPU allocation that failed; already reported
            return 1
        raise
    log(shown(report, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
