"""Triton kernels for lightning attention on the GPU (and the CPU interpreter, for tests).

Imported only when a caller asks for backend "triton" (or "auto" on CUDA): the torch path
never imports triton. `fwd.py`, `bwd.py` and `decode.py` hold the kernels by stage;
`function.py` the autograd Function.
"""

from ._common import CHUNK_SIZES, INTERPRETED
from .decode import decode_step
from .function import lightning_attn_triton

__all__ = ["CHUNK_SIZES", "INTERPRETED", "decode_step", "lightning_attn_triton"]
