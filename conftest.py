"""Shared fixtures: tiny OPT models on disk, so that every training test runs in well under a second.

Nothing here downloads: HF_HUB_OFFLINE is set before transformers is imported anywhere.
"""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

# One thread: the tiny models gain nothing from more, and on a shared 2-core machine (the commands of
# test_ref.py run three at a time) OpenMP's waiting threads made every op about 10x slower.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.abspath(__file__))
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


@pytest.fixture(scope="session")
def train_tiny(tiny_model):
    """train_tiny(*flags, model=tiny_model) -> ref_train's report dict, quietly, in this process."""
    import ref_train

    def run(*flags, model=tiny_model):
        args = ref_train.parse_args(["--model", model, "--device", "cpu", *map(str, flags)])
        return ref_train.train(args, log=lambda *a: None)

    return run


def run_script(script, *flags, timeout=300):
    """`python SCRIPT FLAGS` as a user runs it, offline, from the repository root."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # see set_num_threads above
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_ref_train(*flags, timeout=300):
    return run_script("ref_train.py", *flags, timeout=timeout)


def memcheck_cli(*flags, timeout=300):
    return run_script("memcheck.py", *flags, timeout=timeout)


def drive_cli(*flags, timeout=300):
    return run_script("drive.py", *flags, timeout=timeout)


@pytest.fixture(scope="session")
def ref_train_cli():
    return run_ref_train
