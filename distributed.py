"""ref_train.py under torchrun: the process group, DDP or FSDP2 around the trained module, each rank's
rows of the global batch, the sums over ranks the loss needs, and the ranks' reports gathered on rank 0.

With --strategy none every function here is the single process's identity (rank 0 of 1), and no
collective runs.
"""
import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist

import memcheck
import models


def is_distributed(args):
    return args.strategy != "none"


def rank(args):
    """This process's rank; 0 for a budget of many processes made in one (no process group)."""
    return dist.get_rank() if is_distributed(args) and dist.is_initialized() else 0


def world_size(args):
    """torchrun's WORLD_SIZE, or drive.py budget's --world-size (flags.parse_args)."""
    return args.world_size


def rank_path(path, args):
    """This rank's file of `path`: rank 0's is `path`, another's has .rankN before the extension."""
    return memcheck.rank_paths(path, world_size(args))[rank(args)] if path and is_distributed(args) else path


def report_path(args, failure):
    """Where this rank writes --report: rank 0 the gathered report; after a failure, when other
    ranks may be gone, every rank its own (PATH.rankN beside rank 0's)."""
    return rank_path(args.report, args) if failure is not None or rank(args) == 0 else None


def say_how_a_rank_ended(report, path, args):
    """A rank but 0, silent until now, says in one line on stderr how its failed run ended (main()
    says an interruption itself, on every rank)."""
    if rank(args) == 0 or report["status"] == "interrupted":
        return
    oom, where = report["oom"], f"report written to {path}" if path else "no --report given"
    ended = (f"OUT OF MEMORY in {memcheck.oom_when(oom)}" if oom
             else f"run {report['status'].upper()}")
    print(f"[rank {rank(args)}] {ended}: {report['error']}; {where}", file=sys.stderr)


def placement(args):
    """Where this process is, as budget.budget takes it: its strategy, world size and rank."""
    return {"strategy": args.strategy, "world_size": world_size(args), "rank": rank(args)}


@contextlib.contextmanager
def process_group(args):
    """Join torchrun's process group for the run (gloo on CPU; NCCL on CUDA, one device per rank,
    LOCAL_RANK's); yields this rank."""
    if not is_distributed(args):
        yield 0
        return
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" means this device from now on
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def wrap(module, args):
    """The module the loop trains (an ILoraModel): DDP around it, or FSDP2 sharding each decoder
    layer, then the root. FSDP2 replaces the parameters, so the optimizer is made after this."""
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [torch.cuda.current_device()] if args.device == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    if args.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        # OPT's layer returns .view() of its residual sum; the next layer only reads it (no in-place
        # op drops FSDP2's hook), and FSDP2's weights match DDP's (test_distributed.py)
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for layer in models.decoder_layers(module.lm):
            fully_shard(layer)
        return fully_shard(module)
    return module


def grad_scaler(args):
    """16-mixed's gradient scaler. Under FSDP2 each rank sees only its shards of the gradients: the
    sharded scaler all-reduces the infs it finds, so that every rank skips or steps alike."""
    enabled = args.precision == "16-mixed"
    if args.strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(args.device, enabled=enabled)
    return torch.amp.GradScaler(args.device, enabled=enabled)


def rank_rows(batches, args):
    """This rank's rows of each global batch (read at bs x world size): rank r gets rows
    r*bs .. (r+1)*bs, so N ranks at --bs b see what one process sees at --bs b*N. A budget of N
    ranks made in one process (no process group) reads them all: any rank's padding counts."""
    if not is_distributed(args) or not dist.is_initialized():  # a budget of many ranks: all their rows
        return batches
    start = rank(args) * args.bs
    return ({k: v[start:start + args.bs] for k, v in batch.items()} for batch in batches)  # views


def global_sum(tensor, args):
    """`tensor` summed over the ranks (in place); a single process's as it is."""
    if is_distributed(args):
        dist.all_reduce(tensor)
    return tensor


def gather_reports(report, args, failed=False):
    """Rank 0: the heaviest rank's report (its `rank` says which), with `ranks`, every rank's report;
    of a failed run, when other ranks may be gone, its own naming theirs (diff reads them beside it).
    Other ranks: their own. Each rank's report says its rank and the world size."""
    if not is_distributed(args):
        return report
    if failed:
        if rank(args) != 0 or not args.report:
            return report
        paths = memcheck.rank_paths(args.report, world_size(args))
        return dict(report, rank_reports=memcheck.rank_reports(paths, 0))
    report = dict(report, rank=rank(args), world_size=world_size(args))
    reports = [None] * world_size(args) if rank(args) == 0 else None
    dist.gather_object(report, reports, dst=0)
    return memcheck.with_ranks({"ranks": reports}, path=None) if rank(args) == 0 else report


def rank_table(report):
    """One row per rank: its peak, the phase of the peak, its budget and the verdict."""
    rows = [(r["rank"], memcheck.mib(r["peak_bytes"]), r["peak_phase"] or "-",
             memcheck.mib(r["budget"]["peak_bytes"]) if r.get("budget") else "-", memcheck.verdict(r))
            for r in report["ranks"]]
    return memcheck.text_table(("rank", "peak MiB", "peak phase", "budget MiB", "verdict"), rows)
