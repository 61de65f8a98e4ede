"""Sequential-recommendation samples in LLaRA / iLoRA's hybrid-prompt form, tokenised to fixed shapes.

A sample is a user's history (3 to 10 items), 20 candidates (the true next item and 19 others) and
the answer, the next item's title. The prompt names every item by title followed by a placeholder
token whose embedding is later overwritten by the item's projected vector. Every batch is exactly
bs x seq, so memory depends on the flags alone and never on which users a batch happens to hold.
"""
import os
import random
from dataclasses import dataclass

import torch

from ilora import MAX_HISTORY  # SASRec's position table bounds the history

N_CANDIDATES = 20
MIN_HISTORY = 3
SYNTHETIC_ITEMS = 1000
SYNTHETIC_USERS = 500
IGNORE = -100  # cross_entropy's ignore_index: prompt and padding positions carry no loss

# The real stack adds these four; [HistoryEmb] and [CansEmb] mark where item vectors go.
SPECIAL_TOKENS = ["[PH]", "[HistoryEmb]", "[CansEmb]", "[ItemEmb]"]
PAD_TOKEN = "[PAD]"

_ADJECTIVES = ("Silent Broken Golden Hidden Last Crimson Distant Wild Lost Frozen Midnight Electric "
               "Secret Burning Quiet Endless Savage Gentle Iron Paper").split()
_NOUNS = ("River Empire Garden Stranger Summer Machine Kingdom Promise Harbor Shadow Mirror Planet "
          "Dancer Witness Horizon Island Letter Voyage Circus Signal").split()


class DataError(ValueError):
    """A --data directory that is missing or malformed; the message names the file and line."""


@dataclass
class Sample:
    history: list      # item ids, oldest first
    candidates: list   # item ids, the true next item among them
    target: int        # item id


# ---------------------------------------------------------------- items and users

def synthetic_catalogue(seed=0, n_items=SYNTHETIC_ITEMS, n_users=SYNTHETIC_USERS):
    """Deterministic titles and user histories: {item_id: title}, [Sample]."""
    rng = random.Random(seed)
    titles = {}
    for item in range(1, n_items + 1):
        words = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        if rng.random() < 0.3:
            words = f"The {words} of the {rng.choice(_NOUNS)}"
        titles[item] = f"{words} ({rng.randint(1950, 2023)})"
    samples = []
    for _ in range(n_users):
        items = rng.sample(range(1, n_items + 1), rng.randint(MIN_HISTORY, MAX_HISTORY) + 1)
        samples.append(_sample(items[:-1], items[-1], range(1, n_items + 1), rng))
    return titles, samples


def _sample(history, target, catalogue, rng):
    """catalogue: the item ids to draw negatives from (any sequence; gaps in the ids are fine)."""
    seen = set(history) | {target}
    negatives = []
    while len(negatives) < N_CANDIDATES - 1:
        item = catalogue[rng.randrange(len(catalogue))]  # rng.randint(1, n)'s stream for 1..n
        if item not in seen:
            seen.add(item)
            negatives.append(item)
    candidates = negatives + [target]
    rng.shuffle(candidates)
    return Sample(history, candidates, target)


def movielens_catalogue(directory, seed=0):
    """Titles and samples from a MovieLens-100K directory (u.data and u.item).

    Each user with at least MIN_HISTORY + 1 ratings gives one sample: the last rated item is the
    target, the up to MAX_HISTORY items before it are the history.
    """
    if not os.path.isdir(directory):
        what = "a file, not a directory" if os.path.exists(directory) else "no such directory"
        raise DataError(f"--data {directory}: {what} (expected MovieLens-100K's directory, which holds "
                        "u.data and u.item)")
    titles, first_line = {}, {}
    for line_no, line in _lines(os.path.join(directory, "u.item")):
        fields = line.split("|")
        if len(fields) < 2 or not _is_id(fields[0]) or int(fields[0]) < 1 or not fields[1]:
            # id 0 is the padding id of item_ids and histories
            raise DataError(f"{directory}/u.item line {line_no}: expected 'id|title|...' with an "
                            f"id of 1 or more, got {line[:60]!r}")
        item = int(fields[0])
        if item in titles:
            raise DataError(f"{directory}/u.item line {line_no}: item {item} again (first on line "
                            f"{first_line[item]}); each id is one item")
        titles[item], first_line[item] = fields[1], line_no
    if len(titles) < MAX_HISTORY + N_CANDIDATES:  # fewer could leave no negatives to draw
        raise DataError(f"{directory}/u.item: {len(titles)} items; a sample needs up to "
                        f"{MAX_HISTORY + N_CANDIDATES} distinct ones (history and candidates)")
    # Items are numbered 1..n in id order: the item table is sized by their count, whatever the ids.
    number = {item: n for n, item in enumerate(sorted(titles), 1)}
    titles = {number[item]: title for item, title in titles.items()}
    ratings = {}
    for line_no, line in _lines(os.path.join(directory, "u.data")):
        fields = line.split()
        if len(fields) != 4 or not all(map(_is_id, fields)):
            raise DataError(f"{directory}/u.data line {line_no}: expected 'user item rating "
                            f"timestamp' as integers, got {line[:60]!r}")
        user, item, _, stamp = map(int, fields)
        if item not in number:
            raise DataError(f"{directory}/u.data line {line_no}: item {item} is not in u.item")
        ratings.setdefault(user, []).append((stamp, number[item]))
    rng = random.Random(seed)
    catalogue = sorted(titles)
    samples = []
    for user in sorted(ratings):
        items = [item for _, item in sorted(ratings[user])]
        if len(items) > MIN_HISTORY:
            samples.append(_sample(items[-MAX_HISTORY - 1:-1], items[-1], catalogue, rng))
    if not samples:
        raise DataError(f"{directory}/u.data: no user has more than {MIN_HISTORY} ratings")
    return titles, samples


def _is_id(field):
    return field.isascii() and field.isdigit()  # ('²'.isdigit() holds, and int() refuses it)


def _lines(path):
    if not os.path.isfile(path):
        what = "a directory, not a file" if os.path.isdir(path) else "missing"
        raise DataError(f"{path}: {what} (a MovieLens-100K directory holds the files u.data and u.item)")
    with open(path, encoding="latin-1") as f:  # MovieLens-100K's titles are Latin-1
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield line_no, line.rstrip("\n")


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(titles, rows=None, add_tokens=True):
    """A byte-level BPE trained on the catalogue: the stand-in when the model has no local tokenizer;
    its tokens fit in `rows` embedding rows with the placeholders (--vocab) where it can.

    Deterministic and built in memory in about a second, so there is no file to cache or manage.
    """
    vocab_size = min(4000, max(0, rows - len(SPECIAL_TOKENS) * add_tokens)) if rows else 4000
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [_prompt_text(list(titles.values())[i:i + 10]) for i in range(0, len(titles), 10)]
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>")


def _prompt_text(titles):
    return "This user has watched " + ", ".join(titles) + ". Which movie comes next?"


def add_special_tokens(tokenizer):
    """Add the placeholder tokens (and a pad token if missing); returns how many were added."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return added


def placeholder_ids(tokenizer, added_tokens):
    """Token ids for the history and candidate placeholders, and for padding.

    Without added tokens (--no-add-tokens) the placeholders reuse the end-of-sequence token: the
    vocabulary stays as loaded and injection still knows the positions from how the prompt was built.
    """
    if added_tokens:
        history, candidate = tokenizer.convert_tokens_to_ids(["[HistoryEmb]", "[CansEmb]"])
    else:
        history = candidate = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return history, candidate, pad


# ---------------------------------------------------------------- prompts to tensors

def encode(sample, titles, tokenizer, seq, ids):
    """One sample -> (input_ids, labels, item_ids), each exactly `seq` long.

    item_ids holds the item id at each placeholder position and 0 elsewhere. Pieces are tokenised
    one by one so that every placeholder's position and item are known exactly. Too long a prompt
    is cut from the left and the answer kept; a short one is padded on the right.
    """
    history_id, candidate_id, pad_id = ids
    tokens, items = [], []

    def text(s):
        piece = tokenizer.encode(s, add_special_tokens=False)
        tokens.extend(piece)
        items.extend([0] * len(piece))

    def item(item_id, placeholder):
        text(" " + titles[item_id])
        tokens.append(placeholder)
        items.append(item_id)

    text("This user has watched")
    for i, item_id in enumerate(sample.history):
        if i:
            text(",")
        item(item_id, history_id)
    text(". Choose the movie they will watch next from")
    for i, item_id in enumerate(sample.candidates):
        if i:
            text(",")
        item(item_id, candidate_id)
    text(". Answer:")
    answer = tokenizer.encode(" " + titles[sample.target], add_special_tokens=False)
    answer = (answer + [tokenizer.eos_token_id])[:seq - 1]   # keep at least one prompt token
    tokens, items = tokens[-(seq - len(answer)):], items[-(seq - len(answer)):]
    pad = seq - len(tokens) - len(answer)
    input_ids = tokens + answer + [pad_id] * pad
    labels = [IGNORE] * len(tokens) + answer + [IGNORE] * pad
    return input_ids, labels, items + [0] * (len(answer) + pad), len(tokens) + len(answer)


def batches(samples, titles, tokenizer, bs, seq, ids, seed=0):
    """Endless deterministic batches of exactly bs x seq; shuffled per epoch with `seed`. Each sample
    is encoded once: a batch larger than the data repeats its samples."""
    rng = random.Random(seed)
    order = list(range(len(samples))) * -(-bs // len(samples))
    encoded = {}
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - bs + 1, bs):
            chosen = order[start:start + bs]
            for i in chosen:
                if i not in encoded:
                    encoded[i] = encode(samples[i], titles, tokenizer, seq, ids)
            yield _batch([samples[i] for i in chosen], [encoded[i] for i in chosen], seq)


def collate(samples, titles, tokenizer, seq, ids):
    return _batch(samples, [encode(s, titles, tokenizer, seq, ids) for s in samples], seq)


def _batch(samples, rows, seq):
    """The batch of `samples` from their rows (encode's), made from lists: a probe running on the
    CPU counts no batch made ahead of its step (torch.stack's would be counted)."""
    input_ids, labels, item_ids, lengths = zip(*rows)
    attention_mask = [[1] * n + [0] * (seq - n) for n in lengths]
    history = [s.history + [0] * (MAX_HISTORY - len(s.history)) for s in samples]
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "labels": torch.tensor(labels),
        "item_ids": torch.tensor(item_ids),
        "history": torch.tensor(history),
        "history_len": torch.tensor([len(s.history) for s in samples]),
    }
