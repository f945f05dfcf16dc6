"""Cross-entropy of a linear head without materialising the logits.

A language model's loss over T positions builds logits [T, V]: at T = 64K with V = 8192 that
is 2 GiB in fp32, and the softmax, its gradient and a copy or two make it several times
that (at MiniMax's V = 200064, 52 GB per copy). `linear_cross_entropy` runs the head and
the loss over chunks of positions and computes the gradients of h and of the weight in the
same pass, so at most one chunk's logits exist at a time and nothing is recomputed.

# N positions, D hidden, V vocabulary
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MiB in fp32


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`, chunk by chunk.

    Equals `linear_cross_entropy_reference` (forward and gradients of h and weight).

    Args:
        h: [N, D] hidden states (any float dtype; bf16 under autocast is fine).
        weight: [V, D] output projection.
        targets: int64 [N]; IGNORE_INDEX (-100) positions carry no loss.
        chunk_size: positions per chunk; None: as many as fit 2^25 logits.

    Returns:
        a scalar (fp32; fp64 for fp64 inputs): the sum of the per-position losses over the
        targets that are not ignored, divided by their number (NaN when all are ignored,
        like F.cross_entropy).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"h must be [N, D] and weight [V, D] with the same D, got {tuple(h.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != h.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [N={h.shape[0]}], got {targets.dtype} "
                         f"{tuple(targets.shape)}")  # fmt: skip
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = _LinearCrossEntropy.apply(h, weight, targets, chunk_size)
    return total / (targets != IGNORE_INDEX).sum()


def linear_cross_entropy_reference(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The plain form: full logits [N, V] (at least fp32), then F.cross_entropy (mean)."""
    return F.cross_entropy(_at_least_fp32(F.linear(h, weight)), targets, ignore_index=IGNORE_INDEX)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of the losses; the backward only scales gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        grad_w = torch.zeros_like(weight, dtype=total.dtype) if want_w else None
        for a in range(0, h.shape[0], chunk_size):
            h_c, t_c = h[a : a + chunk_size], targets[a : a + chunk_size]
            logits = _at_least_fp32(F.linear(h_c, weight))  # [n, V]
            keep = t_c != IGNORE_INDEX
            t_safe = t_c.clamp(min=0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t_safe)[:, 0]) * keep).sum()
            if not (want_h or want_w):
                continue
            # d(loss_i)/d(logits_i) = softmax_i - onehot(t_i), zero where ignored
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, t_safe, torch.full_like(t_safe, -1, dtype=grad.dtype))
            grad.mul_(keep[:, None])
            if want_h:
                grad_h[a : a + chunk_size] = grad.to(h.dtype) @ weight.to(h.dtype)
            if want_w:  # accumulated in fp32 (no per-chunk rounding to a low dtype)
                with torch.autocast(h.device.type, enabled=False):
                    grad_w.addmm_(grad.T, h_c.to(grad.dtype))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_total.to(grad_w.dtype),
            None,
            None,
        )
