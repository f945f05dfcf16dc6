"""Per-head decay rates of MiniMax-01's lightning attention.

Each head h decays its state by λ_h = exp(-s_h) per token. MiniMax takes s_h from ALiBi's
head slopes and scales them down with depth, so the last layers forget slowest:

    s_h = slope_h · (1 − l / (L − 1) + 1e-5)      (l the layer index of L layers; L = 1: 1 + 1e-5)

slope_h is ALiBi's slope of head h of H, 2^(-8(h+1)/H) for H a power of two. With few heads
every slope is slow: H = 4 gives the first layer per-token factors 0.78 … 0.996 and no head
that remembers only the last token or two, which 64 heads have (0.40 … 0.78 for a quarter of
them). `slope_heads=R` gives head h the slope of head h of R heads instead: the first H heads
of an R-head model (R = H is MiniMax's rule).
"""

from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "decay_rates"]


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al., 2022), as Python floats.

    For H a power of two, slope_h = 2^(-8(h+1)/H). Otherwise the slopes of the nearest
    lower power of two P come first, followed by every other slope of 2P until H are taken.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def decay_rates(
    num_heads: int,
    layer_idx: int,
    num_layers: int,
    device: torch.device | str = "cpu",
    *,
    slope_heads: int | None = None,
) -> torch.Tensor:
    """Decay rates s_h ≥ 0 of one lightning layer, as MiniMax-Text-01 defines them.

    Args:
        num_heads: H, attention heads of the layer.
        layer_idx: l, the layer's global index, 0 ≤ l < num_layers.
        num_layers: L, layers in the whole model.
        device: where the tensor goes (explicit, so a meta-device build gets real rates).
        slope_heads: R ≥ H: head h takes ALiBi's slope of head h of R heads (None or H:
            MiniMax-Text-01's rule).

    Returns:
        float32 tensor [H] of rates s_h (per-token factor exp(-s_h)).
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be an int in [0, {num_layers}), got {layer_idx!r}")
    R = num_heads if slope_heads is None else slope_heads
    if not isinstance(R, int) or isinstance(R, bool) or num_heads > R:
        raise ValueError(f"slope_heads must be an int >= num_heads ({num_heads}), got {R!r}")
    slopes = alibi_slopes(R)[:num_heads]
    depth = 1.0 + 1e-5 if num_layers == 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return torch.tensor(slopes, dtype=torch.float32, device=device) * depth
