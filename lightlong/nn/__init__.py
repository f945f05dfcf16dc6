"""nn.Modules built on `lightlong.ops`."""

from .attention import LayerCache, LightningAttention, SequenceInfo, SoftmaxAttention
from .layer import DecoderLayer
from .moe import Expert, MoE
from .norm import RMSNorm

__all__ = [
    "DecoderLayer",
    "Expert",
    "LayerCache",
    "LightningAttention",
    "MoE",
    "RMSNorm",
    "SequenceInfo",
    "SoftmaxAttention",
]
