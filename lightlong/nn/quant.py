"""int8 weight-only quantization for inference, gpt-fast style: each projection and expert
weight is stored as int8 with one symmetric scale per output channel; activations stay float.

# N rows (tokens), I in features, O out features

    s_O = max_i |w_OI| / 127        q_OI = clamp(round(w_OI / s_O), −127, 127)   (int8)
    y_NO = x_NI @ (q_OI · s_O)ᵀ = (x_NI @ q_OIᵀ) · s_O

The scales are stored in bf16 for fp32 and bf16 weights (the CPU kernel's dtype; fp16 and
fp64 weights keep their own) and q is rounded against the stored scale, so rounding s costs
no accuracy: |w − q·s| ≤ s/2 either way.

Two ways to run `Int8Linear` (`backend`):
- "int8pack": `torch._weight_int8pack_mm` (CPU), which reads the int8 weight directly: a
  decoded token moves a quarter of the fp32 weight bytes. It takes bf16 (or fp16)
  activations with scales of that dtype, accumulates in fp32 and rounds its output to bf16:
  fp32 inputs are rounded to bf16 and the output cast back. With bf16 it needs I % 16 == 0
  (torch 2.13 crashes or reads out of bounds otherwise). Its cost grows with N like N
  matrix-vector products: past ~8 rows a dense matmul is faster.
- "torch": `F.linear(x, q.to(x.dtype)) · s`, on any device and dtype: x @ (q · s)ᵀ up to
  the rounding of x's dtype. On CUDA this is gpt-fast's path (fast under torch.compile).
- "auto" (the default): "int8pack" on the CPU for at most `KERNEL_MAX_ROWS` rows when it
  takes x, "torch" otherwise (decode runs the kernel, prefill the dense matmul); logged at
  debug level.

`quantize_int8(model)` replaces the token mixers' projections, the experts' (and shared
expert's) matrices and an untied LM head; the embedding (and a head tied to it), norms,
router and shared-expert coefficient stay in the model's dtype. A quantized model is for
inference only.

State dicts (and so `save_pretrained`) hold the dequantized weight q · s, in the dtype of
the weight it replaced (`Int8Linear.dtype`, which follows `module.to(dtype)`), under the
Linear's own key: the checkpoint is an ordinary float one, and quantizing it again gives the
same int8 weights and scales (each row's largest |q| is 127, so s is recovered). Loading a
float weight into an `Int8Linear` quantizes it.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.nn.attention import CosformerAttention, LightningAttention, SoftmaxAttention
from lightlong.nn.decode import FusedGroup
from lightlong.nn.moe import Expert, SharedMLP

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "int8pack", "torch")
"""How an `Int8Linear` runs (see the module docstring)."""

QUANTIZATIONS = ("none", "int8")
"""Values of the commands' --quantize."""

KERNEL_MAX_ROWS = 8
"""backend="auto" runs the int8pack kernel for at most this many rows (x.numel() / I).
Measured at I = 512, O = 384 and 1536, one thread: at 1 row the kernel is 1.6x (fp32
input) and 5x (bf16) faster than the dense matmul, at 8 rows still faster, from 16 slower."""

QUANTIZED_OWNERS = (LightningAttention, CosformerAttention, SoftmaxAttention, Expert, SharedMLP)
"""Modules whose nn.Linear children `quantize_int8` replaces (LocalAttention is a
SoftmaxAttention). Their forward calls the projections as modules, never their .weight."""

_QMAX = 127


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in for weights of `dtype` (the kernel's, bf16, for fp32
    and bf16 weights; the weights' own otherwise)."""
    return torch.bfloat16 if dtype in (torch.float32, torch.bfloat16) else dtype


def quantize_weight(w: Tensor, scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """w [O, I] float -> (q [O, I] int8, s [O] in `scale_dtype`, default
    `scale_dtype_for(w.dtype)`).

    Symmetric per output channel: s = max |w_row| / 127 rounded to scale_dtype, then
    q = round(w / s) against that stored s, clamped to [-127, 127]. An all-zero row gets the
    dtype's smallest positive normal scale and q = 0."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float weight [O, I], got {w.dtype} {tuple(w.shape)}")
    scale_dtype = scale_dtype_for(w.dtype) if scale_dtype is None else scale_dtype
    w32 = w.detach().to(torch.promote_types(w.dtype, torch.float32))
    s_O = (w32.abs().amax(dim=1) / _QMAX).to(scale_dtype)
    s_O = s_O.clamp(min=torch.finfo(scale_dtype).tiny)
    q_OI = torch.round(w32 / s_O.to(w32.dtype)[:, None]).clamp_(-_QMAX, _QMAX)
    return q_OI.to(torch.int8).contiguous(), s_O  # row-major whatever w's layout


class Int8Linear(nn.Module):
    """y = x @ (q · s)ᵀ (+ bias): an inference-only nn.Linear with an int8 weight [O, I] and
    per-output-channel scales [O] (buffers `weight`, `scales`, `bias` or None).

    x [..., I] -> [..., O] in x's dtype. `dtype`: the float dtype of the weight it stands
    for (state dicts, `dequantize`); default the scales'. `backend`: "auto", "int8pack" or
    "torch" (module docstring). model.train() on a model holding one raises ValueError.
    """

    group: FusedGroup | None = None
    """The Int8Linears it shares its buffers with (`lightlong.nn.decode.fuse_inputs`), or
    None."""

    def __init__(
        self,
        weight: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(
                f"weight must be int8 [O, I], got {weight.dtype} {tuple(weight.shape)}"
            )
        O, I = weight.shape
        if scales.shape != (O,) or not scales.is_floating_point():
            raise ValueError(f"scales must be float [O] = [{O}], got {scales.dtype} "
                             f"{tuple(scales.shape)}")  # fmt: skip
        if bias is not None and bias.shape != (O,):
            raise ValueError(f"bias must be [O] = [{O}], got {tuple(bias.shape)}")
        self.in_features, self.out_features = I, O
        self.backend = check_backend(backend)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach())
        # empty, so that its dtype follows module.to(dtype) like the float weight's would
        dtype = scales.dtype if dtype is None else dtype
        self.register_buffer("_like", torch.empty(0, dtype=dtype, device=weight.device),
                             persistent=False)  # fmt: skip
        self.training = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: str = "auto") -> Int8Linear:
        """The int8 version of `linear`, on its device (bias kept as it is)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"expected an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError("cannot quantize a Linear on the meta device: it holds no weights")
        with torch.no_grad():
            q, s = quantize_weight(linear.weight)
        return cls(q, s, linear.bias, dtype=linear.weight.dtype, backend=backend)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the weight this module stands for."""
        return self._like.dtype

    def dequantize(self) -> Tensor:
        """The float weight q · s [O, I] in `dtype`."""
        wide = torch.promote_types(self.dtype, torch.float32)  # q · s exactly, then rounded
        return (self.weight.to(wide) * self.scales.to(wide)[:, None]).to(self.dtype)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(): new tensors
        self.group = None  # and the old buffers are not kept alive by the group
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Int8Linear:
        if mode:
            raise ValueError(
                "Int8Linear is inference-only: its int8 weights cannot be trained; train the "
                "float model and quantize it afterwards"
            )
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., I] -> [..., O] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got {tuple(x.shape)}")
        x_NI = x.reshape(-1, self.in_features)
        if self._use_kernel(x_NI):
            # bf16 (fp16) activations and output, fp32 accumulation inside
            x_k = x_NI.to(self.scales.dtype).contiguous()
            y_NO = torch._weight_int8pack_mm(x_k, self.weight, self.scales).to(x.dtype)
        else:
            y_NO = F.linear(x_NI, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y_NO = y_NO + self.bias.to(x.dtype)
        return y_NO.view(*x.shape[:-1], self.out_features)

    def _use_kernel(self, x_NI: Tensor) -> bool:
        if self.backend == "torch":
            return False
        why = self._kernel_refusal(x_NI)
        if self.backend == "int8pack":
            if why:
                raise ValueError(f"Int8Linear backend='int8pack': {why}; use 'auto' or 'torch'")
            return True
        use = not why and x_NI.shape[0] <= KERNEL_MAX_ROWS
        if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
            logger.debug("Int8Linear: backend 'auto' -> %r for %d rows of %s on %s",
                         "int8pack" if use else "torch", x_NI.shape[0], x_NI.dtype,
                         x_NI.device)  # fmt: skip
        return use

    def _kernel_refusal(self, x_NI: Tensor) -> str:
        """Why the int8pack kernel cannot take x [N, I] ('' when it can)."""
        if x_NI.device.type != "cpu":
            return f"torch._weight_int8pack_mm runs on the CPU here, x is on {x_NI.device}"
        kernel = torch.float16 if x_NI.dtype == torch.float16 else torch.bfloat16
        if x_NI.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"it takes float32, bfloat16 or float16 x, got {x_NI.dtype}"
        if self.scales.dtype != kernel:
            return f"for {x_NI.dtype} x it needs {kernel} scales, these are {self.scales.dtype}"
        if kernel == torch.bfloat16 and self.in_features % 16:
            return (
                f"with bfloat16 activations it needs in_features % 16 == 0, not {self.in_features}"
            )
        return ""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # an ordinary Linear's entries: the dequantized weight (module docstring)
        destination[prefix + "weight"] = self.dequantize()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        w = state_dict.get(prefix + "weight")
        if isinstance(w, Tensor) and w.is_floating_point() and w.dim() == 2:
            q, s = quantize_weight(w.to(self.weight.device), self.scales.dtype)
            state_dict = {**state_dict, prefix + "weight": q, prefix + "scales": s}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        scales = str(self.scales.dtype).removeprefix("torch.")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scales={scales}, backend={self.backend!r}"
        )


def check_backend(backend: str) -> str:
    """`backend` if it is one of BACKENDS, else ValueError naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


@torch.no_grad()
def quantize_int8(
    model: nn.Module, *, skip: Iterable[str] = (), backend: str = "auto"
) -> nn.Module:
    """Replaces, in place, every nn.Linear child of the token mixers (qkv_proj,
    output_gate, out_proj; q/k/v/o_proj) and of the experts (w1, w2, w3; the shared
    expert's gate/up/down_proj) with an `Int8Linear`; returns `model`.

    An untied `lm_head` is quantized too; the embedding (and a head tied to it), norms,
    router (`MoE.gate`) and shared-expert `coefficient` are left as they are. `skip`:
    fnmatch patterns of qualified module names to leave in float too (e.g.
    "model.layers.*.block_sparse_moe.experts.*", "lm_head"). The model must be in eval mode
    with its weights in memory; ValueError naming the problem otherwise (training mode, the
    meta device, an already quantized model, or nothing to quantize).
    """
    check_backend(backend)
    if model.training:
        raise ValueError(
            "quantize_int8: the model is in training mode; int8 weights are for inference "
            "and cannot be trained: call model.eval() first"
        )
    if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            "quantize_int8: the model is on the meta device (no weights to quantize); load "
            "its weights first"
        )
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("quantize_int8: the model is already int8-quantized")
    patterns = [skip] if isinstance(skip, str) else list(skip)
    found = replaced = 0
    for owner_name, owner in list(model.named_modules()):
        for name, child in list(owner.named_children()):
            if not isinstance(child, nn.Linear) or not _quantizable(owner, name, child):
                continue
            found += 1
            qualified = f"{owner_name}.{name}" if owner_name else name
            if any(fnmatch.fnmatchcase(qualified, p) for p in patterns):
                continue
            setattr(owner, name, Int8Linear.from_linear(child, backend=backend))
            child.group = None  # a decode-layout group's buffer goes with its last member
            replaced += 1
    if not found:
        raise ValueError(
            "quantize_int8: the model has no token-mixer projection or expert nn.Linear to "
            f"quantize (looked in {', '.join(c.__name__ for c in QUANTIZED_OWNERS)})"
        )
    logger.info("quantize_int8: %d of %d Linear modules to int8", replaced, found)
    return model


def _quantizable(owner: nn.Module, name: str, child: nn.Linear) -> bool:
    """Whether `quantize_int8` replaces owner.name: a token mixer's or an expert's Linear,
    or an LM head not tied to the embedding (int8 changes held-out perplexity by < 0.01 %
    there, docs/quantization.md, and it is a sixth of a small model's decode bytes)."""
    if isinstance(owner, QUANTIZED_OWNERS):
        return True
    tied = any(  # shared storage, not only the same Parameter (load_state_dict(assign=True))
        child.weight.data_ptr() == m.weight.data_ptr()
        for m in owner.modules()
        if isinstance(m, nn.Embedding)
    )
    return name == "lm_head" and not tied


def quantize(model: nn.Module, method: str) -> nn.Module:
    """`model` quantized as `method` names (QUANTIZATIONS: "none" leaves it as it is);
    ValueError naming the valid methods otherwise."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {list(QUANTIZATIONS)}, got {method!r}")
    return quantize_int8(model) if method == "int8" else model
