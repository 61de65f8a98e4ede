"""Tests of the reference trainer: the data, the model and its tokenizer, the loop, checkpointing,
the fused loss, and ref_train.py's command line and failures.

Training runs use the tiny OPT of conftest.py (2 layers of width 64) in fp32 on the CPU, in this
process; only test_full_size_smoke_run uses opt-125m's architecture. The gated LoRA is tested in
test_ilora.py, the instrument in test_memcheck.py, the budget in test_budget.py, the drivers in
test_drive.py.
"""
import contextlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import data
import drive
import ilora
import memcheck
import flags
import models
import ref_train
from conftest import (HANG_SECONDS, ROOT, SEQ, TINY_OPT, _save_tiny_opt, assert_markdown_tables,
                      one_error_line, rel_err, run_main, run_ref_train)
from memcheck import MiB

VOCAB = drive.VOCAB   # the model families' vocabulary (conftest's family_models)

# ---------------------------------------------------------------- data

@pytest.fixture(scope="module")
def catalogue():
    """(titles, samples, stand-in tokenizer with the placeholders, placeholder ids)."""
    titles, samples = data.synthetic_catalogue(0)
    tokenizer = data.train_tokenizer(titles)
    data.add_special_tokens(tokenizer)
    return titles, samples, tokenizer, data.placeholder_ids(tokenizer, added_tokens=True)


def test_a_tokenizer_without_a_pad_token_gets_one_and_counts_it_as_added():
    # Llama's tokenizer has none: padding a batch needs one, and the embeddings grow by one more row
    titles, _ = data.synthetic_catalogue(0)
    tokenizer = data.train_tokenizer(titles)
    before = len(tokenizer)
    tokenizer.pad_token = None
    added = data.add_special_tokens(tokenizer)
    assert tokenizer.pad_token == data.PAD_TOKEN
    assert added == len(data.SPECIAL_TOKENS) + 1 == len(tokenizer) - before
    assert data.placeholder_ids(tokenizer, added_tokens=True)[2] == tokenizer.convert_tokens_to_ids(
        data.PAD_TOKEN)


def test_synthetic_catalogue_is_deterministic_and_well_formed():
    titles, samples = data.synthetic_catalogue(0)
    assert (titles, samples) == data.synthetic_catalogue(0)
    assert samples != data.synthetic_catalogue(1)[1]
    # Pinned: the same seed gives these samples in any process and after any refactoring.
    assert samples[0] == data.Sample([579, 85, 783, 229, 684, 444],
                                     [165, 12, 743, 162, 67, 464, 648, 282, 294, 472, 935, 644, 965,
                                      326, 219, 391, 713, 649, 22, 660], 326)
    for s in samples:
        assert data.MIN_HISTORY <= len(s.history) <= data.MAX_HISTORY
        assert len(s.candidates) == data.N_CANDIDATES == len(set(s.candidates))
        assert s.target in s.candidates
        assert set(s.history).isdisjoint(s.candidates)  # no candidate is an item the user has seen
        assert set(s.history) | set(s.candidates) <= set(titles)


def test_a_batch_larger_than_the_data_encodes_each_sample_once_and_repeats_it(catalogue, monkeypatch):
    # (--bs 100000 once spent minutes tokenising 500 samples 200 times each before its first step)
    titles, samples, tokenizer, ids = catalogue
    samples, encoded = samples[:20], []
    monkeypatch.setattr(data, "encode", lambda sample, *a: encoded.append(sample) or (
        [sample.target] * 8, [data.IGNORE] * 8, [0] * 8, 5))
    first, second = itertools.islice(data.batches(samples, titles, tokenizer, 50, 8, ids), 2)
    assert len(encoded) == len(samples)
    assert first["input_ids"].shape == (50, 8) and first["input_ids"].dtype == torch.long
    assert set(first["input_ids"][:, 0].tolist()) <= {s.target for s in samples}
    assert first["attention_mask"].tolist() == [[1] * 5 + [0] * 3] * 50
    assert not torch.equal(first["input_ids"], second["input_ids"])   # shuffled again


def prompt_and_answer(row_ids, row_labels, row_mask):
    """Split one row into (prompt tokens, answer tokens, padding length) by its labels and mask."""
    length = int(row_mask.sum())
    answer_at = (row_labels != data.IGNORE).nonzero().flatten()
    start = int(answer_at[0])
    assert answer_at.tolist() == list(range(start, length))  # the answer is one block at the end
    return row_ids[:start].tolist(), row_ids[start:length].tolist(), len(row_ids) - length


@pytest.mark.parametrize("seq", [48, 400], ids=["cut-from-the-left", "padded"])
def test_batches_are_exactly_bs_by_seq_with_answer_labels(catalogue, seq):
    titles, samples, tokenizer, ids = catalogue
    bs = 3
    for batch in itertools.islice(data.batches(samples, titles, tokenizer, bs, seq, ids), 20):
        for name in ("input_ids", "attention_mask", "labels", "item_ids"):
            assert batch[name].shape == (bs, seq), name
        assert batch["history"].shape == (bs, data.MAX_HISTORY)
        assert batch["history_len"].shape == (bs,)
        answered = batch["labels"] != data.IGNORE
        assert torch.equal(batch["labels"][answered], batch["input_ids"][answered])
        assert not (answered & (batch["attention_mask"] == 0)).any()  # padding carries no loss

    # Row by row on known samples: the labels are the target's title and </s>, nothing else.
    known = samples[:4]
    batch = data.collate(known, titles, tokenizer, seq, ids)
    full = data.collate(known, titles, tokenizer, 1000, ids)  # long enough for any prompt
    for i, s in enumerate(known):
        prompt, answer, pad = prompt_and_answer(batch["input_ids"][i], batch["labels"][i],
                                                batch["attention_mask"][i])
        full_prompt, _, _ = prompt_and_answer(full["input_ids"][i], full["labels"][i],
                                              full["attention_mask"][i])
        expected = tokenizer.encode(" " + titles[s.target], add_special_tokens=False)
        assert answer == expected + [tokenizer.eos_token_id]
        assert batch["input_ids"][i, len(prompt) + len(answer):].eq(ids[2]).all()  # pad id
        if seq == 48:  # every prompt is longer: cut from the left, the answer kept whole
            assert pad == 0 and len(prompt) < len(full_prompt)
            assert prompt == full_prompt[-len(prompt):]
        else:
            assert pad > 0 and prompt == full_prompt
            assert prompt[:3] == tokenizer.encode("This user has watched", add_special_tokens=False)[:3]


@pytest.mark.parametrize("seq", [48, 400], ids=["cut-from-the-left", "padded"])
def test_item_ids_mark_exactly_the_placeholder_tokens(catalogue, seq):
    titles, samples, tokenizer, ids = catalogue
    history_id, candidate_id, _ = ids
    batch = data.collate(samples[:8], titles, tokenizer, seq, ids)
    placeholders = (batch["input_ids"] == history_id) | (batch["input_ids"] == candidate_id)
    assert placeholders.any()
    assert torch.equal(batch["item_ids"] != 0, placeholders)
    if seq == 400:  # nothing cut: each placeholder carries its item, in prompt order, after its title
        for i, s in enumerate(samples[:8]):
            row, tokens = batch["item_ids"][i], batch["input_ids"][i].tolist()
            assert row[batch["input_ids"][i] == history_id].tolist() == s.history
            assert row[batch["input_ids"][i] == candidate_id].tolist() == s.candidates
            for at in (row != 0).nonzero().flatten().tolist():
                title = tokenizer.encode(" " + titles[int(row[at])], add_special_tokens=False)
                assert tokens[at - len(title):at] == title


def epochs_of_batches(monkeypatch, n_samples, bs, seed=0, n_batches=10):
    """The indices of the samples in each of data.batches' first batches."""
    monkeypatch.setattr(data, "encode", lambda *_: ([0], [0], [0], 1))
    monkeypatch.setattr(data, "_batch", lambda samples, *_: samples)
    return list(itertools.islice(data.batches(list(range(n_samples)), {}, None, bs, 8, None, seed),
                                 n_batches))


def test_each_epoch_holds_every_sample_once_in_an_order_the_seed_draws_anew(monkeypatch):
    batches = epochs_of_batches(monkeypatch, 20, 4)   # 5 batches an epoch
    first, second = sum(batches[:5], []), sum(batches[5:], [])
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second and first != list(range(20))
    assert epochs_of_batches(monkeypatch, 20, 4, seed=1) != batches
    # 22 samples: the 2 left over by an epoch's last full batch are not a batch of 2
    assert all(len(b) == 4 for b in epochs_of_batches(monkeypatch, 22, 4))


@pytest.mark.parametrize("n_samples", [2, 5])
def test_a_batch_as_large_as_the_data_or_larger_holds_every_sample(monkeypatch, n_samples):
    for batch in epochs_of_batches(monkeypatch, n_samples, 5, n_batches=3):
        assert len(batch) == 5 and set(batch) == set(range(n_samples))


def test_inject_replaces_exactly_the_placeholder_embeddings(catalogue):
    titles, samples, tokenizer, ids = catalogue
    batch = data.collate(samples[:3], titles, tokenizer, 128, ids)
    torch.manual_seed(0)
    items = ilora.ItemModules(n_items=len(titles), hidden_size=16, n_experts=4)
    embeds = torch.randn(3, 128, 16)
    injected = items.inject(embeds, batch["item_ids"])
    at = batch["item_ids"] != 0
    assert at.sum() > 10
    assert torch.equal(injected[~at], embeds[~at])  # every other position untouched, bit for bit
    expected = items.projector(items.sasrec.item_embeddings(batch["item_ids"][at]))
    assert torch.allclose(injected[at], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(injected[at], embeds[at])


# ---------------------------------------------------------------- MovieLens directories

def write_movielens(directory, n_items=40, item_ids=None, ratings=None, item_lines=None):
    """A MovieLens-100K-format directory: u.item 'id|title|...', u.data 'user item rating time'.

    By default 5 users rate 12 items each, written out of time order so that the loader must sort.
    """
    os.makedirs(directory, exist_ok=True)
    item_ids = item_ids or list(range(1, n_items + 1))
    if item_lines is None:
        item_lines = [f"{i}|Movie number {i} ({1950 + i % 70})|01-Jan-1995||http://x|0|1|0"
                      for i in item_ids]
    if ratings is None:
        ratings = [(user, item_ids[(user * 7 + k * 3) % len(item_ids)], 1 + k % 5, 880000000 + 97 * k)
                   for user in range(1, 6) for k in reversed(range(12))]
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as f:
        f.write("\n".join(item_lines) + "\n")
    with open(os.path.join(directory, "u.data"), "w", encoding="latin-1") as f:
        f.write("".join(line if isinstance(line, str) else "\t".join(map(str, line)) + "\n"
                        for line in ratings))
    return str(directory)


def test_movielens_directory_trains(tmp_path, train_tiny):
    directory = write_movielens(tmp_path / "ml")
    titles, samples = data.movielens_catalogue(directory)
    assert len(titles) == 40 and len(samples) == 5
    for user, s in enumerate(samples, 1):  # the latest rating is the target, the 10 before it history
        by_time = [(user * 7 + k * 3) % 40 + 1 for k in range(12)]
        assert s.target == by_time[-1] and s.history == by_time[-11:-1]
        assert s.target in s.candidates and set(s.candidates) <= set(titles)
    report = train_tiny("--data", directory, "--steps", 2, "--bs", 2, "--seq", 128)
    assert report["config"]["data"] == directory
    assert [s["step"] for s in report["steps"]] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in report["steps"])


def test_a_movielens_user_needs_more_ratings_than_the_shortest_history(tmp_path):
    ratings = [(user, item, 5, 880000000 + item) for user, n in ((1, 12), (2, data.MIN_HISTORY + 1),
                                                                 (3, data.MIN_HISTORY))
               for item in range(1, n + 1)]
    _, samples = data.movielens_catalogue(write_movielens(tmp_path / "ml", ratings=ratings))
    assert [len(s.history) for s in samples] == [data.MAX_HISTORY, data.MIN_HISTORY]


@pytest.mark.parametrize("item_ids", [list(range(2, 82, 2)), [10 ** 10 + i for i in range(40)]],
                         ids=["even", "huge"])
def test_movielens_ids_with_gaps_are_numbered_in_order_so_the_item_table_is_their_count(tmp_path, item_ids):
    directory = write_movielens(tmp_path / "ml", item_ids=item_ids)
    titles, samples = data.movielens_catalogue(directory)
    assert sorted(titles) == list(range(1, 41))
    assert titles[1].startswith(f"Movie number {item_ids[0]} ")   # the smallest id's title
    for s in samples:  # an id outside u.item has no title: encode() would fail with a KeyError
        assert set(s.candidates) <= set(titles)


def test_movielens_items_are_numbered_in_id_order_whatever_the_order_of_the_lines_of_u_item(tmp_path):
    directory = write_movielens(tmp_path / "ml", item_ids=list(range(2, 82, 2)))
    in_id_order = data.movielens_catalogue(directory)
    path = os.path.join(directory, "u.item")
    with open(path, encoding="latin-1") as f:
        lines = f.readlines()
    with open(path, "w", encoding="latin-1") as f:
        f.writelines(reversed(lines))
    titles, samples = data.movielens_catalogue(directory)
    assert titles[1].startswith("Movie number 2 ")   # the smallest id's title
    assert (titles, samples) == in_id_order


GOOD = None  # write_movielens' default for that file


@pytest.mark.parametrize("item_lines, ratings, message", [
    (["1|Toy Story (1995)|x", "two|Heat (1995)|x"], GOOD, "u.item line 2: expected 'id|title|...'"),
    (["0|Toy Story (1995)|x"] + [f"{i}|T{i}" for i in range(1, 40)], GOOD, "u.item line 1"),
    ([f"{i}|T{i}" for i in range(1, 26)], GOOD, "u.item: 25 items"),
    (GOOD, ["1\t1\t5\t880000000\n", "1\t2\t5\n"], "u.data line 2: expected 'user item rating"),
    (GOOD, ["1\t1\t5\t880000000\n", "\n", "1\t99\t5\t880000001\n"], "u.data line 3: item 99 is not"),
    (GOOD, ["1\t1\t5\t880000000\n"], "u.data: no user has more than 3 ratings"),
    (GOOD, ["1\t\xb2\t5\t880000000\n"], "u.data line 1: expected 'user item rating"),
    ([f"{i}|T{i}" for i in range(1, 41)] + ["7|Heat (1995)"], GOOD, "u.item line 41: item 7 again"),
], ids=["u.item-bad-id", "u.item-id-0-is-padding", "too-few-items", "u.data-3-fields",
        "u.data-unknown-item", "no-usable-user", "u.data-superscript-digit", "u.item-id-repeated"])
def test_malformed_movielens_names_the_file_and_line(tmp_path, item_lines, ratings, message):
    directory = write_movielens(tmp_path / "ml", item_lines=item_lines, ratings=ratings)
    with pytest.raises(data.DataError, match=message.replace("|", r"\|").replace(".", r"\.")):
        data.movielens_catalogue(directory)


def test_movielens_missing_file_is_named(tmp_path):
    directory = write_movielens(tmp_path / "ml")
    os.remove(os.path.join(directory, "u.data"))
    with pytest.raises(data.DataError, match="u.data: missing"):
        data.movielens_catalogue(directory)
    os.mkdir(os.path.join(directory, "u.data"))
    with pytest.raises(data.DataError, match="u.data: a directory, not a file"):
        data.movielens_catalogue(directory)
    with pytest.raises(data.DataError, match="u.item: a file, not a directory"):
        data.movielens_catalogue(os.path.join(directory, "u.item"))


# ---------------------------------------------------------------- the model and its tokenizer

def test_the_default_model_in_the_local_cache_is_loaded_from_its_files_not_built_from_optconfig(
        hub_cache_with_tiny_opt, monkeypatch, capsys):
    import huggingface_hub.constants

    # (read from HF_HUB_CACHE when huggingface_hub is imported: setting the variable now is too late)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub_cache_with_tiny_opt)
    assert ref_train.main(["--device", "cpu", "--steps", "1", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    assert f"model: {flags.DEFAULT_MODEL} from local files" in out
    assert "not in the local cache" not in out and "random weights" not in out


def test_random_weights_from_a_config_alone_follow_the_seed_and_nothing_run_before(tmp_path):
    from transformers import OPTConfig

    OPTConfig(vocab_size=500, **TINY_OPT).save_pretrained(tmp_path)   # config.json, no weights

    def weights(seed):
        args = ref_train.parse_args(["--model", str(tmp_path), "--seed", str(seed)])
        return models.load_model(args, torch.float32)[0].state_dict()

    first = weights(0)
    torch.manual_seed(123)
    again, other = weights(0), weights(1)
    assert [name for name in first if not torch.equal(first[name], again[name])] == []
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_model_dir_without_tokenizer_gets_the_stand_in_tokenizer(bare_tiny_model):
    args = ref_train.parse_args(["--model", bare_tiny_model, "--device", "cpu", "--seq", "128"])
    model, _, batches, _ = ref_train.build(args)
    # The stand-in keeps the model's 4200 rows and adds the 4 placeholders ("<pad>" exists).
    assert model.get_input_embeddings().num_embeddings == 4200 + 4
    batch = next(batches)
    answer_lengths = (batch["labels"] != data.IGNORE).sum(dim=1)
    assert (answer_lengths > 1).all()  # a title and </s>, not </s> alone


@pytest.mark.parametrize("broken", ["merges", "not json"])
def test_a_tokenizer_that_does_not_parse_is_named_and_the_stand_in_trains(tiny_model, tmp_path, broken):
    directory = tmp_path / "broken-tokenizer"
    shutil.copytree(tiny_model, directory)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = [["a", "b", "c"]]   # valid JSON that the tokenizers library refuses
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer) if broken == "merges" else "garbage")
    args = ref_train.parse_args(["--model", str(directory), "--device", "cpu"])
    model, tokenizer, source = models.load_model(args, torch.float32, meta=True)
    assert tokenizer is None and f"tokenizer: cannot read the one in {directory} (" in source


def test_a_degenerate_tokenizer_counts_as_none_and_the_vocabulary_never_shrinks(family_models, tiny_model,
                                                                                  tmp_path):
    from transformers import AutoTokenizer

    # A folder without tokenizer files is said to have none, however transformers would fill it in.
    args = ref_train.parse_args(["--model", family_models["qwen2"], "--device", "cpu"])
    assert models.load_model(args, torch.float32, meta=True)[2].endswith(
        f"tokenizer: none in {family_models['qwen2']}; using the stand-in BPE trained on the catalogue")
    directory = tmp_path / "qwen2"
    shutil.copytree(family_models["qwen2"], directory)
    (directory / "tokenizer_config.json").write_text("{}")
    # What transformers makes of a Qwen2 folder whose tokenizer is only its config: a 1-token tokenizer.
    assert 0 < len(AutoTokenizer.from_pretrained(directory, local_files_only=True)) < 64
    args = ref_train.parse_args(["--model", str(directory), "--device", "cpu", "--seq", str(SEQ)])
    model, tokenizer, source = models.load_model(args, torch.float32)
    assert tokenizer is None and "cannot be the model's" in source and "stand-in" in source
    model, _, batches, _ = ref_train.build(args)
    # The stand-in keeps the model's rows and adds the placeholders ("<pad>" exists): 1000 + 4.
    assert model.get_input_embeddings().num_embeddings == VOCAB + 4
    assert next(batches)["input_ids"].max() < VOCAB + 4
    # The rule keeps a real, small tokenizer: tiny_model's own 556 tokens for 4200 rows (13%).
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu"])
    _, tokenizer, source = models.load_model(args, torch.float32)
    assert len(tokenizer) == 556 and "tokenizer" not in source


def test_a_tokenizer_with_fewer_tokens_than_a_hundredth_of_the_rows_is_not_the_models(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import OPTConfig, PreTrainedTokenizerFast

    OPTConfig(vocab_size=10_000, **TINY_OPT).save_pretrained(tmp_path)
    words = {f"w{i}": i for i in range(90)} | {"<unk>": 90}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(tmp_path)
    assert models.MIN_TOKENS < 91   # so that only the share of the rows rules it out
    args = ref_train.parse_args(["--model", str(tmp_path)])
    _, tokenizer, source = models.load_model(args, torch.float32, meta=True)
    assert tokenizer is None
    assert "has 91 token(s) for 10000 embedding rows, so it cannot be the model's" in source
    assert source.endswith("using the stand-in BPE trained on the catalogue")


def test_auto_targets_follow_the_model_type_and_unknown_types_are_named(tiny_model):
    opt = type("M", (), {"config": type("C", (), {"model_type": "opt"})})()
    assert models.resolve_targets(opt, ("auto", "fc1"), ["fc1", "q_proj"]) == ("q_proj", "v_proj", "fc1")
    assert models.resolve_targets(opt, ("k_proj",), []) == ("k_proj",)
    other = type("M", (), {"config": type("C", (), {"model_type": "newarch"})})()
    assert models.resolve_targets(other, ("auto",), ["k_proj", "q_proj", "v_proj"]) == ("q_proj", "v_proj")
    with pytest.raises(ref_train.UsageError, match="newarch.*c_attn, c_proj"):
        models.resolve_targets(other, ("auto",), ["c_attn", "c_proj"])
    assert ref_train.parse_args(["--model", tiny_model]).targets == ("auto",)
    assert "auto" in flags.build_parser().format_help()


def test_auto_targets_of_an_unknown_model_type_need_both_q_proj_and_v_proj():
    other = type("M", (), {"config": type("C", (), {"model_type": "newarch"})})()
    with pytest.raises(flags.UsageError, match="no default targets for model type newarch.*k_proj, q_proj"):
        models.resolve_targets(other, ("auto",), ["k_proj", "q_proj"])


def test_a_model_without_sdpa_falls_back_to_eager_and_the_budget_follows(tiny_model, monkeypatch,
                                                                         capsys, tmp_path):
    from transformers import OPTForCausalLM

    # transformers refuses attn_implementation="sdpa" for a class that does not declare it
    monkeypatch.setattr(OPTForCausalLM, "_supports_sdpa", False)
    report_path = tmp_path / "r.json"
    flags = ["--model", tiny_model, "--device", "cpu", "--steps", "1", "--seq", "32"]
    assert ref_train.main([*flags, "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("using eager attention") == 1
    report = memcheck.read_report(str(report_path))
    assert report["config"]["attn"] == "eager"
    planned = ref_train.plan(ref_train.parse_args([*flags, "--attn", "eager"]))
    assert report["budget"]["peak_bytes"] == planned["peak_bytes"]


def test_a_llama_model_trains_in_the_same_loop(tmp_path, train_tiny):
    # Nothing OPT-specific beyond the default: a Llama (gated MLP, grouped-query attention, rotary
    # positions) with the same targets trains, checkpointed, and the budget still holds.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4200,
                                 max_position_embeddings=256)).save_pretrained(tmp_path)
    report = train_tiny("--steps", 2, "--targets", "q_proj,v_proj,gate_proj", model=str(tmp_path))
    assert all(math.isfinite(s["loss"]) for s in report["steps"])
    assert report["params"]["adapted"] == 2 * 3
    assert abs(report["peak_bytes"] / report["budget"]["peak_bytes"] - 1) <= 0.10


# ---------------------------------------------------------------- the loop

def test_the_reference_loss_is_transformers_own_next_token_loss(tiny_model):
    # Mistake: the loss not shifted (the model predicting the current token, not the next).
    # One expert, no item injection and LoRA's B = 0: the adapted model is the plain model, so
    # transformers' loss (which shifts the labels itself) must be the reference's to 1e-5.
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--experts", "1",
                                 "--no-inject-items", "--ckpt", "none", "--bs", "3", "--seq", "96"])
    model, items, batches, _ = ref_train.build(args)
    assert all(m.lora_B.weight.abs().sum() == 0 for m in model.modules()
               if isinstance(m, ilora.GatedLoraLinear))
    model.eval()   # OPT's own dropout off on both sides
    for _ in range(2):
        batch = next(batches)
        with torch.no_grad():
            ours = ref_train.forward_loss(model, items, batch, args)
            theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"], use_cache=False).loss
        assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()), (ours, theirs)


def test_a_step_ends_holding_exactly_the_parameters_and_the_optimizer_state(tiny_model, train_tiny):
    # Mistake: zero_grad(set_to_none=False), gradients kept between steps. Counted from the modules
    # themselves: every parameter and buffer, and AdamW's exp_avg and exp_avg_sq per trainable one.
    report = train_tiny("--steps", 3)
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu"])
    model, items, *_ = ref_train.build(args)
    tensors = {id(t): t for m in (model, items) for t in [*m.parameters(), *m.buffers()]}.values()
    held = sum(t.numel() * t.element_size() for t in tensors)
    trainable = sum(p.numel() * p.element_size() for p in tensors
                    if isinstance(p, nn.Parameter) and p.requires_grad)
    assert trainable > 0
    assert [s["live_bytes"] for s in report["steps"]] == [held + 2 * trainable] * 3


# growing_vocab_model: the resize draws new embedding rows at random, from the global RNG.
@pytest.mark.parametrize("model_fixture", ["tiny_model", "growing_vocab_model"])
def test_same_flags_and_seed_give_the_same_losses_bit_for_bit(model_fixture, request, train_tiny):
    model = request.getfixturevalue(model_fixture)
    first = [s["loss"] for s in train_tiny("--steps", 2, "--seq", 64, model=model)["steps"]]
    torch.manual_seed(12345)  # whatever ran before must not matter: only --seed does
    second = [s["loss"] for s in train_tiny("--steps", 2, "--seq", 64, model=model)["steps"]]
    assert first == second
    other_seed = [s["loss"] for s in train_tiny("--steps", 2, "--seq", 64, "--seed", 1,
                                                 model=model)["steps"]]
    assert other_seed != first  # the seed does reach the run


def test_the_learning_rate_reaches_the_optimizer(train_tiny):
    default, faster = ([s["loss"] for s in train_tiny("--steps", 2, "--seq", 64, *lr)["steps"]]
                       for lr in ((), ("--lr", 1e-2)))
    assert default[0] == faster[0] and default[1] != faster[1]   # the first update differs


# ---------------------------------------------------------------- checkpointing

def randomize_lora_b(model):
    """The same random, non-zero B in every build: with B = 0 the gradients of A and the router are 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ilora.GatedLoraLinear):
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator))


def one_step_gradients(model_dir, ckpt, *flags):
    """ref_train.train_step on a fresh build, with an optimizer that keeps the gradients for us.

    B is set to the same random values in every build: with PEFT's zero B, the gradients of A and of
    the router are exactly zero whatever the checkpointing does, and comparing them would prove nothing.
    """
    args = ref_train.parse_args(["--model", model_dir, "--device", "cpu", "--ckpt", ckpt,
                                 "--bs", "2", "--seq", "64", "--steps", "1", *flags])
    model, items, batches, _ = ref_train.build(args)
    randomize_lora_b(model)
    keep_grads = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None)
    scaler = torch.amp.GradScaler("cpu", enabled=False)   # disabled: step() is optimizer.step()
    probe = SimpleNamespace(phase=lambda name: contextlib.nullcontext())
    torch.manual_seed(args.seed)
    loss = ref_train.train_step(ref_train.ILoraModel(model, items, args), keep_grads, scaler,
                                next(batches), args, probe, [])
    grads = {f"{prefix}.{name}": p.grad.clone()
             for prefix, module in (("lm", model), ("ilora", items))
             for name, p in module.named_parameters() if p.requires_grad}
    return loss, grads


@pytest.fixture(scope="module")
def ckpt_reports(train_tiny):
    # A shape where activations dominate the peak, so that checkpointing has something to save.
    return {ckpt: train_tiny("--ckpt", ckpt, "--seq", 128, "--bs", 4, "--steps", 1)
            for ckpt in ("none", "manual", "hf")}


def test_checkpointing_modes_give_the_same_loss_and_gradients(tiny_model, ckpt_reports):
    reported = {ckpt: r["steps"][0]["loss"] for ckpt, r in ckpt_reports.items()}
    assert reported["manual"] == pytest.approx(reported["none"], rel=1e-6)
    assert reported["hf"] == pytest.approx(reported["none"], rel=1e-6)

    loss, grads = one_step_gradients(tiny_model, "none")
    kinds = ("lora_A", "lora_B", "router", "projector")
    for kind in kinds:  # each kind is there and alive, so the comparisons below mean something
        assert any(kind in name and g.abs().sum() > 0 for name, g in grads.items()), kind
    for ckpt in ("manual", "hf", "reentrant"):
        ckpt_loss, ckpt_grads = one_step_gradients(tiny_model, ckpt)
        assert ckpt_loss == pytest.approx(loss, rel=1e-6), ckpt
        assert ckpt_grads.keys() == grads.keys(), ckpt
        for name, g in grads.items():
            assert torch.allclose(ckpt_grads[name], g, rtol=1e-5, atol=1e-7), (ckpt, name)


def test_manual_checkpointing_trains_lora_when_no_layer_input_needs_a_gradient(tiny_model):
    # One expert and no injected items: the frozen embeddings' output is all a layer gets, and a
    # reentrant checkpoint would give the LoRA inside it no gradient.
    flags = ("--experts", "1", "--no-inject-items")
    loss, grads = one_step_gradients(tiny_model, "none", *flags)
    assert any("lora_A" in name and g.abs().sum() > 0 for name, g in grads.items())
    ckpt_loss, ckpt_grads = one_step_gradients(tiny_model, "manual", *flags)
    assert ckpt_loss == pytest.approx(loss, rel=1e-6) and ckpt_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(ckpt_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_manual_checkpointing_carries_the_gate_into_recomputation(tiny_model):
    # Backward runs here outside any use_gate() scope: the recomputed layers can only see the gate
    # because the checkpoint took it as an input. Gradients must match the run without checkpoints.
    def router_and_lora_grads(ckpt):
        args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--ckpt", ckpt,
                                     "--seq", "64"])
        model, items, batches, _ = ref_train.build(args)
        randomize_lora_b(model)
        batch = next(batches)
        torch.manual_seed(0)
        gate = items.gate(batch["history"], batch["history_len"])
        with ilora.use_gate(gate):
            loss = ref_train.forward_loss(model, items, batch, args)
        loss.backward()  # outside the scope
        grads = [items.router.weight.grad] + [m.lora_A.weight.grad for m in model.modules()
                                              if isinstance(m, ilora.GatedLoraLinear)]
        return [g.clone() for g in grads]

    plain, checkpointed = router_and_lora_grads("none"), router_and_lora_grads("manual")
    assert plain[0].abs().sum() > 0
    for g, h in zip(checkpointed, plain):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-7)


def test_each_rows_gate_comes_from_its_own_users_items_before_the_padding(tiny_model):
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--seq", "64", "--bs", "4"])
    model, items, batches, _ = ref_train.build(args)
    batch = next(batches)
    history, lengths = batch["history"], batch["history_len"]
    assert (lengths < history.shape[1]).any() and len(set(map(tuple, history.tolist()))) == len(history)
    _, gate = ref_train.ILoraModel(model, items, args)(batch)
    for row, length in enumerate(lengths.tolist()):
        alone = items.gate(history[row:row + 1, :length], lengths[row:row + 1])   # no padding, no other row
        assert torch.allclose(gate[row], alone[0], atol=1e-6), row


@pytest.mark.parametrize("flags, trained_dtype", [
    (("--precision", "bf16-true"), torch.float32),                            # iLoRA: fp32 on any model
    (("--precision", "bf16-mixed", "--weights-dtype", "bf16"), torch.float32),
    (("--precision", "bf16-true", "--lora-dtype", "match"), torch.bfloat16),
    (("--precision", "bf16-mixed", "--weights-dtype", "bf16", "--lora-dtype", "match"), torch.bfloat16)])
def test_the_adapters_router_and_projector_are_fp32_on_a_16_bit_model_unless_told_to_match(
        tiny_model, flags, trained_dtype):
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--seq", "64", *flags])
    model, items, _, _ = ref_train.build(args)
    trained = {name: p.dtype for name, p in [*model.named_parameters(), *items.named_parameters()]
               if "lora_" in name or name.startswith(("router", "projector"))}
    assert any(n.startswith("router") for n in trained) and any(n.startswith("projector") for n in trained)
    assert set(trained.values()) == {trained_dtype}, trained
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_every_nth_layer_checkpointed_trains_as_none_and_only_the_others_save_in_them(
        tiny_model, train_tiny):
    loss, grads = one_step_gradients(tiny_model, "none")
    every_loss, every_grads = one_step_gradients(tiny_model, "manual", "--ckpt-every", "2")
    assert every_loss == pytest.approx(loss, rel=1e-6) and every_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(every_grads[name], g, rtol=1e-5, atol=1e-7), name
    # the tiny OPT's two layers: the first checkpointed (saving only its input, at its own level),
    # the second saving inside it for backward
    names = [m["module"].split(".") for m in train_tiny("--ckpt-every", 2, "--steps", 1)["modules"]]
    assert {n[3] for n in names if n[:3] == ["model", "decoder", "layers"] and len(n) > 4} == {"1"}


def test_checkpointing_lowers_the_measured_peak(ckpt_reports):
    peaks = {ckpt: r["peak_bytes"] for ckpt, r in ckpt_reports.items()}
    # Without checkpointing both decoder layers' activations are alive at once; with it, one layer's
    # inputs are. At bs 4 x seq 128 that is about a third of the peak; 15% leaves room for noise-free
    # but version-dependent allocations while still failing if checkpointing silently does nothing.
    assert peaks["manual"] < 0.85 * peaks["none"], peaks
    assert peaks["hf"] < 0.85 * peaks["none"], peaks


def test_reentrant_checkpointing_trains_like_the_models_own_and_warns_of_nothing(train_tiny):
    # The injected item embeddings require grad, so the reentrant layers pass gradients to LoRA,
    # and the gate reaches the router through its leaf copy: the same losses step after step.
    hf = train_tiny("--ckpt", "hf", "--steps", 3)
    reentrant = train_tiny("--ckpt", "reentrant", "--steps", 3)
    assert [s["loss"] for s in reentrant["steps"]] == pytest.approx([s["loss"] for s in hf["steps"]],
                                                                    rel=1e-5)
    assert reentrant["warnings"] == [] and reentrant["status"] == "ok"
    terms = [r["budget"]["terms"] for r in (reentrant, hf)]
    assert terms[0]["checkpointed_inputs"] == terms[1]["checkpointed_inputs"] > 0   # checkpointing on
    assert terms[0]["input_leaf"] == 0 < terms[1]["input_leaf"]   # (no input_require_grads hook)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_models_own_checkpointing_is_budgeted_as_closely_as_the_manual_one(train_tiny, family_models,
                                                                                family):
    # transformers' checkpointing makes the embeddings' output a leaf the graph holds (apart from the
    # layers' input: the items are injected), and the step holds its loss through the optimizer:
    # --ckpt hf read 1.038x on the tiny OPT (optimizer 1.245x), 1.023x on Llama; manual 1.011x, 1.006x
    model = {"model": family_models[family]} if family != "opt" else {}
    ratios = {}
    for ckpt in ("manual", "hf"):
        report = train_tiny("--ckpt", ckpt, "--bs", 4, "--seq", 128, "--steps", 3, **model)
        ratios[ckpt] = {name: report["phases"][name]["peak_bytes"] / report["budget"]["phases"][name]
                        for name in ("forward", "backward", "optimizer")}
    for name, ratio in ratios["hf"].items():
        assert ratio == pytest.approx(ratios["manual"][name], abs=0.002), (name, ratios)


# ---------------------------------------------------------------- the fused loss

def loss_case(vocab=300, width=32, bs=3, seq=20, bias=False, trainable=False, dtype=torch.float32, seed=0):
    """A head, hidden states and labels with ignored positions: a prompt, padding, a row's tail.

    trainable: True, False, or "bias" (the bias trains, the weight is frozen)."""
    torch.manual_seed(seed)
    head = nn.Linear(width, vocab, bias=bias).to(dtype)
    head.requires_grad_(trainable is True)
    if trainable == "bias":
        head.bias.requires_grad_(True)
    hidden = torch.randn(bs, seq, width, dtype=dtype)
    labels = torch.randint(0, vocab, (bs, seq))
    labels[0, :7] = data.IGNORE
    labels[-1, -4:] = data.IGNORE
    return head, hidden, labels


def loss_and_grads(head, hidden, labels, chunks, autocast=None):
    """The loss and the gradients of hidden, the head's weight and bias (None where not trained)."""
    hidden = hidden.detach().requires_grad_()
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = ref_train.lm_loss(head, hidden, labels, chunks)
    assert type(loss.grad_fn).__name__.startswith("ChunkedLinearCrossEntropy") == (chunks > 1)
    (3 * loss).backward()  # a grad_output other than 1: backward must scale what was kept
    bias_grad = head.bias.grad if head.bias is not None else None
    return loss.detach(), hidden.grad, head.weight.grad, bias_grad


@pytest.mark.parametrize("trainable,bias", [(False, False), (True, False), (True, True), ("bias", True)],
                         ids=["frozen head", "trainable head", "trainable head with bias",
                              "trainable bias only"])
@pytest.mark.parametrize("chunks", [2, 7])
def test_fused_loss_equals_the_plain_loss_and_its_gradients_in_fp32(trainable, bias, chunks):
    head, hidden, labels = loss_case(bias=bias, trainable=trainable)
    plain = loss_and_grads(head, hidden, labels, 1)
    fused = loss_and_grads(head, hidden, labels, chunks)
    assert fused[0].dtype == plain[0].dtype == torch.float32
    assert rel_err(fused[0], plain[0]) <= 1e-5
    for got, want in zip(fused[1:], plain[1:]):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype and got.shape == want.shape
            assert rel_err(got, want) <= 1e-5
    # A position whose next label is ignored gets no gradient, nor does the last, which predicts nothing.
    grad = fused[1]
    for row, positions in ((0, slice(0, 6)), (-1, slice(-5, None)), (1, slice(-1, None))):
        assert torch.equal(grad[row, positions], torch.zeros_like(grad[row, positions]))
    assert grad[0, 6].abs().sum() > 0


@pytest.mark.parametrize("case", ["bf16 autocast", "fp16 autocast", "bf16 weights"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen head", "trainable head"])
def test_fused_loss_casts_as_the_plain_path_in_16_bit(case, trainable):
    dtype = torch.bfloat16 if case == "bf16 weights" else torch.float32
    autocast = {"bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}.get(case)
    head, hidden, labels = loss_case(trainable=trainable, bias=trainable, dtype=dtype)
    try:
        plain = loss_and_grads(head, hidden, labels, 1, autocast)
    except RuntimeError as e:  # some CPU builds have no fp16 kernel for an op of the plain path
        pytest.skip(f"{case} does not run on this CPU: {e}")
    fused = loss_and_grads(head, hidden, labels, 4, autocast)
    assert fused[0].dtype == torch.float32  # the loss in fp32, as transformers computes it
    # Every logit is rounded to 16 bits as the plain path rounds it: the losses agree to fp32's
    # rounding (a logit left in fp32 moves them 3e-6 or more); only a 16-bit weight's bias is added
    # in another order than in the plain path's kernel.
    assert rel_err(fused[0], plain[0]) <= (1e-4 if case == "bf16 weights" and trainable else 1e-6)
    for got, want in zip(fused[1:], plain[1:]):
        if want is not None:
            assert got.dtype == want.dtype
            assert rel_err(got, want) <= 1e-2   # the softmax is rounded to 16 bits in another order


def test_fused_loss_keeps_only_the_hidden_states_gradient_for_backward():
    head, hidden, labels = loss_case(vocab=4000, bs=2, seq=64)
    logits_bytes = 2 * 63 * 4000 * 4
    kept_bytes = hidden.numel() * 4   # bs x seq x hidden fp32, the last position's zero included

    def measure(chunks, requires_grad=True, trainable=False):
        head.requires_grad_(trainable)
        h = hidden.clone().requires_grad_(requires_grad)
        with memcheck.Tracker("cpu") as tracker:
            start = tracker.live_bytes
            loss = ref_train.lm_loss(head, h, labels, chunks)
            kept = tracker.live_bytes - start - loss.untyped_storage().nbytes()
            forward_peak = tracker.peak_bytes - start
            if loss.requires_grad:
                loss.backward()
            peak = tracker.peak_bytes - start
        return kept, forward_peak, peak

    plain_kept, _, plain_peak = measure(1)
    kept, forward_peak, peak = measure(8)
    n_targets = 8  # the int64 count the mean divides by, kept by both paths
    assert plain_kept >= logits_bytes                # the plain path keeps the logits' log-softmax
    assert kept == kept_bytes + n_targets            # the fused one, the hidden states' gradient only
    assert peak == forward_peak                      # backward makes no logits again
    assert peak < 0.1 * plain_peak
    # one chunk of fp32 logits at a time, its softmax made in place, beside a few bs x seq x hidden
    assert peak < logits_bytes / 8 + kept_bytes + 4 * hidden.numel() * 4
    # a trainable head keeps its fp32 gradient too; nothing needs a gradient: nothing is kept
    assert measure(8, trainable=True)[0] == kept_bytes + n_targets + 4000 * 32 * 4
    assert measure(8, requires_grad=False)[0] == 0
    with torch.no_grad():  # nor made: the forward under no_grad costs what it costs without a gradient
        assert measure(8) == measure(8, requires_grad=False)


def test_fused_loss_recomputes_nothing_in_backward():
    from torch.utils.flop_counter import FlopCounterMode

    head, hidden, labels = loss_case(vocab=2000, bs=2, seq=64)
    flops = {}
    for chunks in (1, 8):
        h = hidden.clone().requires_grad_()
        with FlopCounterMode(display=False) as forward:
            loss = ref_train.lm_loss(head, h, labels, chunks)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
        flops[chunks] = forward.get_total_flops(), backward.get_total_flops()
    assert flops[8][1] == 0                     # backward only scales what forward kept
    assert sum(flops[8]) <= 1.01 * sum(flops[1])  # the same products as the plain path, no more


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen head", "trainable head"])
def test_fused_loss_stays_finite_when_a_later_chunks_logits_lie_far_below_an_earlier_ones(trainable):
    # Mistake: the running maximum replaced by each chunk's own: the first chunk's sum is then
    # rescaled by exp(its max - the second's), which overflows fp32 when they lie 200 apart.
    head, hidden, labels = loss_case(bias=True, trainable=trainable)
    with torch.no_grad():
        head.bias[:150] = 100   # the first of 2 chunks
        head.bias[150:] = -100
    plain = loss_and_grads(head, hidden, labels, 1)
    fused = loss_and_grads(head, hidden, labels, 2)
    for got, want in zip(fused, plain):
        if want is not None:
            assert torch.isfinite(got).all()
            assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("chunks", [1, 4])
def test_the_loss_is_the_mean_over_the_shifted_targets_or_their_sum_over_a_given_count(chunks):
    # Mistakes: the count of the labels before the shift (the first position's label, which no
    # position predicts, counted), or a loss that divides by its own rows' count when given the
    # global batch's (each rank's share under DDP and FSDP2).
    head, hidden, labels = loss_case(trainable=True)
    assert (labels[:, 0] != data.IGNORE).any()
    h = hidden.detach().requires_grad_()
    logits, targets = head(h[:, :-1]).float().flatten(0, 1), labels[:, 1:].flatten()
    total = nn.functional.cross_entropy(logits, targets, ignore_index=data.IGNORE, reduction="sum")
    mean = nn.functional.cross_entropy(logits, targets, ignore_index=data.IGNORE)
    assert rel_err(ref_train.lm_loss(head, hidden, labels, chunks), mean) <= 1e-5
    n_targets = torch.tensor(100)   # the count of a global batch of more rows than these
    expected = torch.autograd.grad(total / n_targets, [h, head.weight])
    h = hidden.detach().requires_grad_()
    loss = ref_train.lm_loss(head, h, labels, chunks, n_targets)
    assert rel_err(loss, total / n_targets) <= 1e-5
    for got, want in zip(torch.autograd.grad(loss, [h, head.weight]), expected):
        assert rel_err(got, want) <= 1e-5


def test_chunked_loss_equals_the_full_loss_and_lowers_the_peak(tiny_model, train_tiny):
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--seq", "128"])
    model, items, batches, _ = ref_train.build(args)
    batch = next(batches)
    hidden = torch.randn(2, 128, model.config.hidden_size, requires_grad=True)
    head = model.get_output_embeddings()
    results = []
    for chunks in (1, 5):
        hidden.grad = None
        loss = ref_train.lm_loss(head, hidden, batch["labels"], chunks)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone()))
    (full_loss, full_grad), (chunked_loss, chunked_grad) = results
    assert rel_err(chunked_loss, full_loss) <= 1e-5
    assert rel_err(chunked_grad, full_grad) <= 1e-5

    plain = train_tiny("--seq", 128, "--bs", 4, "--steps", 1)
    chunked = train_tiny("--seq", 128, "--bs", 4, "--steps", 1, "--loss-chunks", 8)
    assert chunked["steps"][0]["loss"] == pytest.approx(plain["steps"][0]["loss"], rel=1e-5)
    assert chunked["peak_bytes"] < 0.8 * plain["peak_bytes"]
    # More chunks than positions: they slice the vocabulary, not the sequence.
    short = [train_tiny("--seq", 16, "--steps", 1, *chunks) for chunks in ((), ("--loss-chunks", 64))]
    assert short[1]["steps"][0]["loss"] == pytest.approx(short[0]["steps"][0]["loss"], rel=1e-5)


@pytest.mark.parametrize("flags", [("--loss-chunks", 8, "--ckpt", "none"),
                                   ("--loss-chunks", 4, "--precision", "bf16-mixed")],
                         ids=lambda f: " ".join(map(str, f)))
def test_fused_loss_trains_like_the_plain_loss_within_the_budget(train_tiny, flags):
    fused = train_tiny("--steps", 2, *flags)
    plain = train_tiny("--steps", 2, *[f for f in flags if f not in ("--loss-chunks", 8, 4)])
    tolerance = 1e-5 if "bf16-mixed" not in flags else 1e-2
    for a, b in zip(fused["steps"], plain["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=tolerance)
    assert fused["peak_bytes"] < plain["peak_bytes"]
    assert abs(fused["peak_bytes"] / fused["budget"]["peak_bytes"] - 1) <= 0.10
    terms = fused["budget"]["terms"]
    assert terms["kept_loss_gradient"] == 2 * 128 * TINY_OPT["hidden_size"] * 4  # bs x seq x hidden, fp32
    assert plain["budget"]["terms"]["kept_loss_gradient"] == 0


# ---------------------------------------------------------------- the command line

def bad_movielens(directory):
    ratings = ["1\t1\t5\t880000000\n", "1\t2\t5\t880000001\n", "1\tthree\t5\t880000002\n"]
    return write_movielens(directory, ratings=ratings)


def not_a_model(directory, files=None):
    directory.mkdir()
    for name, text in (files or {"notes.txt": "not a model\n"}).items():
        (directory / name).write_text(text)
    return str(directory)


def truncated_model(tiny_model, directory):
    """The tiny model with its weights cut in half, as an interrupted download leaves them."""
    shutil.copytree(tiny_model, directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(directory)


def edited_config(tiny_model, directory, **fields):
    """A folder holding only the tiny model's config.json, with `fields` changed."""
    with open(os.path.join(tiny_model, "config.json")) as f:
        config = json.load(f)
    return not_a_model(directory, {"config.json": json.dumps(dict(config, **fields))})


def reshaped_model(tiny_model, directory):
    """The tiny model whose config.json was edited after its weights were saved (a wider MLP)."""
    shutil.copytree(tiny_model, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, ffn_dim=2 * config["ffn_dim"])))
    return str(directory)


@pytest.fixture(scope="module")
def values(tiny_model, tmp_path_factory):
    """What "{...}" in the flags of this section stand for: models, data and report paths."""
    tmp = tmp_path_factory.mktemp("commands")
    (tmp / "empty").mkdir()
    (tmp / "a-report.json").write_text("{}")
    os.mkfifo(tmp / "fifo")   # (not /dev/null: code that replaced it would break the machine)
    os.symlink(tmp / "no-such-folder" / "r.json", tmp / "dangling.json")
    return {"report_file": str(tmp / "a-report.json"), "fifo": str(tmp / "fifo"),
            "dangling": str(tmp / "dangling.json"), "no_folder": str(tmp / "no-such-folder"),
            "long_folder": not_a_model(tmp / ("checkpoints-of-a-long-fine-tuning-run-" * 3),
                                       {"config.json": "{}"}),
            "tiny": tiny_model, "bad_data": bad_movielens(tmp / "bad-ml"),
            "text_dir": not_a_model(tmp / "text"), "empty_dir": str(tmp / "empty"),
            "bad_config": not_a_model(tmp / "bad-config", {"config.json": "{bad json"}),
            "small_vocab": _save_tiny_opt(tmp / "small-vocab", 500, with_tokenizer=False),
            "truncated": truncated_model(tiny_model, tmp / "truncated"),
            "reshaped": reshaped_model(tiny_model, tmp / "reshaped"),
            "width_as_text": edited_config(tiny_model, tmp / "width-as-text", hidden_size="64"),
            "negative_width": edited_config(tiny_model, tmp / "negative-width", ffn_dim=-64),
            "no_layers": edited_config(tiny_model, tmp / "no-layers", num_hidden_layers=0),
            "no_positions": edited_config(tiny_model, tmp / "no-positions", max_position_embeddings=-5),
            "mamba": not_a_model(tmp / "mamba", {"config.json": json.dumps(
                {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 500})}),
            "report": str(tmp / "report.json"), "seq_report": str(tmp / "seq.json"),
            "load_report": str(tmp / "load.json")}


def ref_train_main(capsys, values, flags):
    """`ref_train.py FLAGS --steps 1` through ref_train.main, in this process."""
    steps = [] if "--steps" in flags else ["--steps", "1"]
    return run_main(ref_train.main, capsys, *(f.format(**values) for f in flags), *steps)


# (flags, what the message must name); "{tiny}" is the tiny model, whose 256 positions keep it fast
BAD_INPUTS = {
    "bs-0": (["--bs", "0"], ["--bs 0"]),
    "bs-beyond-what-a-step-can-make": (["--bs", str(10 ** 23)], [f"--bs {10 ** 23} with --seq 128",
                                                                 "tokens a step; at most 16,777,216"]),
    "seq-8": (["--seq", "8"], ["--seq 8"]),
    "seq-beyond-positions": (["--model", "{tiny}", "--seq", "100000"], ["--seq 100000", "256"]),
    "steps-0": (["--steps", "0"], ["--steps 0", "1 or more"]),
    "r-0": (["--lora-r", "0"], ["--lora-r 0"]),
    "experts-0": (["--experts", "0"], ["--experts 0", "1 or more"]),
    "dropout-1": (["--dropout", "1"], ["--dropout 1.0", "[0, 1)"]),
    "r-not-divisible": (["--lora-r", "6", "--experts", "4"], ["--lora-r 6", "--experts 4"]),
    # an older report's baseline command, and an abbreviation, which never becomes another flag
    "r-renamed": (["--r", "16"], ["--r: renamed --lora-r"]),
    "r-renamed-with-equals": (["--r=16"], ["--r=16: renamed --lora-r"]),
    "abbreviated-flag": (["--step", "5"], ["--step"]),
    "unknown-target": (["--model", "{tiny}", "--targets", "nope"], ["nope", "q_proj", "v_proj"]),
    "cuda-without-cuda": (["--device", "cuda"], ["--device cuda"]),
    "precision-64": (["--precision", "64"], ["64", "bf16-mixed"]),
    "missing-model": (["--model", "/no/such/dir"], ["/no/such/dir"]),
    "hub-name-not-cached": (["--model", "ilora-ref-tests/no-such-model"],
                            ["--model ilora-ref-tests/no-such-model", "nothing is downloaded"]),
    "missing-data": (["--data", "/no/such/dir"], ["/no/such/dir"]),
    "data-empty": (["--data", ""], ["--data '': an empty path"]),
    "model-empty": (["--model", ""], ["--model '': an empty name"]),
    "data-a-file": (["--data", "{report_file}"], ["--data {report_file}: a file, not a directory"]),
    "model-a-file": (["--model", "{report_file}"], ["--model {report_file}: a file, not a directory"]),
    "weights-dtype-against-a-true-precision": (["--precision", "bf16-true", "--weights-dtype", "fp32"],
                                               ["--weights-dtype fp32", "--precision bf16-true",
                                                "--precision 32", "*-mixed"]),
    "weights-dtype-against-precision-32": (["--precision", "32", "--weights-dtype", "bf16"],
                                           ["--weights-dtype bf16", "--precision 32", "bf16-true"]),
    "malformed-u.data": (["--model", "{tiny}", "--data", "{bad_data}"],
                         ["{bad_data}/u.data line 3", "three"]),
    "lr-negative": (["--lr", "-1"], ["--lr -1.0", "positive"]),
    "lr-0": (["--lr", "0"], ["--lr 0.0", "positive"]),
    "alpha-zero": (["--alpha", "0"], ["--alpha 0.0", "positive"]),
    "lr-beyond-float32": (["--lr", "1e38"], ["--lr 1e+38", "at most 3.4e37", "float32"]),
    "alpha-beyond-float32": (["--alpha", "1e308"], ["--alpha 1e+308", "float32"]),
    "loss-chunks-0": (["--loss-chunks", "0"], ["--loss-chunks 0", "1 or more"]),
    "loss-chunks-beyond-the-vocabulary": (["--model", "{tiny}", "--loss-chunks", "100000"],
                                          ["--loss-chunks 100000", "at most the vocabulary's"]),
    "vocab-0": (["--vocab", "0"], ["--vocab 0", "1 or more rows"]),
    "vocab-below-the-tokenizers": (["--model", "{tiny}", "--vocab", "300"],
                                   ["--vocab 300", "560 tokens with the placeholders",
                                    "use --vocab 560 or more"]),
    "seed-beyond-64-bits": (["--seed", str(2 ** 64)], [f"--seed {2 ** 64}", "2**64 - 1"]),
    "max-memory-infinite": (["--max-memory", "inf"], ["--max-memory inf", "positive"]),
    "max-memory-0": (["--max-memory", "0"], ["--max-memory 0", "positive"]),
    "max-memory-beyond-int64-bytes": (["--max-memory", "1e308"], ["--max-memory 1e+308", "at most 2**43"]),
    "report-empty": (["--report", ""], ["--report ''", "empty"]),
    "report-a-directory": (["--report", "{empty_dir}"], ["--report {empty_dir}: is a directory"]),
    "report-in-missing-dir": (["--report", "/no/such/dir/r.json"], ["/no/such/dir/r.json"]),
    "report-under-a-file": (["--report", "{report_file}/r.json"],
                            ["{report_file} is a file, not a directory"]),
    "report-a-pipe": (["--report", "{fifo}"], ["--report {fifo}: not a regular file"]),
    "report-a-link-into-a-missing-folder": (
        ["--report", "{dangling}"], ["--report {dangling}", "the directory {no_folder} does not exist"]),
    "leak-without-gate": (["--inject-leak", "--experts", "1"], ["--inject-leak", "--experts 1"]),
    "ckpt-every-0": (["--ckpt-every", "0"], ["--ckpt-every 0", "1 or more"]),
    "ckpt-every-with-hf": (["--ckpt", "hf", "--ckpt-every", "2"], ["--ckpt-every 2", "--ckpt hf", "manual"]),
}


@pytest.mark.parametrize("environment, given, named", [
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, ["--strategy", "fsdp", "--ckpt", "reentrant"],
     "--ckpt reentrant with --strategy fsdp"),
    ({"RANK": "0"}, ["--strategy", "ddp"], "--strategy ddp: needs torchrun's environment")])
def test_a_strategy_is_refused_in_one_line_without_all_of_torchruns_environment_or_with_reentrant(
        environment, given, named, values, capsys, monkeypatch):
    for name in flags.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert named in one_error_line(ref_train_main(capsys, values, given))


def test_a_negative_seed_is_one_torch_takes():
    assert ref_train.parse_args(["--seed", "-1"]).seed == -1


def test_the_largest_learning_rate_allowed_takes_adamws_first_step_without_overflow(tiny_model, capsys):
    assert run_main(ref_train.main, capsys, "--model", tiny_model, "--steps", "1", "--seq", "32", "--lr",
                    str(flags.MAX_LR)).returncode == 0


def main_writing_to(stream, monkeypatch, names, tiny_model, report, steps):
    """ref_train.main with sys.`names` (stdout, stderr) on `stream`, which is closed afterwards."""
    for name in names:
        monkeypatch.setattr(sys, name, stream)
    try:
        return ref_train.main(["--model", tiny_model, "--steps", str(steps), "--seq", "32",
                               "--report", str(report)])
    finally:
        stream.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full to fill stdout")
def test_a_full_disk_under_stdout_is_said_once_and_the_run_and_its_report_go_on(tiny_model, tmp_path, capsys,
                                                                                monkeypatch):
    path = tmp_path / "r.json"   # (/dev/full opened, never replaced: every write fails with ENOSPC)
    code = main_writing_to(open("/dev/full", "w"), monkeypatch, ["stdout"], tiny_model, path, steps=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0 and memcheck.read_report(path)["status"] == "ok"
    assert len(lines) == 1 and "stdout: No space left on device" in lines[0], lines


def test_targets_listed_with_spaces_are_the_names_without_them():
    assert ref_train.parse_args(["--targets", "q_proj, v_proj"]).targets == ("q_proj", "v_proj")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_value_with_exit_code_2(case, values, capsys):
    if case == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    result = ref_train_main(capsys, values, BAD_INPUTS[case][0])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for value in BAD_INPUTS[case][1]:
        assert value.format(**values) in lines[0], value


# (flags, what the one stderr line must name); "{...}" are filled in from values
FAILURES = {
    "not-a-model": (["--model", "{text_dir}"], ["--model {text_dir}", "config.json"]),
    "empty-model-dir": (["--model", "{empty_dir}"], ["--model {empty_dir}", "empty"]),
    "config-not-json": (["--model", "{bad_config}"], ["--model {bad_config}", "config.json", "not a valid JSON"]),
    "stand-in-beyond-the-embeddings": (["--model", "{small_vocab}", "--no-add-tokens"],
                                       ["--no-add-tokens", "500 embedding rows", "--add-tokens"]),
    "truncated-weights": (["--model", "{truncated}"], ["{truncated}/model.safetensors", "truncated"]),
    # (not "truncated, or still downloading?", nor transformers' "look at the above report", unshown)
    "weights-of-other-shapes": (["--model", "{reshaped}"], ["{reshaped}/model.safetensors", "shapes",
                                                            "config.json"]),
    "config-field-of-another-type": (["--model", "{width_as_text}"],
                                     ["--model {width_as_text}", "config.json", "hidden_size", "int"]),
    "config-that-builds-no-model": (["--model", "{negative_width}"],
                                    ["--model {negative_width}", "negative dimension",
                                     "cannot build the model its config.json gives"]),
    "attention-free": (["--model", "{mamba}", "--targets", "all-linear"],
                       ["--model {mamba}", "mamba has no attention heads"]),
    "config-without-model-type": (["--model", "{long_folder}"], ["--model {long_folder}", "`model_type` key"]),
    "config-without-decoder-layers": (["--model", "{no_layers}"],
                                      ["--model {no_layers}", "no decoder layers"]),
    "config-without-positions": (["--model", "{no_positions}"],   # the config's fault, not --seq's
                                 ["--model {no_positions}", "max_position_embeddings -5"]),
    "report-under-proc": (["--report", "/proc/report.json"],
                          ["--report /proc/report.json", "cannot create a file in /proc"]),
    "snapshot-under-proc": (["--snapshot", "/proc/s.pickle"],
                            ["--snapshot /proc/s.pickle", "cannot create a file in /proc"]),
    "snapshot-in-missing-dir": (["--snapshot", "/no/such/dir/s.pickle"],
                                ["--snapshot /no/such/dir/s.pickle", "does not exist"]),
    "reentrant-without-inputs-needing-grad": (
        ["--model", "{tiny}", "--ckpt", "reentrant", "--no-inject-items"],
        ["--ckpt reentrant", "--no-inject-items", "--inject-items"]),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failure_before_training_is_one_line_naming_the_value_with_exit_code_2(case, values, capsys):
    done = ref_train_main(capsys, values, FAILURES[case][0])
    line = one_error_line(done)
    for value in FAILURES[case][1]:
        assert value.format(**values) in line, (value, line)
    assert "step" not in done.stdout   # nothing trained


def test_a_stand_in_with_more_tokens_than_the_model_has_rows_grows_the_embeddings_to_hold_it(values, capsys):
    # The stand-in's 556 tokens and the 4 placeholders: more rows than the model's 500 + 4 added
    done = ref_train_main(capsys, values, ["--model", "{small_vocab}", "--seq", "32"])
    assert done.returncode == 0, done.stderr
    assert "vocabulary: 500 embedding rows, resized to 560 (4 placeholder tokens added)" in done.stdout


def test_positions_below_one_are_named_by_the_key_the_config_file_holds(family_models, tmp_path):
    directory = edited_config(family_models["gpt2"], tmp_path / "gpt2", n_positions=0)
    with pytest.raises(flags.UsageError, match="its config.json gives n_positions 0;"):
        models._read_config(ref_train.parse_args(["--model", str(directory)]))


def test_a_quoted_tilde_in_the_model_path_is_the_home_directory(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "tiny")
    args = ref_train.parse_args(["--model", "~/tiny"])   # as '~/tiny' in quotes leaves it
    assert args.model == str(tmp_path / "tiny") and models._read_config(args).vocab_size > 0


@pytest.mark.parametrize("flags, named", [(["--bs", "0"], "--bs 0"), (["--no-such-flag"], "--no-such-flag")],
                         ids=["bad-value", "unknown-flag"])
def test_a_bad_flag_exits_2_with_one_line_as_a_shell_sees_it(flags, named):
    # The process itself: its exit code, and a stderr with one line, before torch is imported.
    line = one_error_line(run_ref_train(*flags))
    assert line.startswith("ref_train.py: error: ") and named in line, line


# `python ref_train.py ARGS`, then which modules were imported when it stopped.
IMPORTED_BY_THE_SCRIPT = """
import runpy, sys
sys.argv = ["ref_train.py", *sys.argv[1:]]
try:
    runpy.run_path("ref_train.py", run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["--bs", "0"]], ids=" ".join)
def test_help_and_a_bad_value_answer_before_torch_is_imported(argv):
    done = subprocess.run([sys.executable, "-c", IMPORTED_BY_THE_SCRIPT, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.stdout.splitlines()[-2:] == [f"exit {0 if argv == ['--help'] else 2}", "[]"], done


def test_every_flag_reaches_ref_train_through_torchruns_parser():
    # torchrun's parser takes any unambiguous prefix of its own flags, even after the script: a flag
    # of ref_train that is a prefix of one of torchrun's (--r of --rdzv-backend) would never arrive.
    import torch.distributed.run
    torchrun = torch.distributed.run.get_args_parser()
    for flag in flags.build_parser()._option_string_actions:
        if flag.startswith("--") and flag != "--help":
            given = ["ref_train.py", flag, "1"]
            assert torchrun.parse_args(given).training_script_args == given[1:], flag


def test_flags_knows_the_gated_lora_forms_ilora_has():
    assert flags.IMPLS == ilora.IMPLS   # flags.py keeps its own copy: importing ilora imports torch


def test_flags_caps_max_memory_where_the_probe_does():
    assert flags.MAX_MEMORY_MIB == memcheck.MAX_MEMORY_MIB   # (its own copy, likewise)


def test_seq_past_the_models_positions_fails_before_training(values, capsys):
    line = one_error_line(ref_train_main(capsys, values, ["--model", "{tiny}", "--seq", "1000",
                                                          "--report", "{seq_report}"]))
    assert "--seq 1000" in line and "256" in line
    # The run had begun (the probe was measuring loading): its report says how it ended, never
    # a peak of 0 with no error.
    report = memcheck.read_report(values["seq_report"])
    assert report["status"] == "error" and "--seq 1000" in report["error"]
    assert report["steps"] == [] and "forward" not in report["phases"]


def test_ref_train_markdown_block_is_valid_and_says_what_the_text_says(tiny_model, capsys):
    done = run_main(ref_train.main, capsys, "--model", tiny_model, "--steps", 3, "--inject-leak",
                    "--markdown")
    assert done.returncode == 0, done.stderr
    text, block = done.stdout.split("### memcheck")
    assert "- command: `" in block and "torch" in block
    assert_markdown_tables(block)
    said = [line for line in text.splitlines() if line.startswith(("peak ", "at the peak", "WARNING leak"))]
    assert len(said) == 3 and all(line in block.splitlines() for line in said), said
    # the words are fenced as text: an error's __init__ or <lambda> is never read as markdown
    assert block.rstrip().endswith("```") and "```text" in block


def test_report_holds_the_environment_and_command_line(tiny_model, tmp_path, monkeypatch, capsys):
    # The command line as a shell gives it to the process: sys.argv, which main() reads by default.
    path = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "ref_train.py"), "--model", tiny_model,
                                      "--steps", "1", "--lora-r", "4", "--report", str(path)])
    done = run_main(lambda argv: ref_train.main(), capsys)
    assert done.returncode == 0, done.stderr
    report = memcheck.read_report(path)
    assert report["command"].endswith(f"ref_train.py --model {tiny_model} --steps 1 --lora-r 4 --report {path}")
    assert report["config"]["r"] == 4 and report["config"]["model"] == tiny_model
    assert report["env"]["device"] and report["env"]["torch"] == torch.__version__


SMOKE_RUN = ["--bs", "2", "--seq", "128", "--steps", "2", "--report", "{report}"]


def test_full_size_smoke_run(values, capsys):
    # SMOKE_RUN: opt-125m's architecture (random weights: it is not cached here), 2 steps.
    result = run_main(ref_train.main, capsys, *(f.format(**values) for f in SMOKE_RUN))
    assert result.returncode == 0, result.stderr
    assert "step   1 | loss" in result.stdout and "step   2 | loss" in result.stdout
    with open(values["report"]) as f:
        report = json.load(f)
    assert report["schema"] == "memcheck/1"
    for phase in ("load", "forward", "backward", "optimizer"):
        assert report["phases"][phase]["peak_bytes"] > 0, phase
        assert report["phases"][phase]["live_bytes"] > 0, phase
    assert [s["step"] for s in report["steps"]] == [1, 2]
    for s in report["steps"]:
        assert math.isfinite(s["loss"]) and s["seconds"] > 0, s
        assert s["live_bytes"] > 0 and s["peak_bytes"] >= s["live_bytes"], s
    # every flag, whether the batches padded and the embedding rows (terms of the budget the flags do
    # not set)
    assert set(report["config"]) == set(vars(ref_train.parse_args([]))) | {"padded", "vocab_rows"}, \
        "a key is missing"
    assert report["config"]["vocab_rows"] == 50276   # opt-125m's 50,272 rows, 4 placeholder tokens added
    assert report["config"]["bs"] == 2 and report["config"]["seq"] == 128
    import transformers
    assert report["env"]["python"].count(".") == 2
    assert report["env"]["torch"] == torch.__version__
    assert report["env"]["transformers"] == transformers.__version__


# ---------------------------------------------------------------- failures during training

def test_out_of_memory_while_loading_says_the_peak_was_not_measured_and_what_the_run_needs(
        values, capsys, train_tiny):
    # A limit that loading alone passes: the model's own weights do not fit
    done = ref_train_main(capsys, values, ["--model", "{tiny}", "--max-memory", "0.1",
                                           "--report", "{load_report}", "--markdown"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "OUT OF MEMORY in load: " in done.stdout   # (before any step)
    assert "### memcheck: peak not measured (" in done.stdout   # --markdown: no "in None" either
    assert "in None" not in done.stdout and "peak 0.0 MiB" not in done.stdout
    report = memcheck.read_report(values["load_report"])
    assert report["status"] == "oom" and report["oom"]["phase"] == "load"
    assert report["peak_phase"] is None
    # the budget, made on meta as the run would have: what loading ran out before
    needs = train_tiny("--steps", 1)["budget"]["peak_bytes"]
    assert report["budget"]["peak_bytes"] == needs
    live = memcheck.mib(report["oom"]["live_bytes"])
    assert (f"peak: not measured (no training phase finished); the budget for this setup is "
            f"{memcheck.mib(needs)} MiB; the OOM came in load with {live} MiB live") in done.stdout


def test_out_of_memory_while_loading_is_reported_where_no_budget_can_be_made(tiny_model, tmp_path, capsys,
                                                                           monkeypatch):
    def cannot_budget(args):
        raise ref_train.UsageError("--targets q_prj: unknown")   # (as a typo found by the meta build)
    monkeypatch.setattr(ref_train, "plan", cannot_budget)
    path = tmp_path / "load.json"
    done = run_main(ref_train.main, capsys, "--model", tiny_model, "--max-memory", "0.1", "--report", path)
    assert done.returncode == 1 and "OUT OF MEMORY in load: " in done.stdout, done.stderr
    assert memcheck.read_report(path).get("budget") is None


def test_out_of_memory_still_writes_the_report_naming_phase_and_step(tiny_model, train_tiny,
                                                                    tmp_path, capsys):
    # A limit between what loading needs and what training needs: training runs out, loading not.
    fits = train_tiny("--steps", 1)
    assert fits["phases"]["load"]["peak_bytes"] < fits["peak_bytes"]
    limit = (fits["phases"]["load"]["peak_bytes"] + fits["peak_bytes"]) / 2 / memcheck.MiB
    path = tmp_path / "oom.json"
    done = run_main(ref_train.main, capsys, "--model", tiny_model, "--max-memory", limit, "--report", path,
                    "--markdown")
    assert done.returncode == 1
    assert "OUT OF MEMORY in" in done.stdout and "Traceback" not in done.stderr
    # the block for the bug report is printed when it matters most, and says how the run ended
    block = done.stdout[done.stdout.index("### memcheck"):]
    assert any(line.startswith("OUT OF MEMORY in") for line in block.splitlines()), block
    report = memcheck.read_report(path)
    assert report["oom"]["phase"] in ("forward", "backward", "optimizer")
    assert report["oom"]["step"] == 1 and "--max-memory" in report["oom"]["message"]
    assert report["phases"]["load"]["peak_bytes"] > 0   # the table so far is there


def test_out_of_memory_in_process_records_the_phase_writes_the_report_and_prints_it(tiny_model,
                                                                                   train_tiny,
                                                                                   tmp_path):
    # The OOM report path, caught by a second test: in this process, through train() itself.
    fits = train_tiny("--steps", 1)
    limit = (fits["phases"]["load"]["peak_bytes"] + fits["peak_bytes"]) / 2 / MiB
    path, lines = tmp_path / "oom.json", []
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--steps", "1",
                                 "--max-memory", str(limit), "--report", str(path)])
    with pytest.raises(torch.OutOfMemoryError) as caught:
        ref_train.train(args, log=lines.append)
    report = memcheck.read_report(path)
    assert report == json.loads(json.dumps(caught.value.report))
    assert report["status"] == "oom" and report["oom"]["step"] == 1
    assert report["oom"]["phase"] in ("forward", "backward", "optimizer")
    assert report["steps"] == [] and report["phases"]["load"]["peak_bytes"] > 0
    printed = "\n".join(map(str, lines))
    assert f"OUT OF MEMORY in {report['oom']['phase']} at step 1" in printed
    assert f"report written to {path}" in printed
    # the verdict weighs what was live as the allocation failed (the peak so far can be an earlier
    # phase's), as the allocator's message does
    live = memcheck.mib(report["oom"]["live_bytes"])
    assert f"with {live} MiB live:" in report["oom"]["message"]
    assert f"the OOM came in {report['oom']['phase']} with {live} MiB live (" in memcheck.verdict(report)


def test_after_an_oom_the_weights_are_weighed_against_what_the_budget_needs(tiny_model, tmp_path):
    # dead at the first activations of a large batch, the peak so far was the weights: "the weights
    # are 100% of the peak" sent the user to the weights, which are 1% of what the budget needs
    path = tmp_path / "oom.json"
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--steps", "1", "--bs", "64",
                                 "--seq", "256", "--max-memory", "1", "--report", str(path)])
    with pytest.raises(torch.OutOfMemoryError):
        ref_train.train(args, log=lambda *a: None)
    report = memcheck.read_report(path)
    weights = report["categories"]["frozen_params"] + report["categories"]["trainable_params"]
    assert report["oom"]["phase"] == "forward" and 2 * weights > report["peak_bytes"]
    assert "the weights are" not in memcheck.format_report(report)
    # where they are most of what it needs, the line says so
    report["budget"]["peak_bytes"] = weights + 1
    assert memcheck.format_report(report).startswith("the weights are 100% of the budget: ")


def fail_in_forward(monkeypatch, error):
    """Make the loss, inside the forward phase of the first step, raise `error`."""
    def raising(*args, **kwargs):
        raise error
    monkeypatch.setattr(ref_train, "lm_loss", raising)


CPU_ALLOCATION_FAILED = RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                                     "can't allocate memory: you tried to allocate 40000000000000 bytes.")


def test_a_cpu_allocation_failure_is_out_of_memory(tiny_model, tmp_path, monkeypatch, capsys):
    fail_in_forward(monkeypatch, CPU_ALLOCATION_FAILED)
    path = tmp_path / "oom.json"
    flags = ["--model", tiny_model, "--device", "cpu", "--steps", "2", "--report", str(path)]
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        ref_train.train(ref_train.parse_args(flags), log=lambda *a: None)
    report = memcheck.read_report(path)
    assert report["status"] == "oom"
    assert report["oom"]["phase"] == "forward" and report["oom"]["step"] == 1
    assert "can't allocate memory" in report["oom"]["message"]
    path.unlink()
    assert ref_train.main(flags) == 1   # as for CUDA's OutOfMemoryError
    out = capsys.readouterr().out
    assert "OUT OF MEMORY in forward at step 1" in out and f"report written to {path}" in out
    assert memcheck.read_report(path)["status"] == "oom"


def test_any_other_exception_writes_the_report_with_status_error(tiny_model, tmp_path, monkeypatch):
    fail_in_forward(monkeypatch, ValueError("a bug in the loop"))
    path = tmp_path / "error.json"
    args = ref_train.parse_args(["--model", tiny_model, "--device", "cpu", "--steps", "2",
                                 "--report", str(path)])
    with pytest.raises(ValueError, match="a bug in the loop"):
        ref_train.train(args, log=lambda *a: None)
    report = memcheck.read_report(path)
    assert report["status"] == "error" and report["error"] == "ValueError: a bug in the loop"
    assert report["oom"] is None and report["phases"]["load"]["peak_bytes"] > 0


def test_a_reader_that_closes_the_pipe_early_stops_neither_the_run_nor_its_report(tiny_model, tmp_path,
                                                                                   monkeypatch, capsys):
    # `ref_train.py ... | head -2`: head has exited when the first step's line is written.
    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr(sys, "stdout", os.fdopen(write, "w"))
    path = tmp_path / "r.json"
    assert ref_train.main(["--model", tiny_model, "--steps", "3", "--seq", "32", "--report", str(path)]) == 0
    assert memcheck.read_report(path)["status"] == "ok" and len(memcheck.read_report(path)["steps"]) == 3
    assert capsys.readouterr().err == ""


class _CtrlCAfterStepOne(io.StringIO):
    """stdout that presses Ctrl-C (or sends `signum`) once step 1's line is flushed (`where`: "step
    line"; one kept in a buffer would never reach a pipe or `tee` while the run goes on), or inside
    step 2's forward."""

    def __init__(self, where, signum=signal.SIGINT):
        super().__init__()
        self.where, self.signum, self.pressed = where, signum, False

    def press(self):
        if "step   1" in self.getvalue() and not self.pressed:
            self.pressed = True
            signal.raise_signal(self.signum)

    def flush(self):
        if self.where == "step line":
            self.press()


@pytest.mark.parametrize("where, signum", [("step line", signal.SIGINT), ("forward", signal.SIGINT),
                                           ("step line", signal.SIGHUP)],
                         ids=["ctrl-c at the step line", "ctrl-c in forward", "a closed terminal"])
def test_ctrl_c_or_a_hangup_in_training_writes_the_report_so_far_and_exits_128_and_the_signal(
        tiny_model, tmp_path, capsys, where, signum, default_stop_signals):
    path = tmp_path / "interrupted.json"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # Python's own, as in a shell
    stdout = _CtrlCAfterStepOne(where, signum)
    hooks = ([nn.modules.module.register_module_forward_hook(lambda *_: stdout.press())]
             if where == "forward" else [])
    try:
        with contextlib.redirect_stdout(stdout):
            code = ref_train.main(["--model", tiny_model, "--steps", "5", "--report", str(path)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped ref_train.main")
    finally:
        signal.signal(signal.SIGINT, previous)
        for hook in hooks:
            hook.remove()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stdout.pressed and code == 128 + signum, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "interrupted at step 2" in lines[0] and f"report written to {path}" in lines[0]
    report = memcheck.read_report(path)
    assert report["status"] == "interrupted" and report["oom"] is None
    assert report["error"] == ("interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGHUP)")
    assert len(report["steps"]) == 1
    assert "run INTERRUPTED" in stdout.getvalue()


def test_a_hangup_with_its_terminal_gone_still_writes_the_report_and_exits_129(
        tiny_model, tmp_path, monkeypatch, default_stop_signals):
    # a closed SSH session: SIGHUP in step 2, and from then on every write to the terminal fails (EIO)
    controller, terminal = os.openpty()
    steps, train_step = [], ref_train.train_step

    def hung_up_in_step_2(*args):
        steps.append(None)
        if len(steps) == 2:
            os.close(controller)
            signal.raise_signal(signal.SIGHUP)
        return train_step(*args)
    monkeypatch.setattr(ref_train, "train_step", hung_up_in_step_2)
    path = tmp_path / "r.json"
    code = main_writing_to(os.fdopen(terminal, "w"), monkeypatch, ["stdout", "stderr"], tiny_model, path,
                           steps=5)
    report = memcheck.read_report(path)
    assert code == 129 and report["status"] == "interrupted" and report["error"] == "terminated (SIGHUP)"
    assert len(report["steps"]) == 1
