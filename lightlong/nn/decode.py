"""A weight layout for decoding on the CPU: fp32 projections stored column-major and a
few-row product split across threads.

# N rows (tokens), I in features, O out features, P parts

A decoded token multiplies one row by every projection: matrix-vector products, bound by
how fast the weights stream from memory. On the CPU, torch's fp32 `F.linear` of one row by
a row-major weight [O, I] (MKL's transposed gemv) streams at a fraction of the machine's
bandwidth when I is small (8–9 GB/s at I = 384–512 on a 2-core AMD EPYC; 20 GB/s for a
4096-wide matrix on the same machine), and a second thread does not speed it up.
`DecodeLinear` keeps the
same weight [O, I] with its transpose contiguous ([I, O] in memory: the Parameter is
`wᵀ.contiguous().t()`, same values, same shape) and, for at most `MAX_ROWS` rows, computes
x @ wᵀ as P products over column blocks of O (one `torch.bmm` over views: no copy), which
torch runs one per thread. Measured there, weights streamed from memory (fp32, 2 threads,
x [N, I] @ w [O, I]ᵀ, GB/s of weights read, `F.linear` → split):
    N = 1:  O×I 1536×512  8.7 → 17.5,  512×384  6.9 → 10.7,  8192×512  8.0 → 24.6
    N = 4:  1536×512  6.3 → 9.7,   384×512  5.6 → 10.0
    N = 16: 1536×512  6.0 → 7.3,   512×384  3.1 → 5.0
    N = 64: within ±15 %; bf16: slower split than not (bf16 keeps `F.linear`)
Many rows (prefill, training) run `F.linear` on the column-major weight, which MKL
multiplies as fast as a row-major one. Each output is the same row's dot product, summed
in the kernel's own order: results match `F.linear` to fp32 rounding, not bit for bit.

Projections that read the same input (lightning's qkv_proj and output_gate; softmax's
q/k/v_proj; an expert's w1 and w3) are laid side by side in one buffer, so that
`linear_group` runs them as one product: fewer calls, and a wider matrix streams faster
(at N = 1, 768×512 runs at 14 GB/s where 384×512 runs at 9.5).

`decode_layout(model)` converts, in place, the Linear modules a decoded token runs (the
token mixers' projections, the experts', the LM head): `lightlong.infer.Engine` and
`Runner` call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROWS = 32
"""`DecodeLinear` splits products of at most this many rows (measured above: faster up to
16–32 rows, even at 64)."""

MIN_PART = 32
"""Output columns per part at least: narrower blocks are not worth a thread."""

MIN_SPLIT_BYTES = 256 * 1024
"""Weights smaller than this are not split: they sit in cache, where one `F.linear` is
faster (the split made `tiny`, D = 64, decode 0.84× as fast; benchmarks/decode_layout.py)."""


class DecodeLinear(nn.Linear):
    """An nn.Linear whose weight [O, I] is stored column-major; x [..., I] -> [..., O].

    For at most `MAX_ROWS` rows of fp32 on the CPU and a weight of at least
    `MIN_SPLIT_BYTES` the product runs as P column blocks in one `torch.bmm` (P = threads,
    fewer when O is narrow or not divisible); otherwise, or when the weight is not
    column-major (moved, loaded with assign=True), `F.linear`.
    Autograd works either way; state dicts are a Linear's.
    """

    group: FusedGroup | None = None
    """The linears it shares a buffer with (`fuse_inputs`), itself included; or None."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        """A DecodeLinear sharing linear's Parameters (tied weights stay tied), its weight
        made column-major in place (`.data`: same values, same shape)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.training = linear.training
        for hooks in _HOOKS:  # hooks registered on the Linear keep firing
            getattr(new, hooks).update(getattr(linear, hooks))
        with torch.no_grad():
            new.weight.data = new.weight.data.t().contiguous().t()
        return new

    @classmethod
    def over(cls, weight: Tensor) -> DecodeLinear:
        """A bias-free DecodeLinear over `weight` [O, I] as it is (a frozen Parameter
        sharing its memory: `fuse_inputs`' whole group)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.out_features, new.in_features = weight.shape
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.register_parameter("bias", None)
        return new

    def forward(self, x: Tensor) -> Tensor:
        y = None if torch.compiler.is_compiling() else _split_product(x, self.weight.t())
        if y is None:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): new tensors
        self.group = None  # and the old buffer is not kept alive by the group
        return super()._apply(fn, recurse)


def linear_group(x: Tensor, *linears: nn.Module) -> tuple[Tensor, ...]:
    """(linear(x) for linear in linears), as one product when `decode_layout` put their
    weights side by side in one buffer (`fuse_inputs`) and autograd is off (inference);
    one by one otherwise. x [..., I] -> ([..., O_1], [..., O_2], ...)."""
    group = getattr(linears[0], "group", None)
    if (
        group is not None
        and group.members == linears
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not _hooked(linears)
        and group.holds_weights()
    ):
        return group.whole(x).split(group.sizes, dim=-1)
    return tuple(m(x) for m in linears)


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")  # fmt: skip
"""A module's forward hook dicts (`DecodeLinear.from_linear` carries them over)."""


def _hooked(linears: tuple[nn.Module, ...]) -> bool:
    """Whether a forward hook would see these modules called (then they run one by one)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in linears) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )


@dataclass(frozen=True)
class FusedGroup:
    """Linears of one input whose weights are views of one buffer (`fuse_inputs`)."""

    members: tuple[nn.Module, ...]
    whole: nn.Module
    """One module over the buffers, out_features ΣO: a DecodeLinear (the fp32 weights
    side by side, column-major) or an Int8Linear (the int8 rows and their scales)."""
    views: tuple[tuple[str, tuple[int, ...]], ...]
    """Per tensor name ("weight", "scales"): where each member's starts in the whole's,
    in bytes."""
    sizes: tuple[int, ...]
    """Each member's out_features."""

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of the members holds its own tensors: the copy has no group (its
        `decode_layout` fuses it anew) and no copy of the buffers."""
        return None

    def holds_weights(self) -> bool:
        """Whether the members' tensors are still views of the whole's (not replaced since:
        moved, converted, deep-copied, loaded with assign=True)."""
        for name, offsets in self.views:
            base = getattr(self.whole, name).data_ptr()
            for m, off in zip(self.members, offsets, strict=True):
                if getattr(m, name).data_ptr() != base + off:
                    return False
        return True


def _split_product(x: Tensor, w_IO: Tensor) -> Tensor | None:
    """x [..., I] @ w_IO [I, O] (rows of w_IO contiguous) as P column blocks in one
    `torch.bmm`, for at most MAX_ROWS rows of fp32 on the CPU and weights of at least
    MIN_SPLIT_BYTES; None where that does not apply (the caller multiplies as usual)."""
    I, O = w_IO.shape
    rows = x.numel() // I if I else 0
    if (
        not 0 < rows <= MAX_ROWS
        or x.shape[-1] != I
        or I * O * w_IO.element_size() < MIN_SPLIT_BYTES
        or w_IO.dtype != torch.float32
        or x.dtype != torch.float32
        or w_IO.device.type != "cpu"
        or w_IO.stride(1) != 1
    ):
        return None
    parts = _parts(O)
    if parts == 1:
        return None
    w_PIo = w_IO.unflatten(1, (parts, O // parts)).transpose(0, 1)
    y_PNo = torch.bmm(x.reshape(1, rows, I).expand(parts, rows, I), w_PIo)
    y_NO = y_PNo.view(rows, O) if rows == 1 else y_PNo.transpose(0, 1).reshape(rows, O)
    return y_NO.view(*x.shape[:-1], O)


def _parts(out_features: int) -> int:
    """Column blocks to split O into: the thread count, fewer until they divide O and are
    each at least MIN_PART wide."""
    p = torch.get_num_threads()
    while p > 1 and (out_features % p or out_features // p < MIN_PART):
        p -= 1
    return p


@torch.no_grad()
def fuse_inputs(linears: list[nn.Module]) -> None:
    """Moves the weights of linears that read the same input — DecodeLinears, or
    Int8Linears (`lightlong.nn.quant`) — into one buffer, side by side in this order (each
    member's weight a view of it: same values, same shapes), and marks them as a
    `FusedGroup` for `linear_group`. Column-major [I, ΣO] for DecodeLinears; row-major
    int8 [ΣO, I] and scales [ΣO] for Int8Linears. ValueError if `_fusable` says no."""
    from lightlong.nn.quant import Int8Linear  # quant imports the modules that use this

    if not _fusable(linears):
        raise ValueError("fuse_inputs: needs bias-free DecodeLinears or like Int8Linears")
    sizes = tuple(m.out_features for m in linears)
    if type(linears[0]) is DecodeLinear:
        buffer_IO = torch.cat([m.weight.t() for m in linears], dim=1)
        whole = DecodeLinear.over(buffer_IO.t())
        names = ("weight",)
        for m, (a, b) in zip(linears, _spans(sizes), strict=True):
            m.weight.data = buffer_IO[:, a:b].t()
    else:
        first = linears[0]
        whole = Int8Linear(
            torch.cat([m.weight for m in linears]), torch.cat([m.scales for m in linears]),
            dtype=first.dtype, backend=first.backend,
        )  # fmt: skip
        names = ("weight", "scales")
        for m, (a, b) in zip(linears, _spans(sizes), strict=True):
            m.weight, m.scales = whole.weight[a:b], whole.scales[a:b]
    views = tuple(
        (n, tuple(getattr(m, n).data_ptr() - getattr(whole, n).data_ptr() for m in linears))
        for n in names
    )
    group = FusedGroup(tuple(linears), whole, views, sizes)
    for m in linears:
        m.group = group


def _laid_out_dtype(w: Tensor) -> bool:
    """Whether a weight gets the layout: fp32 on the CPU (where it was measured faster;
    column-major fp16 weights multiply 10× slower there, and on a GPU the layout is
    nothing but a copy)."""
    return w.dtype == torch.float32 and w.device.type == "cpu"


def _spans(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive blocks of these sizes."""
    return [(e - n, e) for n, e in zip(sizes, accumulate(sizes), strict=True)]


def _fusable(linears: list[nn.Module]) -> bool:
    """Whether `fuse_inputs` can take these: all bias-free DecodeLinears, or all
    bias-free Int8Linears of one backend and dtypes, of one in_features; all on the CPU
    (DecodeLinears in fp32)."""
    from lightlong.nn.quant import Int8Linear

    first = linears[0]
    if len(linears) < 2 or any(
        type(m) is not type(first) or m.bias is not None or m.in_features != first.in_features
        for m in linears
    ):
        return False
    if type(first) is DecodeLinear:
        return all(_laid_out_dtype(m.weight) for m in linears)
    return type(first) is Int8Linear and (
        first.weight.device.type == "cpu"
        and len({(m.backend, m.dtype, m.scales.dtype, m.weight.device) for m in linears}) == 1
    )


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Replaces, in place, the nn.Linear children a decoded token runs — the token mixers'
    projections, the experts' (and shared expert's) matrices and `lm_head` — with
    `DecodeLinear`s on the same Parameters (a head tied to the embedding stays tied; the
    embedding reads the column-major weight as well), and lays the weights of each
    module's `FUSED_INPUTS` (projections of one input) side by side in one buffer.

    Only fp32 weights on the CPU are laid out (`_laid_out_dtype`): other dtypes and
    devices keep their Linears; int8 groups (`lightlong.nn.quant`) on the CPU are fused.
    The router is left alone. Idempotent, and it repairs: DecodeLinears whose weights lost
    the layout (a deep copy, `.to()`, a load with assign=True) are laid out again.
    Returns how many Linears it replaced."""
    from lightlong.nn.quant import QUANTIZED_OWNERS  # quant imports the modules that use this

    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if (
                type(child) is nn.Linear
                and (isinstance(owner, QUANTIZED_OWNERS) or name == "lm_head")
                and _laid_out_dtype(child.weight)
            ):
                setattr(owner, name, DecodeLinear.from_linear(child))
                replaced += 1
            elif (
                type(child) is DecodeLinear
                and _laid_out_dtype(child.weight)
                and child.weight.stride(0) != 1
            ):
                child.weight.data = child.weight.data.t().contiguous().t()
        for names in getattr(owner, "FUSED_INPUTS", ()):
            group = [getattr(owner, n, None) for n in names]
            if None in group or not _fusable(group):
                continue  # absent (an ungated layer), a plain Linear, mixed, with a bias
            fused = group[0].group
            if fused is None or fused.members != tuple(group) or not fused.holds_weights():
                fuse_inputs(group)
    return replaced
