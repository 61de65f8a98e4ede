"""iLoRA's own semantics: the gate against its equations written out by hand, the gated LoRA layer
against its formula and against PEFT's LoRA, and LoRA dropout.

The gate is recomputed without SASRec's module: its one causal block run position by position,
the last valid position found by scanning the padded history, the router's softmax taken with
exp. Histories of every length are padded by data.collate, as the pipeline pads them.
"""
import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import budget
import data
import ilora
import memcheck
from conftest import TINY_OPT, rel_err

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


# ---------------------------------------------------------------- the gated LoRA layer

def gated_layer(n_experts=4, impl="lean", r=8, seed=0):
    """A GatedLoraLinear(32 -> 48) with a random, non-zero B: with B = 0 every expert is a no-op."""
    torch.manual_seed(seed)
    layer = ilora.GatedLoraLinear(nn.Linear(32, 48), r=r, n_experts=n_experts, impl=impl)
    nn.init.normal_(layer.lora_B.weight)
    return layer


def random_gate(batch, n_experts, seed=1):
    return torch.randn(batch, n_experts, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def run_with_gradients(layer, x, gate, upstream):
    """Forward, backward with `upstream` as the output's gradient; output and every gradient."""
    x, gate = x.clone().requires_grad_(), gate.clone().requires_grad_()
    y = layer(x, gate=gate)
    y.backward(upstream)
    grads = {"x": x.grad, "gate": gate.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return y, grads


@pytest.mark.parametrize("flatten", [False, True], ids=["batch-seq-features", "flattened-rows"])
def test_lean_equals_einsum_forward_and_gradients(flatten):
    lean = gated_layer(impl="lean")
    einsum = ilora.GatedLoraLinear(nn.Linear(32, 48), r=8, n_experts=4, impl="einsum")
    einsum.load_state_dict(lean.state_dict())
    x = torch.randn(3, 5, 32)
    if flatten:  # OPT's MLP calls its linears on [batch * seq, features]
        x = x.flatten(0, 1)
    gate = random_gate(3, 4)
    upstream = torch.randn(*x.shape[:-1], 48)  # a random output gradient weighs every element

    y_lean, g_lean = run_with_gradients(lean, x, gate, upstream)
    y_einsum, g_einsum = run_with_gradients(einsum, x, gate, upstream)

    assert rel_err(y_lean, y_einsum) <= 1e-5
    assert set(g_lean) == {"x", "gate", "base.weight", "base.bias", "lora_A.weight", "lora_B.weight"}
    for name in g_lean:
        assert g_lean[name].abs().sum() > 0, name  # an all-zero pair would compare equal for nothing
        assert rel_err(g_lean[name], g_einsum[name]) <= 1e-5, name


def test_flattened_rows_are_gated_by_their_own_sample():
    # The same tokens, once as [batch, seq, d] and once flattened: each row must keep its sample's gate.
    layer = gated_layer()
    x, gate = torch.randn(3, 5, 32), random_gate(3, 4)
    assert rel_err(layer(x.flatten(0, 1), gate=gate), layer(x, gate=gate).flatten(0, 1)) <= 1e-6


def test_gated_lora_follows_ilora_formula_expert_by_expert():
    # Written out independently of the implementation: expert e owns rank rows e*r/E..(e+1)*r/E of
    # A and the matching columns of B, and the scaling is alpha / (r / E), not alpha / r.
    r, experts, alpha = 8, 4, 32
    for impl in ilora.IMPLS:
        layer = gated_layer(n_experts=experts, impl=impl, r=r)
        x, gate = torch.randn(3, 5, 32), random_gate(3, experts)
        a, b = layer.lora_A.weight, layer.lora_B.weight
        k = r // experts
        expected = layer.base(x)
        for e in range(experts):
            expert = x @ a[e * k:(e + 1) * k].t() @ b[:, e * k:(e + 1) * k].t()
            expected = expected + alpha / k * gate[:, e, None, None] * expert
        assert rel_err(layer(x, gate=gate), expected) <= 1e-5, impl


def test_different_gates_give_different_outputs_per_sample():
    layer = gated_layer()
    x, gate = torch.randn(2, 5, 32), random_gate(2, 4)
    other = gate.clone()
    other[0] = random_gate(1, 4, seed=7)[0]  # change sample 0's gate only
    y, y_other = layer(x, gate=gate), layer(x, gate=other)
    assert not torch.allclose(y[0], y_other[0])
    assert torch.equal(y[1], y_other[1])  # a sample's output depends on its own gate alone
    with ilora.use_gate(gate):  # the scope supplies the same gate as the argument
        assert torch.equal(layer(x), y)


def test_nested_use_gate_scopes_supply_the_innermost_gate_and_restore_the_outer_one():
    # Mistake: the outermost scope's gate read. A scope opened inside another (a checkpointed
    # layer's recomputation inside train_step's backward scope) must be the one its layers see.
    layer = gated_layer()
    x, outer, inner = torch.randn(2, 5, 32), random_gate(2, 4), random_gate(2, 4, seed=7)
    with ilora.use_gate(outer):
        with ilora.use_gate(inner):
            assert torch.equal(layer(x), layer(x, gate=inner))
        assert torch.equal(layer(x), layer(x, gate=outer))
    assert ilora.current_gate() is None


def test_router_gets_a_gradient_through_use_gate():
    torch.manual_seed(0)
    items = ilora.ItemModules(n_items=50, hidden_size=32, n_experts=4)
    layer = gated_layer()
    lengths = torch.tensor([3, 10])
    history = torch.randint(1, 51, (2, ilora.MAX_HISTORY))
    history[0, 3:] = 0  # padding after the history, as data.collate writes it
    gate = items.gate(history, lengths)
    with ilora.use_gate(gate):
        layer(torch.randn(2, 5, 32)).square().sum().backward()
    assert items.router.weight.grad is not None and items.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in items.sasrec.parameters())  # the encoder stays frozen


def test_several_experts_without_a_gate_raise_a_clear_error():
    with pytest.raises(RuntimeError, match="4 experts needs a gate.*use_gate"):
        gated_layer(n_experts=4)(torch.randn(2, 5, 32))


@pytest.mark.parametrize("n_experts", [1, 4])
def test_a_16_bit_layer_rounds_the_fp32_update_after_scaling_it(n_experts):
    # alpha 24 scales by 3 or 12, which rounding to bf16 before scaling would not give bit for bit
    torch.manual_seed(0)
    base = nn.Linear(32, 48).to(torch.bfloat16).requires_grad_(False)
    layer = ilora.GatedLoraLinear(base, r=8, alpha=24, n_experts=n_experts, lora_dtype=torch.float32)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32).to(torch.bfloat16)
    gate = torch.randn(3, n_experts).softmax(-1) if n_experts > 1 else None
    delta = ilora._lean(layer, x.float(), gate) if gate is not None else layer.lora_B(layer.lora_A(x.float()))
    assert layer.scaling == 24 / (8 / n_experts)
    assert torch.equal(layer(x, gate=gate), base(x) + (delta * layer.scaling).to(torch.bfloat16))


def test_one_expert_needs_no_gate():
    layer = gated_layer(n_experts=1)
    x = torch.randn(2, 5, 32)
    expected = layer.base(x) + layer.scaling * layer.lora_B(layer.lora_A(x))
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert ilora.ItemModules(n_items=50, hidden_size=32, n_experts=1).gate(
        torch.ones(2, ilora.MAX_HISTORY, dtype=torch.long), torch.tensor([3, 3])) is None


def test_gated_lora_on_a_conv1d_equals_it_on_the_same_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)                      # GPT-2's: y = x W + b, W [in 32, out 48]
    nn.init.normal_(conv.weight)
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    assert ilora.is_linear(conv) and ilora.features(conv) == (32, 48) == ilora.features(linear)
    torch.manual_seed(1)
    a = ilora.GatedLoraLinear(conv, r=8, n_experts=4)
    torch.manual_seed(1)
    b = ilora.GatedLoraLinear(linear, r=8, n_experts=4)
    for m in (a, b):
        torch.manual_seed(2)
        nn.init.normal_(m.lora_B.weight)
    x = torch.randn(2, 5, 32)
    gate = torch.softmax(torch.randn(2, 4), dim=-1)
    ya, yb = a(x, gate), b(x, gate)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(a.lora_A.weight.grad, b.lora_A.weight.grad)
    torch.testing.assert_close(a.lora_B.weight.grad, b.lora_B.weight.grad)
    # The budget reads the Conv1D's shape the same way, through the adapter.
    assert budget._features(conv) == (32, 48) and memcheck._adapter(a)[0] is conv


# ---------------------------------------------------------------- one expert is PEFT's LoRA

def test_one_expert_equals_peft_lora_forward_and_gradients():
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(q_proj=nn.Linear(32, 48)))
    torch.manual_seed(1)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj"], lora_dropout=0.0),
        copy.deepcopy(base))
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    assert ilora.add_gated_lora(ours, targets=("q_proj",), r=8, alpha=32, n_experts=1) == ["q_proj"]
    # From the same seed, the adapter starts as PEFT's, bit for bit: A drawn as PEFT draws it, B zero.
    assert torch.equal(ours.q_proj.lora_A.weight, theirs.q_proj.lora_A["default"].weight)
    assert torch.equal(ours.q_proj.lora_B.weight, theirs.q_proj.lora_B["default"].weight)
    assert ours.q_proj.lora_B.weight.abs().sum() == 0
    with torch.no_grad():
        nn.init.normal_(theirs.q_proj.lora_B["default"].weight)
        ours.q_proj.lora_B.weight.copy_(theirs.q_proj.lora_B["default"].weight)

    x = torch.randn(3, 5, 32)
    upstream = torch.randn(3, 5, 48)
    results = []
    for model in (theirs, ours):
        xi = x.clone().requires_grad_()
        y = model(xi)  # no use_gate scope: one expert must not need a gate
        y.backward(upstream)
        results.append((y, xi.grad))
    (y_peft, x_grad_peft), (y_ours, x_grad_ours) = results

    assert rel_err(y_ours, y_peft) <= 1e-5
    assert rel_err(x_grad_ours, x_grad_peft) <= 1e-5
    assert rel_err(ours.q_proj.lora_A.weight.grad, theirs.q_proj.lora_A["default"].weight.grad) <= 1e-5
    assert rel_err(ours.q_proj.lora_B.weight.grad, theirs.q_proj.lora_B["default"].weight.grad) <= 1e-5
    # Both freeze the base layer: only the adapter trains.
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        ["q_proj.lora_A.weight", "q_proj.lora_B.weight"]


@pytest.mark.parametrize("impl", ilora.IMPLS)
def test_one_expert_selected_by_the_gate_is_peft_lora_of_rank_r_over_e(impl):
    # Both forms' scaling, caught by a second test with PEFT as the oracle: a one-hot gate on
    # expert e leaves PEFT's LoRA of rank r/E with the same alpha, so scaling is alpha / (r / E).
    import peft

    r, experts, alpha = 8, 4, 16
    k = r // experts
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(q_proj=nn.Linear(32, 48)))
    ours = copy.deepcopy(base)
    ilora.add_gated_lora(ours, targets=("q_proj",), r=r, alpha=alpha, n_experts=experts, impl=impl)
    nn.init.normal_(ours.q_proj.lora_B.weight)
    x = torch.randn(3, 5, 32)
    for e in range(experts):
        theirs = peft.inject_adapter_in_model(
            peft.LoraConfig(r=k, lora_alpha=alpha, target_modules=["q_proj"]), copy.deepcopy(base))
        with torch.no_grad():
            theirs.q_proj.lora_A["default"].weight.copy_(ours.q_proj.lora_A.weight[e * k:(e + 1) * k])
            theirs.q_proj.lora_B["default"].weight.copy_(ours.q_proj.lora_B.weight[:, e * k:(e + 1) * k])
        gate = torch.zeros(3, experts)
        gate[:, e] = 1
        with ilora.use_gate(gate):
            assert rel_err(ours(x), theirs(x)) <= 1e-5, (impl, e)


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


@pytest.mark.parametrize("n_experts", [1, 4])
def test_lora_dropout_is_off_in_eval_mode(n_experts):
    torch.manual_seed(0)
    base = nn.Linear(32, 48).requires_grad_(False)
    dropped, plain = (ilora.GatedLoraLinear(base, r=8, n_experts=n_experts, dropout=p) for p in (0.5, 0.0))
    nn.init.normal_(dropped.lora_B.weight)
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(3, 5, 32)
    gate = torch.randn(3, n_experts).softmax(-1) if n_experts > 1 else None
    assert not torch.equal(dropped.train()(x, gate=gate), plain.train()(x, gate=gate))
    assert torch.equal(dropped.eval()(x, gate=gate), plain.eval()(x, gate=gate))


@pytest.mark.parametrize("n_experts", [1, 4])
@pytest.mark.parametrize("impl", ilora.IMPLS)
def test_lora_dropout_drops_the_adapters_input_once_as_peft_does_from_the_same_seed(impl, n_experts):
    # Mistake: dropout applied again after A (or in another place than PEFT's: dropout(x), then A,
    # then B). In train mode, from the same seed, both draw the same mask of x: one expert is PEFT's
    # LoRA with the same lora_dropout, a one-hot gate on the last expert PEFT's LoRA of rank r / E.
    import peft

    r, alpha, p = 8, 16, 0.5
    k = r // n_experts
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(q_proj=nn.Linear(32, 48)))
    ours = copy.deepcopy(base)
    ilora.add_gated_lora(ours, targets=("q_proj",), r=r, alpha=alpha, n_experts=n_experts, dropout=p,
                         impl=impl)
    nn.init.normal_(ours.q_proj.lora_B.weight)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=k, lora_alpha=alpha, lora_dropout=p, target_modules=["q_proj"]),
        copy.deepcopy(base))
    with torch.no_grad():
        theirs.q_proj.lora_A["default"].weight.copy_(ours.q_proj.lora_A.weight[-k:])
        theirs.q_proj.lora_B["default"].weight.copy_(ours.q_proj.lora_B.weight[:, -k:])
    gate = torch.zeros(3, n_experts).index_fill_(1, torch.tensor([n_experts - 1]), 1) if n_experts > 1 else None
    x = torch.randn(3, 5, 32)
    outputs = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(3)
        with ilora.use_gate(gate):
            outputs.append(model(x))
    assert rel_err(outputs[0], outputs[1]) <= 1e-5
    assert not torch.allclose(outputs[0], theirs.eval()(x))   # the dropout was live


def test_the_item_projector_is_ilora_s_linear_gelu_linear():
    projector = ilora.ItemModules(n_items=50, hidden_size=32, n_experts=4).projector
    assert [type(m) for m in projector] == [nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in projector[::2]] == [(ilora.REC_DIM, 32), (32, 32)]
    # nn.GELU()'s exact (erf) form, as iLoRA's: not the tanh approximation
    x = torch.randn(3, ilora.REC_DIM)
    assert torch.equal(projector(x), projector[2](nn.functional.gelu(projector[0](x))))


def test_lora_dropout_is_visible_in_the_measured_peak(train_tiny):
    # Mistake: LoRA dropout ignored in the forward. Without checkpointing, each adapted linear keeps
    # its dropped input and the mask (fp32 on CPU) instead of the input its layer already saves:
    # 2 layers x (q, v) x bs x seq x hidden x (4 + 4) bytes, less the shared input.
    flags = ("--ckpt", "none", "--bs", 8, "--seq", 128, "--steps", 1)
    plain, dropped = train_tiny(*flags), train_tiny(*flags, "--dropout", 0.1)
    tokens, h, layers = 8 * 128, TINY_OPT["hidden_size"], TINY_OPT["num_hidden_layers"]
    expected = layers * tokens * (2 * h * (4 + 4) - h * 4)
    grown = dropped["peak_bytes"] - plain["peak_bytes"]
    assert abs(grown / expected - 1) <= 0.03, (grown, expected)
