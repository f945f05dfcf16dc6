"""`HybridLM`: embeddings -> decoder layers (lightning / softmax mixers, MoE) -> norm -> LM head.

# B batch, T tokens, D model dim, V vocab, N packed sequences
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightlong.model.config import LINEAR_TYPES, HybridConfig
from lightlong.nn import DecoderLayer, Expert, LayerCache, RMSNorm, SequenceInfo
from lightlong.ops.attention import positions_in_sequence, rotary_cos_sin
from lightlong.ops.loss import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from lightlong.ops.varlen import check_cu_seqlens
from lightlong.parallel import SequenceSplit, split_next_token_targets

if TYPE_CHECKING:
    from lightlong.tokenizer import Tokenizer


@dataclass
class LMOutput:
    """What `HybridLM.forward` returns."""

    logits: Tensor
    """[B, T', V] for the positions asked for (all, the last k, or given indices)."""
    loss: Tensor | None = None
    """lm_loss + router_aux_loss_coef · aux_loss (lm_loss with a cache), given labels."""
    lm_loss: Tensor | None = None
    """Mean next-token cross-entropy over labels != -100 (fp32)."""
    aux_loss: Tensor | None = None
    """MoE load-balancing loss averaged over layers (fp32); None with a cache (unless split)."""


class HybridBackbone(nn.Module):
    """Token embeddings, the decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class HybridLM(nn.Module):
    """A MiniMax-01-style causal language model of any size."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config.validate()
        self.model = HybridBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()
        self.gradient_checkpointing = False
        """Recompute each layer in the backward instead of keeping its activations."""
        self.fp32_lm_head = False
        """Compute the LM head (logits and loss) in fp32 from low-precision weights and
        hidden states: MiniMax-M1 found bf16 logits skew token probabilities enough to break
        RL; costs one fp32 copy of the head per call."""
        self._decode_layers: list[nn.Module] | None = None  # `compile_decode`
        self._rotates = any(t not in LINEAR_TYPES for t in config.layer_types)
        """Some layer applies RoPE: the forward builds the rotary tables."""

    def compile_decode(self, enable: bool = True, **compile_kwargs) -> HybridLM:
        """Runs decode steps (one token per row, with a cache, no autograd) through
        `torch.compile`d layers and experts (fused elementwise kernels, far fewer Python
        calls per token); prefill, training and every other call stay eager. The compiled
        step computes what the eager one does (tested equal to fp32 rounding); the first
        steps compile (tens of seconds on a CPU), and a new batch size compiles once more.
        `enable=False` goes back to eager. Returns self.

        compile_kwargs go to `torch.compile` (default dynamic=False: every decode step has
        the same shapes, apart from the softmax layers' KV, which is attended eagerly).
        Each layer is its own graph per batch size: this raises dynamo's global recompile
        limits to hold them (left raised), and a pool whose batch size keeps changing
        compiles once per size.
        """
        moes = [layer.block_sparse_moe for layer in self.model.layers]
        if not enable:
            self._decode_layers = None
            for moe in moes:
                moe.decode_experts = None
            return self
        compile_kwargs.setdefault("dynamic", False)
        # Every layer runs DecoderLayer.forward with its own constants (index, residual
        # scales, decay): one graph each, for each batch size, over dynamo's default of 8.
        limits = torch._dynamo.config
        limits.recompile_limit = max(limits.recompile_limit, 4 * len(moes) + 8)
        limits.accumulated_recompile_limit = max(
            limits.accumulated_recompile_limit, 16 * len(moes) + 64
        )
        self._decode_layers = [torch.compile(x, **compile_kwargs) for x in self.model.layers]
        for moe in moes:
            if moe.expert_parallel is None:
                moe.decode_experts = [torch.compile(e, **compile_kwargs) for e in moe.experts]
        return self

    def tie_weights(self) -> None:
        """Shares the embedding with the LM head when the config says so (again after
        `to_empty`, which gives every module its own new tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights; norms to one."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def forward(
        self,
        input_ids: Tensor | None,
        *,
        inputs_embeds: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int | Tensor | None = None,
        cache: LayerCache | None = None,
        split: SequenceSplit | None = None,
    ) -> LMOutput:
        """Runs the model.

        Args:
            input_ids: int64 [B, T], or None with inputs_embeds.
            inputs_embeds: [B, T, D] to run instead of the embeddings of input_ids (e.g. with
                image features in place of `<image>` tokens: `lightlong.model.HybridVLM`).
            cu_seqlens: int64 [N + 1] offsets of documents packed along T (B == 1): no
                attention, no lightning state and no loss crosses a document boundary, and
                positions restart at each document.
            labels: int64 [B, T], aligned with input_ids (shifted inside); -100 is ignored.
            logits_to_keep: None (all positions), k (the last k; 0 for none) or int64
                indices [T']. With labels and not None, the loss is computed chunk by chunk
                (`lightlong.ops.linear_cross_entropy`) without building [T, V] logits:
                training passes 0.
            cache: a `lightlong.infer.HybridCache`: input_ids continue each row from the
                cache, which is updated (lightning states in place, KV appended).
            split: input_ids [1, C_r] are this rank's chunk of one packed row split across
                the ranks of split.group (`lightlong.parallel.SequenceSplit`, which holds the
                row's document offsets); every rank calls forward together. Lightning and
                softmax layers only; no cu_seqlens. aux_loss is the whole row's (router
                statistics summed over the ranks). With labels ([1, C_r], this rank's),
                lm_loss is this rank's share of the row's mean and loss adds
                router_aux_loss_coef · aux_loss / ranks: the shares add up to the row's
                losses over the ranks, and so do their gradients. With a cache (empty, one
                row; on any ranks, e.g. the one that decodes), the row is one document (a
                prompt) and the cache receives the whole row, as if one process had run it:
                `lightlong.infer.prefill_split`.

        Returns:
            LMOutput with logits [B, T', V] and, given labels, the losses.
        """
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if (
                not isinstance(inputs_embeds, Tensor)
                or inputs_embeds.dim() != 3
                or (inputs_embeds.shape[-1] != c.hidden_size)
            ):
                raise ValueError(f"inputs_embeds must be a tensor [B, T, {c.hidden_size}]")
            B, T = inputs_embeds.shape[:2]
        elif not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be an int tensor [B, T]")
        elif input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64, got {input_ids.dtype}")
        else:
            B, T = input_ids.shape
        seen = 0 if cache is None else cache.length
        new = T if split is None else split.offsets[-1]  # tokens the row gains
        if c.max_position_embeddings < seen + new:
            row = "" if split is None else f" (of a row of {new})"
            raise ValueError(
                f"input_ids has T={T} tokens{row} after {seen} cached, over "
                f"max_position_embeddings={c.max_position_embeddings}"
            )
        if input_ids is not None and input_ids.numel():
            lo, hi = (int(t) for t in torch.aminmax(input_ids))
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"input_ids must be in [0, vocab_size={c.vocab_size})")
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, B, T)
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have input_ids' shape {(B, T)}")
        if split is not None:
            _check_split(c, split, B, T, cu_seqlens, labels, cache)
        if cache is not None and (cu_seqlens is not None or cache.batch_size != B):
            raise ValueError(
                f"with a cache, input_ids must be [B={cache.batch_size}, T] without cu_seqlens"
            )

        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if split is not None:  # global positions within documents, this rank's slice
            offsets = torch.tensor(split.offsets, dtype=torch.int64)
            row = positions_in_sequence(split.offsets[-1], offsets, x.device)
            positions = row[split.start : split.start + T]
        elif cache is None:
            positions = positions_in_sequence(T, cu_seqlens, x.device)
        else:
            start = cache.start  # one int, or int64 [B] for rows of different lengths
            positions = torch.arange(T, device=x.device) + (
                start if isinstance(start, int) else start[:, None]
            )
        if self._rotates:
            rope = rotary_cos_sin(positions, c.rotary_dim, c.rope_theta, x.dtype)
        else:  # no layer rotates: no tables
            rope = (x.new_empty(0), x.new_empty(0))
        seq = SequenceInfo(cu_seqlens, rope, positions, cache, split)
        no_aux = cache is not None and split is None  # every rank of a split row joins it
        aux = None if no_aux else x.new_zeros((), dtype=torch.float32)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        layers = self.model.layers
        if self._decode_layers is not None and T == 1 and no_aux and not torch.is_grad_enabled():
            layers = self._decode_layers
        for layer in layers:
            if recompute:
                x, layer_aux = checkpoint(layer, x, seq, use_reentrant=False)
            else:
                x, layer_aux = layer(x, seq)
            if aux is not None:
                aux = aux + layer_aux
        if aux is not None:
            aux = aux / c.num_layers
        if cache is not None:
            cache.advance(new)
        h = self.model.norm(x)
        if labels is None and not self.fp32_lm_head:  # the head as a module: any layout
            return LMOutput(logits=self.lm_head(_keep(h, logits_to_keep)), aux_loss=aux)
        head = self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else (
            self.lm_head.dequantize()
        )  # fmt: skip
        if self.fp32_lm_head:
            h, head = h.float(), head.float()

        out = LMOutput(logits=F.linear(_keep(h, logits_to_keep), head), aux_loss=aux)
        if labels is not None and split is not None:
            out.lm_loss = _split_loss(h, head, labels, split, logits_to_keep is None)
            out.loss = out.lm_loss
            if aux is not None:  # every rank holds the row's aux loss: each adds its share
                out.loss = out.loss + c.router_aux_loss_coef * aux / len(split.lengths)
        elif labels is not None:
            targets = _next_token_targets(labels, cu_seqlens)
            if logits_to_keep is None:  # the logits are built anyway: the plain loss
                out.lm_loss = linear_cross_entropy_reference(h[:, :-1].flatten(0, 1), head, targets)
            else:  # no [T, V] logits: the head and the loss run chunk by chunk
                out.lm_loss = linear_cross_entropy(h[:, :-1].flatten(0, 1), head, targets)
            out.loss = out.lm_loss if aux is None else out.lm_loss + c.router_aux_loss_coef * aux
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> HybridLM:
        """Loads a directory with config.json + model.safetensors (or a sharded index), in
        MiniMax-Text-01's released layout or `transformers`' MiniMax layout, or a training
        run directory's newest complete checkpoint."""
        from lightlong.model.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(
        self,
        path: str | Path,
        *,
        tokenizer: Tokenizer | str | None = None,
        max_shard_size: int | str = "5GB",
        config_format: str = "minimax",
    ) -> None:
        """Writes config.json ("minimax": released; "transformers"), safetensors shards with
        the released weight names, the tokenizer (None: UTF-8 bytes) and
        generation_config.json, atomically."""
        from lightlong.model.checkpoint import save_pretrained

        save_pretrained(self, path, tokenizer=tokenizer, max_shard_size=max_shard_size,
                        config_format=config_format)  # fmt: skip

    def param_count(self) -> dict[str, int]:
        """Parameters: total, embedding (input + untied output), and active per token.

        Active counts what one token uses, as MiniMax does: all non-embedding parameters
        except the experts a token is not routed to (k of E experts run).
        """
        c = self.config
        total = sum(p.numel() for p in self.parameters())
        embedding = self.model.embed_tokens.weight.numel()
        if not c.tie_word_embeddings:
            embedding += self.lm_head.weight.numel()
        experts = sum(
            p.numel() for m in self.modules() if isinstance(m, Expert) for p in m.parameters()
        )
        idle = experts * (c.num_experts - c.experts_per_token) // c.num_experts
        return {"total": total, "embedding": embedding, "active": total - embedding - idle}


SPLIT_TYPES = ("lightning", "softmax")
"""Layer types that run on a row split across ranks (`HybridLM.forward(split=...)`)."""


def check_splittable(c: HybridConfig, prefix: str = "") -> None:
    """ValueError when the model has layer types that cannot run on a split row (message
    after `prefix`, e.g. the setting that asked for the split)."""
    others = sorted(set(c.layer_types) - set(SPLIT_TYPES))
    if others:
        raise ValueError(
            f"{prefix}a row split across ranks runs {list(SPLIT_TYPES)} layers only; this "
            f"model has {others}"
        )


def _check_split(
    c: HybridConfig, split: SequenceSplit, B: int, T: int, cu_seqlens: Tensor | None,
    labels: Tensor | None, cache: LayerCache | None,
) -> None:  # fmt: skip
    """ValueError naming what cannot go with a split row."""
    check_splittable(c)
    if B != 1 or split.lengths[split.rank] != T:
        raise ValueError(
            f"with split, input_ids must be [1, {split.lengths[split.rank]}] (this rank's "
            f"chunk), got [{B}, {T}]"
        )
    if cu_seqlens is not None:
        raise ValueError("with split, pass no cu_seqlens (the split holds the row's documents)")
    if cache is not None and (cache.batch_size != 1 or cache.length or len(split.offsets) > 2):
        raise ValueError(
            "with split, a cache must be empty with batch_size=1 and the row one document "
            f"(got batch_size={cache.batch_size}, length={cache.length}, document offsets "
            f"{list(split.offsets)})"
        )


def _split_loss(
    h: Tensor, head: Tensor, labels: Tensor, split: SequenceSplit, plain: bool
) -> Tensor:
    """This rank's share of the row's mean next-token loss: its positions' summed loss over
    the row's count of predicted tokens (the shares of all ranks add up to the row's loss,
    and so do their gradients)."""
    targets = split_next_token_targets(labels, split)
    mine = (targets != IGNORE_INDEX).sum()
    total = mine.clone()
    dist.all_reduce(total, group=split.group)
    if int(mine) == 0:  # nothing to predict here: a zero that still reaches the graph
        return h.sum() * 0
    loss_fn = linear_cross_entropy_reference if plain else linear_cross_entropy
    loss = loss_fn(h.flatten(0, 1), head, targets)
    return loss * (mine.to(loss.dtype) / total.to(loss.dtype))


def _keep(h: Tensor, logits_to_keep: int | Tensor | None) -> Tensor:
    """Selects the positions whose logits are wanted from h [B, T, D]."""
    if logits_to_keep is None:
        return h
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        if not 0 <= logits_to_keep <= h.shape[1]:
            raise ValueError(f"logits_to_keep must be in [0, T={h.shape[1]}], got {logits_to_keep}")
        return h[:, h.shape[1] - logits_to_keep :]
    if isinstance(logits_to_keep, Tensor) and logits_to_keep.dim() == 1:
        return h.index_select(1, logits_to_keep.to(h.device))
    raise ValueError("logits_to_keep must be None, an int >= 0 or a 1-D index tensor")


def _next_token_targets(labels: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """int64 [B·(T − 1)]: the label each position t < T − 1 predicts (labels[:, t + 1]).

    With packed documents, the last token of a document does not predict the next one's first.
    """
    targets = labels[:, 1:].clone()
    if cu_seqlens is not None:
        starts = cu_seqlens[1:-1]
        targets[:, (starts[starts > 0] - 1).clamp(max=targets.shape[1] - 1)] = IGNORE_INDEX
    return targets.flatten()
