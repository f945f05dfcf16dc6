"""nn.Modules built on `lightlong.ops`."""

from .attention import LayerCache, LightningAttention, SequenceInfo, SoftmaxAttention
from .decode import DecodeLinear, decode_layout
from .layer import DecoderLayer
from .moe import Expert, MoE
from .norm import RMSNorm
from .quant import Int8Linear, quantize_int8

__all__ = [
    "DecodeLinear",
    "DecoderLayer",
    "Expert",
    "Int8Linear",
    "LayerCache",
    "LightningAttention",
    "MoE",
    "RMSNorm",
    "SequenceInfo",
    "SoftmaxAttention",
    "decode_layout",
    "quantize_int8",
]
