"""linear_cross_entropy (the head and the loss chunk by chunk) against full logits, and the
model's loss with and without logits."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from lightlong import HybridConfig, HybridLM
from lightlong.ops import linear_cross_entropy, linear_cross_entropy_reference
from lightlong.ops.loss import IGNORE_INDEX


def make(N: int, D: int, V: int, dtype: torch.dtype, ignore_every: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    w.requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignore_every] = IGNORE_INDEX
    return h, w, t


def loss_and_grads(fn, h, w, t):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


# chunk sizes that divide N, do not, are 1, and exceed N
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000, None])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_full_logits(chunk, dtype, tol):
    h, w, t = make(64, 24, 97, dtype)
    ours = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=chunk), h, w, t)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, t)
    for a, b, name in zip(ours, ref, ("loss", "dh", "dw"), strict=True):
        assert a.dtype == b.dtype
        assert_close(a, b, tol, name)


def test_gradcheck_float64():
    h, w, t = make(11, 5, 13, torch.float64, ignore_every=4)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, t, chunk_size=4), (h, w)
    )


def test_bfloat16_is_as_close_as_the_reference_in_bfloat16():
    h, w, t = make(96, 32, 200, torch.bfloat16)
    exact = loss_and_grads(
        linear_cross_entropy_reference, *(x.double().detach().requires_grad_() for x in (h, w)), t
    )
    ours = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=40), h, w, t)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, t)
    for a, b, e in zip(ours, ref, exact, strict=True):
        assert a.dtype == b.dtype
        err_ours, err_ref = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert err_ours <= 2 * err_ref + 1e-6


def test_autocast_bfloat16_gives_float32_loss_and_input_dtype_gradients():
    h, w, t = make(40, 16, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert_close(loss, linear_cross_entropy_reference(h, w, t), 2e-2, "loss")


def test_only_the_inputs_that_need_it_get_gradients():
    h, w, t = make(20, 8, 30, torch.float64)
    w.requires_grad_(False)
    linear_cross_entropy(h, w, t, chunk_size=6).backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        ours, ref = linear_cross_entropy(h, w, t), linear_cross_entropy_reference(h, w, t)
    assert_close(ours, ref, 1e-12, "loss")


def test_all_ignored_is_nan_like_cross_entropy():
    h, w, t = make(8, 4, 10, torch.float32)
    t[:] = IGNORE_INDEX
    assert torch.isnan(linear_cross_entropy(h, w, t)) and torch.isnan(
        linear_cross_entropy_reference(h, w, t)
    )


@pytest.mark.parametrize(
    ("h", "w", "t", "chunk", "match"),
    [
        ((4, 3), (5, 2), (4,), None, "same D"),
        ((4,), (5, 4), (4,), None, r"h must be \[N, D\]"),
        ((4, 3), (5, 3), (3,), None, "targets must be int64"),
        ((4, 3), (5, 3), (4,), 0, "chunk_size"),
    ],
)
def test_bad_inputs_name_the_argument(h, w, t, chunk, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(
            torch.zeros(h), torch.zeros(w), torch.zeros(t, dtype=torch.int64), chunk_size=chunk
        )


def test_float_targets_are_rejected():
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4))


def test_model_loss_without_logits_equals_loss_from_logits():
    """logits_to_keep=0 (the training path) gives the same loss and parameter gradients as
    the full logits, packed documents and ignored labels included."""
    config = HybridConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = HybridLM(config).double()
    ids = torch.randint(0, config.vocab_size, (1, 150))
    labels = ids.clone()
    labels[0, 40:60] = IGNORE_INDEX
    cu = torch.tensor([0, 33, 100, 150])
    results = []
    for keep in (None, 0):
        model.zero_grad(set_to_none=True)
        out = model(ids, cu_seqlens=cu, labels=labels, logits_to_keep=keep)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.lm_loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_close(loss_b, loss_a, 1e-12, "loss")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], 1e-10, name)
