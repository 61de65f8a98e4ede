"""iLoRA's own semantics: the gate against its equations written out by hand, and LoRA dropout.

The gate is recomputed without SASRec's module: its one causal block run position by position,
the last valid position found by scanning the padded history, the router's softmax taken with
exp. Histories of every length are padded by data.collate, as the pipeline pads them.
"""
import math

import pytest
import torch
from torch import nn

import data
import ilora

N_EXPERTS = 4
N_ITEMS = 1000


class CharTokenizer:
    """Just enough of a tokenizer for data.collate, whose history padding is what is tested here."""
    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [2 + ord(c) % 50 for c in text]


def item_modules(seed=0):
    torch.manual_seed(seed)
    items = ilora.ItemModules(N_ITEMS, hidden_size=16, n_experts=N_EXPERTS, inject=False)
    # A router far from uniform, so that a wrong user vector moves the gate well past rounding.
    nn.init.normal_(items.router.weight, std=0.5)
    return items


def padded_batch(lengths, seed=0):
    """history [B, MAX_HISTORY] and history_len [B] from data.collate, one sample per length."""
    titles, _ = data.synthetic_catalogue(0, n_items=N_ITEMS, n_users=1)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        chosen = (torch.randperm(N_ITEMS, generator=generator)[:n + data.N_CANDIDATES] + 1).tolist()
        history, candidates = chosen[:n], chosen[n:]
        samples.append(data.Sample(history, candidates, candidates[0]))
    ids = (3, 4, 0)  # history placeholder, candidate placeholder, pad: what collate never reads here
    batch = data.collate(samples, titles, CharTokenizer(), 800, ids)
    return batch["history"], batch["history_len"]


def layer_norm(v, norm):
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + norm.eps) * w + b
            for x, w, b in zip(v, norm.weight.tolist(), norm.bias.tolist())]


def matvec(weight, v, bias=None):
    bias = bias if bias is not None else [0.0] * len(weight)
    return [sum(w * x for w, x in zip(row, v)) + b for row, b in zip(weight, bias)]


def as_lists(linear):
    return linear.weight.double().tolist(), linear.bias.double().tolist()


def sasrec_step_by_step(sasrec, history_row):
    """The user vector of one padded history, in plain Python floats: every position t attends to
    positions 0..t (SASRec is causal), post-norm residual block, ReLU feed-forward."""
    last = max(i for i, item in enumerate(history_row) if item != 0)  # the last valid position
    block, d = sasrec.block, ilora.REC_DIM
    w_q, w_k, w_v = (w.tolist() for w in block.self_attn.in_proj_weight.double().split(d))
    b_q, b_k, b_v = (b.tolist() for b in block.self_attn.in_proj_bias.double().split(d))
    out_proj, linear1, linear2 = (as_lists(m) for m in (block.self_attn.out_proj, block.linear1,
                                                         block.linear2))
    embeddings = sasrec.item_embeddings.weight.double()
    positions = sasrec.positions.weight.double()
    inputs = [(embeddings[item] + positions[t]).tolist() for t, item in enumerate(history_row)]
    keys, values, out = [], [], None
    for t in range(last + 1):
        x = inputs[t]
        keys.append(matvec(w_k, x, b_k))
        values.append(matvec(w_v, x, b_v))
        query = matvec(w_q, x, b_q)
        scores = [sum(q * k for q, k in zip(query, key)) / math.sqrt(d) for key in keys]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        weights = [w / sum(weights) for w in weights]
        mixed = [sum(w * v[i] for w, v in zip(weights, values)) for i in range(d)]
        h = layer_norm([a + b for a, b in zip(x, matvec(out_proj[0], mixed, out_proj[1]))], block.norm1)
        hidden = [max(0.0, v) for v in matvec(linear1[0], h, linear1[1])]
        out = layer_norm([a + b for a, b in zip(h, matvec(linear2[0], hidden, linear2[1]))], block.norm2)
    return out


def gate_by_hand(items, history):
    rows = []
    for history_row in history.tolist():
        user = sasrec_step_by_step(items.sasrec, history_row)
        router_weight, router_bias = as_lists(items.router)
        logits = matvec(router_weight, user, router_bias)
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        rows.append([e / sum(exps) for e in exps])
    return torch.tensor(rows, dtype=torch.float64)


ALL_LENGTHS = list(range(1, ilora.MAX_HISTORY + 1))


# ---------------------------------------------------------------- the gate

def test_the_gate_is_sasrecs_last_valid_position_through_the_routers_softmax():
    items = item_modules()
    history, lengths = padded_batch(ALL_LENGTHS)
    assert history.shape == (len(ALL_LENGTHS), ilora.MAX_HISTORY)
    gate = items.gate(history, lengths)
    expected = gate_by_hand(items, history)
    assert gate.shape == (len(ALL_LENGTHS), N_EXPERTS)
    torch.testing.assert_close(gate.double(), expected, rtol=0, atol=2e-6)
    # and the gate is no constant: each history gets its own
    assert (expected.max(0).values - expected.min(0).values).max() > 0.05


def test_each_gate_row_sums_to_one():
    items = item_modules()
    gate = items.gate(*padded_batch(ALL_LENGTHS))
    assert (gate >= 0).all()
    torch.testing.assert_close(gate.sum(-1), torch.ones(len(ALL_LENGTHS)), rtol=0, atol=1e-6)


def test_a_samples_gate_does_not_depend_on_the_other_samples_in_its_batch():
    items = item_modules()
    history, lengths = padded_batch(ALL_LENGTHS)
    together = items.gate(history, lengths)
    reversed_order = items.gate(history.flip(0), lengths.flip(0)).flip(0)
    torch.testing.assert_close(reversed_order, together, rtol=0, atol=1e-6)
    for i in range(len(history)):
        alone = items.gate(history[i:i + 1], lengths[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)


def test_changing_a_padded_slot_changes_no_gate():
    items = item_modules()
    history, lengths = padded_batch(ALL_LENGTHS)
    before = items.gate(history, lengths)
    changed = history.clone()
    padded = changed == 0
    assert padded.sum() == sum(ilora.MAX_HISTORY - n for n in ALL_LENGTHS)  # zeros pad the end
    changed[padded] = torch.randint(1, N_ITEMS + 1, (int(padded.sum()),),
                                    generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(items.gate(changed, lengths), before, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- LoRA dropout

@pytest.mark.parametrize("n_experts", [1, 4])
@pytest.mark.parametrize("impl", ilora.IMPLS)
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_dropout_in_train_mode_leaves_the_frozen_layers_output_unchanged_at_initialisation(
        n_experts, impl, base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 48).to(base_dtype).requires_grad_(False)
    layer = ilora.GatedLoraLinear(base, r=8, n_experts=n_experts, dropout=0.5, impl=impl,
                                  lora_dtype=torch.float32).train()
    x = torch.randn(3, 5, 32).to(base_dtype)
    gate = torch.randn(3, n_experts).softmax(-1) if n_experts > 1 else None
    assert torch.equal(layer(x, gate=gate), base(x))   # B = 0: the adapter adds exactly nothing
    # ... while the dropout is live: with a non-zero B the adapter's input is dropped at random
    nn.init.normal_(layer.lora_B.weight)
    outputs = [layer(x, gate=gate) for _ in range(2)]
    assert not torch.equal(outputs[0], outputs[1])
