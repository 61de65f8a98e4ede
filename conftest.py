"""Shared fixtures: tiny OPT models on disk, so that every training test runs in well under a second,
the model families' tiny models, and the helpers several test files use.

Nothing here downloads: HF_HUB_OFFLINE is set before transformers is imported anywhere.
"""
import contextlib
import gc
import os
import random
import shutil
import signal
import socket
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

# One thread: the tiny models gain nothing from more, and on a shared 2-core machine OpenMP's
# waiting threads made every op about 10x slower.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _survivors_frozen():
    """After each test, what is still alive stays out of every later collection: the HF Trainer calls
    gc.collect() as it starts, and over the whole heap of a long session that took a second a call."""
    yield
    gc.collect()
    gc.freeze()


# The longest tests, started first: one started last would run on alone while the other core idles.
LONGEST = ("test_readme.py::", "test_ref.py::test_full_size_smoke_run",
           "test_stacks.py::test_lightning_ddp_and_fsdp_and_the_hf_trainer_under_torchrun")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST))   # (stable: the rest keep their order)


@pytest.fixture
def default_stop_signals():
    """SIGTERM and SIGHUP at their default action, as a shell leaves them (nohup ignores SIGHUP, and
    the probe then leaves it ignored)."""
    stops = [s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGHUP")) if s is not None]
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in stops}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


# The same shape as opt-125m's decoder, scaled down: 2 layers of width 64, 256 positions.
TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64)


def _save_tiny_opt(directory, vocab_size, with_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    import data

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=vocab_size, **TINY_OPT)).save_pretrained(directory)
    if with_tokenizer:
        # The stand-in BPE saved as the model's own tokenizer: ref_train loads it like a real one.
        titles, _ = data.synthetic_catalogue(0)
        data.train_tokenizer(titles).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny OPT with its tokenizer (556 tokens): the vocabulary shrinks to 560 when loaded.

    With its own tokenizer no build spends a second training the stand-in, and the model only
    shrinks, so no embedding row is drawn at random: the tests that compare builds compare only
    what they mean to. The stand-in and the growing vocabulary have fixtures of their own.
    """
    return _save_tiny_opt(tmp_path_factory.mktemp("tiny-opt"), 4200, with_tokenizer=True)


@pytest.fixture(scope="session")
def bare_tiny_model(tmp_path_factory):
    """A tiny OPT with no tokenizer files: ref_train should fall back to the stand-in BPE."""
    return _save_tiny_opt(tmp_path_factory.mktemp("bare-tiny-opt"), 4200, with_tokenizer=False)


@pytest.fixture(scope="session")
def growing_vocab_model(tmp_path_factory):
    """A tiny OPT whose 500-token vocabulary grows to 560 when the tokenizer's tokens are added.

    Growing is what happens to LLaMA (32000 + the placeholders) in the real stack: the new rows are
    initialised at random, which is where run-to-run differences can come from.
    """
    return _save_tiny_opt(tmp_path_factory.mktemp("growing-opt"), 500, with_tokenizer=True)


# The model families of drive.FAMILIES run at this shape: activations are most of the peak, so
# that an error in them shows.
STEPS, BS, SEQ = 2, 4, 128


@pytest.fixture(scope="session")
def hub_cache_with_tiny_opt(tiny_model, tmp_path_factory):
    """A Hugging Face cache whose facebook/opt-125m is the tiny OPT: the default --model, and the
    README's commands exactly as written, load it (nothing is downloaded) and train in seconds."""
    revision = "0" * 40
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--facebook--opt-125m"
    shutil.copytree(tiny_model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return str(cache)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """model_type -> a directory with the tiny model's config and weights, no tokenizer files."""
    from transformers.utils import logging

    import drive

    logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("families")
    return {family: drive.save_family(family, root / family) for family in drive.FAMILIES}


@pytest.fixture(scope="session")
def train_tiny(tiny_model):
    """train_tiny(*flags, model=tiny_model) -> ref_train's report dict, quietly, in this process."""
    import ref_train

    def run(*flags, model=tiny_model):
        args = ref_train.parse_args(["--model", model, "--device", "cpu", *map(str, flags)])
        return ref_train.train(args, log=lambda *a: None)

    return run


# The timeout of every process a test starts: only against a process that hangs, never a measure of
# speed, so that a machine whose cores are all busy still passes.
HANG_SECONDS = 900


def run_ref_train(*flags, timeout=HANG_SECONDS):
    """`python ref_train.py FLAGS` as a user runs it, offline, from the repository root: only where
    the process itself is the point (its exit code as a shell sees it, several processes)."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # see set_num_threads above
    return subprocess.run([sys.executable, os.path.join(ROOT, "ref_train.py"), *map(str, flags)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_main(main, capsys, *argv):
    """main(argv) of a script in this process, with what run_ref_train gives of a process: the
    return code (argparse's SystemExit, as for --help, included), stdout and stderr."""
    import subprocess

    capsys.readouterr()   # what earlier code printed is not this command's
    argv = [str(a) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def help_text(main, capsys, *argv):
    """What `--help` (in argv) of a script's main prints, after checking it exits 0 and says nothing
    on stderr."""
    done = run_main(main, capsys, *argv)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def one_error_line(done, code=2):
    """The run's only stderr line, after checking the exit code and that no traceback came out."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    return lines[0]


# ---------------------------------------------------------------- processes as torchrun starts them

def _worker_ports(ports_per_worker=1500, first=20000):
    """Ports free when taken, below the kernel's ephemeral range (the local ports that the connections
    of tests running beside this one take at any moment), each pytest worker in a share of its own."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    start = first + ports_per_worker * worker
    for port in range(start + random.Random().randrange(ports_per_worker // 2), start + ports_per_worker):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        yield port


_free_ports = _worker_ports()


def free_port():
    return next(_free_ports)


def on_ranks(runs, world=2):
    """Each (function, args) of `runs` in turn on `world` processes, each started as torchrun starts a
    rank (its environment; gloo on CPU): several runs for one start-up of the processes. Forked: the
    ranks import nothing again (torch, transformers, Lightning: seconds each on a busy machine)."""
    import torch.multiprocessing as mp
    mp.start_processes(_rank_runs, args=(world, [free_port() for _ in runs], runs), nprocs=world,
                       start_method="fork")


def _rank_runs(rank, world, ports, runs):
    import torch.distributed as dist
    for port, (function, args) in zip(ports, runs):
        if dist.is_initialized():  # left by Lightning or the HF Trainer: each run joins its own group
            dist.destroy_process_group()
        # (again for each run: Lightning's teardown deletes WORLD_SIZE)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        function(*args)


# ---------------------------------------------------------------- helpers of several test files

def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_markdown_tables(text):
    """Every table in `text`: a header row, a separator row, rows with the same number of cells."""
    blocks = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    tables = [b for b in blocks if b]
    assert tables, text
    for table in tables:
        assert all(line.endswith("|") for line in table), table
        cells = [line.count("|") for line in table]
        assert len(set(cells)) == 1, table
        assert set(table[1].replace("|", "")) <= {"-", ":", " "}, table[1]


def peft_opt(ckpt=None, input_grads=True, vocab=500, dropout=0.0):
    """A tiny OPT with PEFT's LoRA on q and v, built as a user's stack builds it.

    ckpt: None, "reentrant" or "non-reentrant": the model's own gradient checkpointing.
    input_grads=False undoes the enable_input_require_grads() that transformers 5 calls when
    checkpointing is enabled: the frozen embeddings' output then does not require grad, as in the
    transformers and PEFT versions the real stack pinned. dropout: the adapters' (PEFT's lora_dropout).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=vocab, **TINY_OPT))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=["q_proj", "v_proj"]))
    if ckpt:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"})
    if ckpt and not input_grads:
        model.disable_input_require_grads()
    # Trained beside the adapters, as iLoRA trains its projector: the loss always has a gradient.
    model.get_base_model().model.decoder.final_layer_norm.requires_grad_(True)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def step_temporary(kind, params, steps=8, **options):
    """The most bytes an optimizer of class `kind` makes beyond its state in a step over `params`
    (each given a gradient), of its first `steps`: measured."""
    import memcheck
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = kind(params, **options)
    optimizer.step()   # its state
    with memcheck.Tracker("cpu") as tracker:
        for _ in range(steps - 1):
            optimizer.step()
    return tracker.peak_bytes


def token_batches(n, bs=2, seq=32, vocab=500):
    """Batches made up front, before any probe starts: a preloaded list."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (bs, seq), generator=generator) for _ in range(n)]


def lightning_fit(model, callback, steps=3, return_logits=False, module_hooks=None, validate=False,
                  strategy="auto", devices=1, user_callbacks=(), compiled=False, **trainer_kwargs):
    """Lightning's fit() of a LightningModule holding the model as self.llm. return_logits:
    training_step returns the logits beside the loss (Lightning holds them until the step ends);
    module_hooks: methods added to the LightningModule; validate: a validation batch after every
    training step, with grad allowed and no sanity check ("defaults": Lightning's, inference mode
    and a sanity check before training); strategy and devices: Lightning's (several devices: one
    rank of on_ranks each); user_callbacks: listed before `callback`; compiled: fit() is given the
    LightningModule torch.compile'd; trainer_kwargs: the Trainer's,
    beside or instead of these (steps is max_steps, and the batches of the loaders). Returns the
    trainer and the LightningModule it fitted."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.llm = model

        def training_step(self, batch, batch_idx):
            output = self.llm(input_ids=batch, labels=batch)
            return {"loss": output.loss, "logits": output.logits} if return_logits else output.loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    for name, method in (module_hooks or {}).items():
        setattr(Module, name, method)
    validation = dict(val_check_interval=1, limit_val_batches=1) if validate else {}
    if validate is True:
        validation.update(num_sanity_val_steps=0, inference_mode=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*user_callbacks, callback],
                         **{"max_steps": steps, **validation, **trainer_kwargs})
    loader = lambda: torch.utils.data.DataLoader(token_batches(steps), batch_size=None)
    module = torch.compile(Module()) if compiled else Module()
    trainer.fit(module, loader(), loader() if validate else None)
    return trainer, module


def hf_train(model, callbacks, tmp_path, steps=3, evaluate=False, rows=None, added=False, trainer=None,
             **training):
    """transformers' Trainer.train() with `callbacks` (added by add_callback() if `added`); evaluate:
    an evaluation after every step, of that many rows if a number (else 2); rows: the training rows,
    if not token_batches'; trainer: a subclass of the Trainer to run; training: TrainingArguments
    beside the defaults."""
    from transformers import Trainer, TrainingArguments
    evaluation = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2) if evaluate else {}
    args = TrainingArguments(**dict(dict(output_dir=str(tmp_path / "hf"), max_steps=steps,
                                         per_device_train_batch_size=2, report_to=[], save_strategy="no",
                                         logging_strategy="no", use_cpu=True, disable_tqdm=True),
                                    **evaluation, **training))
    rows = rows or [{"input_ids": r, "labels": r} for batch in token_batches(steps) for r in batch]
    evaluated = rows[:2 if evaluate is True else evaluate] if evaluate else None
    trainer = (trainer or Trainer)(model=model, args=args, callbacks=[] if added else callbacks,
                                   train_dataset=rows, eval_dataset=evaluated)
    for callback in callbacks if added else []:
        trainer.add_callback(callback)
    try:
        trainer.train()
    finally:  # a callback leaves the trainer as it found it
        assert "training_step" not in vars(trainer) and "step" not in vars(trainer.optimizer)


def _micro_batches(probe, model, optimizer, ids, summed):
    """One step over the rows of `ids` as micro-batches: each one's backward before the next forward,
    or (summed) their losses added up before one backward, as a careless accumulation does."""
    losses = []
    for rows in ids.split(1):
        with probe.phase("forward"):
            losses.append(model(input_ids=rows, labels=rows).loss / len(ids))
        if not summed:
            with probe.phase("backward"):
                losses.pop().backward()
    if summed:
        with probe.phase("backward"):
            sum(losses).backward()
    with probe.phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad()


class OptimizersAsOne:
    """Several optimizers stepped as one by phased_loop (a GAN's, one per part of the model)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self):
        for optimizer in self.optimizers:
            optimizer.zero_grad()


def phased_loop(probe, optimizer, batches, loss_of):
    """A user's loop, each phase under the probe; its forward is loss_of(batch)."""
    for batch in batches:
        with probe.phase("forward"):
            loss = loss_of(batch)
        with probe.phase("backward"):
            loss.backward()
        with probe.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        probe.step(loss)


def user_loop(probe, model, optimizer, batches, pattern="clean", autocast_dtype=None):
    """A user's loop, clean or with one careless pattern, under a Probe or the bare tracker; its
    forward under CPU autocast when autocast_dtype is given."""
    kept = []
    for ids in batches:
        if pattern.endswith("micro_batches"):
            _micro_batches(probe, model, optimizer, ids, summed=pattern == "summed_micro_batches")
            probe.step()
            continue
        evaluating = pattern.startswith("eval")
        cast = torch.autocast("cpu", autocast_dtype, enabled=autocast_dtype is not None)
        with probe.phase("forward"), cast, (torch.no_grad() if pattern == "eval_under_no_grad"
                                            else contextlib.nullcontext()):
            output = model(input_ids=ids, labels=ids)
            loss = output.loss
            if pattern != "output_kept":
                del output   # the logits are not kept
        if not evaluating:
            with probe.phase("backward"):
                loss.backward(retain_graph=pattern == "retain_graph")
            with probe.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad()
        if pattern in ("outputs_in_a_list", "losses_in_a_list"):
            kept.append(loss if pattern == "outputs_in_a_list" else loss.detach())
        output = None
        probe.step()
    kept.clear()  # Lightning's classic training_step_outputs, cleared at the epoch's end
