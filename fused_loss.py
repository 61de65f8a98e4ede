"""The LM head and the mean cross-entropy fused, in chunks of the vocabulary (--loss-chunks).

The logits are made one slice of the vocabulary at a time, for every position at once: a chunk is
1/chunks of them, and the matrix products stay as large as the plain path's (slices of the
positions would stream the whole head weight through the CPU twice per slice). Each chunk's logits
(16-bit under autocast, then fp32, as head(hidden).float() would be) are folded into a running
log-sum-exp and, as in flash attention, into a running softmax-weighted sum of the head's rows,
rescaled when the running maximum grows. The gradient of the loss sum with respect to the hidden
states is then that sum over the log-sum-exp's exponent minus the target's row of the head
(softmax minus one-hot, times the head's weight; zero at ignored labels).

What is kept for backward is that gradient, bs x seq x hidden in the hidden states' dtype, the last
position's zero included: backward only scales it by grad_output / n_targets, and the logits are
never made again. A head that trains (weight or bias) needs the normalised softmax of each chunk,
so then a first pass finds the log-sum-exp and a second makes every chunk's logits again, keeping
the head's fp32 gradient too. Nothing is kept when nothing needs a gradient.
"""
import math

import torch
import torch.nn.functional as F

F32 = torch.float32


def _slices(vocab, chunks):
    return [(int(r[0]), int(r[-1]) + 1) for r in torch.arange(vocab).tensor_split(chunks) if len(r)]


def _logits(h, weight_rows, bias, start, end, compute):
    b = None if bias is None else bias[start:end].to(compute)
    return F.linear(h, weight_rows, b).float()


def _target_logits(h, weight, bias, y, compute):
    """Each position's target logit, as the head's product would round it; and the targets' rows."""
    targets = y.clamp(min=0)
    rows = weight[targets].to(compute)
    target = torch.linalg.vecdot(h.float(), rows.float())
    if bias is not None:
        target += bias[targets].to(compute).float()
    return target.to(compute).float(), rows


def _log_sum_exp(h, weight, bias, slices, compute, weighted):
    """The log-sum-exp of every position's logits; with `weighted`, also accumulate in it the
    softmax-weighted sum of the head's rows (unnormalised: divide by the returned sum_exp)."""
    running_max = torch.full((h.shape[0],), -math.inf, dtype=F32, device=h.device)
    sum_exp = torch.zeros_like(running_max)
    for start, end in slices:
        w = weight[start:end].to(compute)   # cast once per chunk (a copy under autocast)
        z = _logits(h, w, bias, start, end, compute)
        new_max = torch.maximum(running_max, z.amax(dim=1))
        rescale = (running_max - new_max).exp_()[:, None]
        z.sub_(new_max[:, None]).exp_()       # exp(logits - running max), in place
        sum_exp.mul_(rescale[:, 0]).add_(z.sum(dim=1))
        if weighted is not None:
            weighted.mul_(rescale)
            if compute == F32:
                weighted.addmm_(z, w)
            else:
                weighted += torch.mm(z.to(compute), w)
        running_max = new_max
        del z, w
    return running_max + sum_exp.log(), sum_exp


def _second_pass(h, y, valid, weight, bias, slices, compute, lse, grad_h, grad_w, grad_b):
    """d(loss sum) / d(logits), chunk by chunk, folded into the gradients that are not None."""
    for start, end in slices:
        w = weight[start:end].to(compute)
        p = _logits(h, w, bias, start, end, compute).sub_(lse[:, None]).exp_()
        inside = valid & (y >= start) & (y < end)
        p.scatter_add_(1, (y - start).clamp(0, end - start - 1)[:, None], inside[:, None].to(F32).neg())
        p.masked_fill_(~valid[:, None], 0)
        if grad_b is not None:
            grad_b[start:end] = p.sum(dim=0)
        p = p.to(compute)
        if grad_h is not None:
            grad_h.add_(torch.mm(p, w))
        if grad_w is not None:
            grad_w[start:end] = torch.mm(p.t(), h)
        del p, w


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Takes the whole hidden states and labels (bs x seq) and shifts them itself."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, n_targets, chunks, grad_enabled, ignore_index):
        need_h, need_w, need_b = (need and grad_enabled for need in ctx.needs_input_grad[:3])
        kind = hidden.device.type
        # Under autocast the plain path runs the head in autocast's dtype: cast each slice of the
        # head here, and keep autocast out of the rest, whose dtypes are chosen explicitly.
        compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        two_pass = need_w or need_b
        with torch.autocast(kind, enabled=False):
            bs, seq, width = hidden.shape
            h = hidden[:, :-1].to(compute).reshape(-1, width)
            y = labels[:, 1:].reshape(-1)
            valid = y != ignore_index
            slices = _slices(weight.shape[0], chunks)
            target, rows = _target_logits(h, weight, bias, y, compute)
            weighted = torch.zeros(h.shape, dtype=F32, device=h.device) if need_h else None
            lse, sum_exp = _log_sum_exp(h, weight, bias, slices, compute, None if two_pass else weighted)
            total = torch.where(valid, lse - target, 0).sum()
            grad_w = torch.zeros(weight.shape, dtype=F32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=F32, device=bias.device) if need_b else None
            if two_pass:
                _second_pass(h, y, valid, weight, bias, slices, compute, lse, weighted, grad_w, grad_b)
            elif need_h:
                weighted.div_(sum_exp[:, None]).sub_(rows)   # softmax-weighted rows minus the target's
            grad_h = None
            if need_h:
                weighted.masked_fill_(~valid[:, None], 0)
                grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                grad_h[:, :-1] = weighted.view(bs, seq - 1, width)  # the last position predicts nothing
                del weighted
        ctx.save_for_backward(grad_h, grad_w, grad_b, n_targets)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n_targets

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b, n_targets = ctx.saved_tensors
        scale = grad_output / n_targets
        return (None if grad_h is None else grad_h * scale,
                None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0]),
                None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1]),
                None, None, None, None, None)


def chunked_lm_loss(head, hidden, labels, n_targets, chunks, ignore_index):
    """Mean next-token cross-entropy of head(hidden), fused with the head over `chunks` slices."""
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, n_targets, chunks,
                                           torch.is_grad_enabled(), ignore_index)
