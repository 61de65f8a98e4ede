"""iLoRA's gated mixture of LoRA experts, written out by hand.

One LoRA pair per adapted linear layer (lora_A: in -> r, lora_B: r -> out). Expert e owns the rank
slice e*r/E .. (e+1)*r/E, and a per-sample gate g [batch, E] mixes the experts:

    y = W x + b + scaling * sum_e g_e * B_e A_e dropout(x),    scaling = alpha / (r / E)

"einsum" materialises every expert's output [batch, seq, E, out] as iLoRA does; "lean" uses
sum_e g_e B_e A_e x = B (concat_e g_e A_e x): it gates the rank slices of A x and applies B once,
so it stores no more than plain LoRA. With one expert both are PEFT's LoRA and need no gate.

The gate comes from the user's item history: a frozen SASRec-like encoder gives a 64-d user vector,
one router shared by all layers turns it into E weights. A projector maps the same encoder's item
vectors to the language model's hidden size; they replace the embeddings at the placeholder tokens.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("lean", "einsum")
REC_DIM = 64  # SASRec's hidden size in iLoRA
MAX_HISTORY = 10

# The gate of the sample batch being computed. It lives only inside a use_gate() scope, never on a
# module, so nothing from one step can survive into the next through the LoRA layers.
_gate_stack = []


@contextlib.contextmanager
def use_gate(gate):
    """Supply `gate` [batch, E] to every GatedLoraLinear called inside this scope."""
    _gate_stack.append(gate)
    try:
        yield gate
    finally:
        _gate_stack.pop()


def current_gate():
    return _gate_stack[-1] if _gate_stack else None


class GatedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, r=8, alpha=32, n_experts=4, dropout=0.0, impl="lean",
                 lora_dtype=None):
        super().__init__()
        if r < 1 or r % n_experts:
            raise ValueError(f"r={r} must be a positive multiple of n_experts={n_experts}")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
        self.base = base
        self.r, self.n_experts, self.impl = r, n_experts, impl
        self.scaling = alpha / (r / n_experts)
        # PEFT's names (lora_dropout, lora_A, lora_B): memcheck's diff aligns the two LoRAs by them
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=lora_dtype or base.weight.dtype)
        d_in, d_out = features(base)  # a Conv1D's weight is [in, out]: its shape is not read here
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)
        # PEFT's initialisation: the adapter starts as an exact no-op.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x, gate=None):
        result = self.base(x)
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        if self.n_experts == 1:
            delta = self.lora_B(self.lora_A(x))
        else:
            gate = gate if gate is not None else current_gate()
            if gate is None:
                raise RuntimeError(f"GatedLoraLinear with {self.n_experts} experts needs a gate: "
                                   "call it inside ilora.use_gate(gate) or pass gate=")
            delta = (_lean if self.impl == "lean" else _einsum)(self, x, gate)
        return result + (delta * self.scaling).to(result.dtype)

    def extra_repr(self):
        return f"r={self.r}, n_experts={self.n_experts}, scaling={self.scaling:g}, impl={self.impl}"


def _per_sample(a, gate, n_experts):
    # Decoder layers may flatten [batch, seq, d] to [batch * seq, d] (OPT's MLP does): regroup the
    # rows by sample, so that the gate [batch, E] broadcasts over each sample's tokens.
    return a.reshape(gate.shape[0], -1, n_experts, a.shape[-1] // n_experts), gate.to(a.dtype)


def _lean(layer, x, gate):
    a, gate = _per_sample(layer.lora_A(x), gate, layer.n_experts)  # [B, T, E, r/E]
    gated = (a * gate[:, None, :, None]).reshape(*x.shape[:-1], layer.r)
    return layer.lora_B(gated)


def _einsum(layer, x, gate):
    # iLoRA's form: every expert's output [batch, seq, E, out] is materialised and saved.
    a, gate = _per_sample(layer.lora_A(x), gate, layer.n_experts)  # [B, T, E, r/E]
    b = layer.lora_B.weight.t().unflatten(0, (layer.n_experts, -1))  # [E, r/E, out]
    per_expert = torch.einsum("btek,eko->bteo", a, b)
    delta = (per_expert * gate[:, None, :, None]).sum(dim=2)
    return delta.reshape(*x.shape[:-1], -1)


def add_gated_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=32, n_experts=4, dropout=0.0,
                   impl="lean", lora_dtype=None):
    """Replace every linear layer named like a target by a GatedLoraLinear, freeze everything else.

    targets: leaf names ("q_proj"), or the single name "all-linear" for every linear layer inside the
    decoder layers (nn.Linear, and transformers' Conv1D: GPT-2's). Returns the qualified names of the
    replaced layers.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = _in_decoder_layers(model)
    replaced = []
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if not is_linear(module) or module is head:  # any nn.Module, not only HF's
            continue
        if leaf in wanted or ("all-linear" in wanted and inside(name)):
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, GatedLoraLinear(module, r, alpha, n_experts, dropout, impl,
                                                  lora_dtype))
            replaced.append(name)
    return replaced


def linear_names(model):
    """The leaf names of the linear layers inside the decoder layers (what targets may name)."""
    inside = _in_decoder_layers(model)
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if is_linear(m) and inside(n)})


def is_linear(module):
    """nn.Linear, or transformers' Conv1D (GPT-2's y = x W + b, W [in, out]), duck-typed."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def features(module):
    """(in, out) features of a linear layer: a Conv1D keeps its weight as [in, out] (out = nf)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf


def _in_decoder_layers(model):
    """name -> whether the module is inside a decoder layer: inside the ModuleList as long as the
    config's layer count (model.layers, transformer.h, gpt_neox.layers), else inside any `.layers.`."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if n_layers and name and isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return lambda n, prefix=name + ".": n.startswith(prefix)
    return lambda n: ".layers." in f".{n}"


def fused_experts(model):
    """Modules inside the decoder layers whose own weights have 3 or more dimensions: experts fused
    into one tensor (Mixtral's in transformers 5), which are not linear layers and are not adapted."""
    inside = _in_decoder_layers(model)
    return [(n, type(m).__name__) for n, m in model.named_modules()
            if inside(n) and any(p.dim() >= 3 for p in m.parameters(recurse=False))]


class SASRec(nn.Module):
    """A small SASRec-like user encoder: item embeddings + one causal self-attention block.

    Frozen, as in iLoRA where it is pre-trained; its weights here are seeded, which changes no memory.
    """

    def __init__(self, n_items, dim=REC_DIM, max_len=MAX_HISTORY):
        super().__init__()
        self.item_embeddings = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.positions = nn.Embedding(max_len, dim)
        self.block = nn.TransformerEncoderLayer(dim, nhead=1, dim_feedforward=dim, dropout=0.0,
                                                batch_first=True)

    def forward(self, history, lengths):
        """history [B, max_len] item ids (0 pads the end), lengths [B] -> user vectors [B, dim]."""
        steps = history.shape[1]
        h = self.item_embeddings(history) + self.positions.weight[:steps]
        causal = torch.triu(torch.full((steps, steps), float("-inf"), device=h.device), 1)
        h = self.block(h, src_mask=causal)
        return h[torch.arange(len(h), device=h.device), lengths - 1]


class ItemModules(nn.Module):
    """Everything iLoRA adds around the LoRA layers: the frozen encoder, the router, the projector."""

    def __init__(self, n_items, hidden_size, n_experts, inject=True):
        super().__init__()
        # One router for all layers (iLoRA's is a small conv stack ending in Linear(64 -> E)).
        self.router = nn.Linear(REC_DIM, n_experts) if n_experts > 1 else None
        # Without injection there is no projector at all: no parameters that are never trained.
        self.projector = nn.Sequential(nn.Linear(REC_DIM, hidden_size), nn.GELU(),
                                       nn.Linear(hidden_size, hidden_size)) if inject else None
        needed = self.router is not None or inject
        self.sasrec = SASRec(n_items).requires_grad_(False) if needed else None

    def gate(self, history, lengths):
        """[B, E] expert weights, or None with one expert (plain LoRA needs none)."""
        if self.router is None:
            return None
        with torch.no_grad():
            user = self.sasrec(history, lengths)
        return F.softmax(self.router(user), dim=-1)

    def inject(self, embeds, item_ids):
        """Overwrite embeds [B, L, H] where item_ids [B, L] is non-zero with projected item vectors."""
        where = item_ids.nonzero(as_tuple=True)
        with torch.no_grad():
            item_vectors = self.sasrec.item_embeddings(item_ids[where])
        projected = self.projector(item_vectors.to(self.projector[0].weight.dtype))
        # index_put is on autocast's promote list, whose CUDA rule refuses a bf16 tensor under fp16
        # autocast (iLoRA's bf16 weights under 16-mixed); both sides already share one dtype here.
        with torch.autocast(embeds.device.type, enabled=False):
            return embeds.index_put(where, projected.to(embeds.dtype))
