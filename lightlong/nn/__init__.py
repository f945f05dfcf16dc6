"""nn.Modules built on `lightlong.ops`."""

from .attention import LightningAttention, SequenceInfo, SoftmaxAttention
from .layer import DecoderLayer
from .moe import Expert, MoE
from .norm import RMSNorm

__all__ = [
    "DecoderLayer",
    "Expert",
    "LightningAttention",
    "MoE",
    "RMSNorm",
    "SequenceInfo",
    "SoftmaxAttention",
]
