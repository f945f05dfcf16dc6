"""A weight layout for decoding on the CPU: fp32 projections stored column-major and a
few-row product split across threads.

# N rows (tokens), I in features, O out features, P parts

A decoded token multiplies one row by every projection: matrix-vector products, bound by
how fast the weights stream from memory. On the CPU, torch's fp32 `F.linear` of one row by
a row-major weight [O, I] (MKL's transposed gemv) streams at a fraction of the machine's
bandwidth when I is small (8–9 GB/s at I = 384–512 on a 2-core AMD EPYC; 20 GB/s for a
4096-wide matrix on the same machine), and it runs on one thread. `DecodeLinear` keeps the
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

`decode_layout(model)` converts, in place, the Linear modules a decoded token runs (the
token mixers' projections, the experts', the LM head): `lightlong.infer.Runner` calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.nn.quant import QUANTIZED_OWNERS

MAX_ROWS = 32
"""`DecodeLinear` splits products of at most this many rows (measured above: faster up to
16–32 rows, even at 64)."""

MIN_PART = 32
"""Output columns per part at least: narrower blocks are not worth a thread."""


class DecodeLinear(nn.Linear):
    """An nn.Linear whose weight [O, I] is stored column-major; x [..., I] -> [..., O].

    For at most `MAX_ROWS` rows of fp32 on the CPU the product runs as P column blocks in
    one `torch.bmm` (P = threads, fewer when O is narrow or not divisible); otherwise, or
    when the weight is not column-major (moved, loaded with assign=True), `F.linear`.
    Autograd works either way; state dicts are a Linear's.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        """A DecodeLinear sharing linear's Parameters (tied weights stay tied), its weight
        made column-major in place (`.data`: same values, same shape)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        with torch.no_grad():
            new.weight.data = new.weight.data.t().contiguous().t()
        return new

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        O, Ix = self.out_features, self.in_features
        rows = x.numel() // Ix if Ix else 0
        parts = _parts(O)
        if (
            not 0 < rows <= MAX_ROWS
            or parts == 1
            or w.dtype != torch.float32
            or x.dtype != torch.float32
            or w.device.type != "cpu"
            or w.stride() != (1, O)
        ):
            return F.linear(x, w, self.bias)
        w_PIo = w.t().view(Ix, parts, O // parts).transpose(0, 1)
        y_PNo = torch.bmm(x.reshape(1, rows, Ix).expand(parts, rows, Ix), w_PIo)
        y_NO = y_PNo.view(rows, O) if rows == 1 else y_PNo.transpose(0, 1).reshape(rows, O)
        if self.bias is not None:
            y_NO = y_NO + self.bias
        return y_NO.view(*x.shape[:-1], O)


def _parts(out_features: int) -> int:
    """Column blocks to split O into: the thread count, fewer until they divide O and are
    each at least MIN_PART wide."""
    p = torch.get_num_threads()
    while p > 1 and (out_features % p or out_features // p < MIN_PART):
        p -= 1
    return p


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Replaces, in place, the nn.Linear children a decoded token runs — the token mixers'
    projections, the experts' (and shared expert's) matrices and `lm_head` — with
    `DecodeLinear`s on the same Parameters (a head tied to the embedding stays tied; the
    embedding reads the column-major weight as well). Idempotent; modules already
    replaced, int8 ones and the router are left alone. Returns how many it replaced."""
    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is not nn.Linear:
                continue
            if isinstance(owner, QUANTIZED_OWNERS) or name == "lm_head":
                setattr(owner, name, DecodeLinear.from_linear(child))
                replaced += 1
    return replaced
