"""lightlong models behind `transformers`' Auto classes.

After `register()`, `AutoConfig`, `AutoModelForCausalLM` and `pipeline("text-generation")`
load checkpoints in MiniMax-Text-01's and MiniMax-M1's released layout (config.json
`model_type` "minimax_text_01" or "minimax_m1", as `HybridLM.save_pretrained` writes them)
as a `PreTrainedModel` whose modules are a `HybridLM`'s. `transformers`' own `minimax`
model_type stays `transformers`' MiniMax.

    import lightlong.hf
    from transformers import AutoModelForCausalLM

    lightlong.hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.generate(input_ids, max_new_tokens=32)            # HybridCache: O(1) lightning steps
    model.hybrid                                            # the HybridLM (same parameters)

Generation keeps a `lightlong.infer.HybridCache` (lightning states, softmax KV) between
steps; `use_cache=False` recomputes the whole prefix each step. Left-padded batches work
(each row is prefilled alone, then the rows are stacked); other padding raises ValueError
when generating. A cache cannot be cropped, so assisted generation is refused (the model
is stateful); beam search reorders the cache.

# B batch, T tokens, V vocab, N packed tokens
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from lightlong.infer.cache import HybridCache
from lightlong.model import HybridConfig, HybridLM

# transformers 5.x renames the cache argument and output field `past_key_values` -> `cache`
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


class MiniMaxText01Config(PretrainedConfig):
    """A released MiniMax-Text-01 `config.json`, its fields kept as they are.

    `hybrid_config()` parses them (`HybridConfig.from_dict`, the one reader). Extra
    attribute: `fp32_lm_head` (default False), logits in fp32 from low-precision weights
    (`HybridLM.fp32_lm_head`); `from_pretrained(..., fp32_lm_head=True)` sets it.
    """

    model_type = "minimax_text_01"
    fp32_lm_head = False
    use_cache = True

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig, **kwargs: Any) -> MiniMaxText01Config:
        """The config.json fields `HybridLM.save_pretrained` would write for `config`."""
        fields = config.to_minimax_dict()
        if fields.pop("model_type") != cls.model_type:
            raise ValueError(
                f"config.model_type is {config.model_type!r}; use the config class registered "
                f"for it, not {cls.__name__} ({cls.model_type!r})"
            )
        fields.pop("architectures")
        return cls(**fields, **kwargs)

    def hybrid_config(self) -> HybridConfig:
        """The `HybridConfig` these fields describe; ValueError naming a bad field."""
        where = f"{self.name_or_path}/config.json" if self.name_or_path else type(self).__name__
        return HybridConfig.from_dict(self.to_dict(), source=where)


class MiniMaxM1Config(MiniMaxText01Config):
    """A released MiniMax-M1 `config.json` (the same architecture as MiniMax-Text-01)."""

    model_type = "minimax_m1"


class _GenerationCache(HybridCache):
    """A `HybridCache` with what `transformers`' `generate` asks of a cache.

    `columns` counts the input_ids columns already run (padding included), which is
    where the next call's tokens start.
    """

    columns = 0
    is_compileable = False
    is_croppable = False

    @property
    def is_linear(self) -> list[bool]:
        """One entry per layer: a linear state (True) or a growing KV (False)."""
        return [i in self.states for i in range(self.config.num_layers)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.reorder(beam_idx)


class MiniMaxText01ForCausalLM(PreTrainedModel, GenerationMixin):
    """A `HybridLM` as a `transformers` causal LM: its `model` and `lm_head` are the
    HybridLM's (state-dict keys are the released names), `hybrid` is the HybridLM."""

    config_class = MiniMaxText01Config
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}
    _is_stateful = True  # a lightning state cannot be rolled back: no assisted generation
    accepts_loss_kwargs = False

    def __init__(self, config: MiniMaxText01Config):
        super().__init__(config)
        lm = HybridLM(config.hybrid_config())
        lm.fp32_lm_head = bool(config.fp32_lm_head)
        self.model, self.lm_head = lm.model, lm.lm_head
        # not a registered submodule: its modules are ours, under the same names
        self.__dict__["_hybrid"] = lm
        self.post_init()

    @property
    def hybrid(self) -> HybridLM:
        """The lightlong model these modules belong to (for `lightlong.infer.Engine` etc.)."""
        lm = self.__dict__["_hybrid"]
        lm.training = self.training
        lm.fp32_lm_head = bool(self.config.fp32_lm_head)
        return lm

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own HybridCache on the first cached call

    def get_output_embeddings(self):
        return self.__dict__["_hybrid"].lm_head  # itself, or its decode-layout replacement

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The modules' state dict, with each tensor the decode layout
        (`lightlong.nn.decode_layout`, which an Engine applies) left as a column-major view
        copied into its own contiguous memory: transformers' save_pretrained reads each
        tensor's memory span."""
        sd = super().state_dict(*args, **kwargs)
        for k, v in sd.items():
            if not v.is_contiguous():
                sd[k] = v.contiguous()
        return sd

    def set_output_embeddings(self, new_embeddings) -> None:
        self.lm_head = self.__dict__["_hybrid"].lm_head = new_embeddings

    # -- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: HybridCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Runs the model.

        Args:
            input_ids: int64 [B, T]; with a cache, only the tokens after it.
            attention_mask: [B, T_all] of 0/1 over every column so far (cache included).
                Without a cache each row's ones must be one contiguous run (left or right
                padding); rows are then packed so no token sees padding. With a cache
                (generation), only left padding: the new tokens' columns must be ones.
            past_key_values / cache: a cache from an earlier call (transformers 5 names
                it `cache`); None with use_cache=True starts one.
            labels: int64 [B, T] aligned with input_ids (shifted inside); -100 ignored. The
                loss is lightlong's: cross-entropy + router_aux_loss_coef · MoE balance loss
                (without a cache).
            use_cache: return a `HybridCache` to continue from (default: only when one was
                given).
            logits_to_keep: `transformers`' convention: 0 all positions, k > 0 the last k,
                or int64 indices [T'].

        Returns:
            CausalLMOutputWithPast with logits [B, T', V] (zeros at padding), the loss given
            labels, and the cache.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids")
        unsupported = sorted(
            k for k in ("output_attentions", "output_hidden_states") if kwargs.pop(k, None)
        )
        if unsupported:
            raise ValueError(f"{unsupported} are not supported by {type(self).__name__}")
        if cache is None:
            cache = past_key_values
        if cache is not None and not isinstance(cache, _GenerationCache):
            raise ValueError(
                f"cache must be one this model returned, got {type(cache).__name__} (a "
                "transformers DynamicCache cannot hold lightning states)"
            )
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be an int64 tensor [B, T]")
        keep = None if isinstance(logits_to_keep, int) and logits_to_keep == 0 else logits_to_keep
        lm = self.hybrid
        B, T = input_ids.shape
        mask = _check_mask(attention_mask, B, cache.columns + T if cache is not None else T)

        if cache is not None:  # continue generation: left padding is in the cache already
            if mask is not None and not bool(mask[:, cache.columns :].all()):
                raise ValueError("attention_mask must be 1 for the tokens after the cache")
            out = lm(input_ids, labels=labels, logits_to_keep=keep, cache=cache)
            cache.columns += T
            logits, loss = out.logits, out.loss
        elif use_cache:
            cache, logits, loss = self._start_cache(lm, input_ids, mask, labels, keep)
        elif mask is None:
            out = lm(input_ids, labels=labels, logits_to_keep=keep)
            logits, loss = out.logits, out.loss
        else:
            logits, loss = _packed_forward(lm, input_ids, mask, labels, keep)

        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()

    def _start_cache(
        self, lm: HybridLM, input_ids: Tensor, mask: Tensor | None, labels: Tensor | None,
        keep: int | Tensor | None,
    ) -> tuple[_GenerationCache, Tensor, Tensor | None]:  # fmt: skip
        """A new cache after input_ids [B, T]; left-padded rows are prefilled alone and
        stacked right-aligned, so padding never enters a state."""
        B, T = input_ids.shape
        if mask is None:
            cache = _GenerationCache.for_model(lm, B, capacity=T)
            out = lm(input_ids, labels=labels, logits_to_keep=keep, cache=cache)
            logits, loss = out.logits, out.loss
        else:
            starts, ends = _spans(mask)
            if not bool((ends == T).all()):
                raise ValueError(
                    "attention_mask: with a cache only left padding is supported (each row's "
                    "ones must end at the last column); pad on the left or pass use_cache=False"
                )
            if labels is not None:
                raise ValueError("labels with a padded attention_mask need use_cache=False")
            cols = _kept_columns(keep, T, input_ids.device)
            logits = None
            rows = []
            for b in range(B):
                s = int(starts[b])
                row = _GenerationCache.for_model(lm, 1, capacity=T - s)
                kept = cols[cols >= s]
                out = lm(input_ids[b : b + 1, s:], logits_to_keep=kept - s, cache=row)
                if logits is None:
                    logits = out.logits.new_zeros(B, len(cols), out.logits.shape[-1])
                logits[b, len(cols) - len(kept) :] = out.logits[0]
                rows.append(row)
            cache, loss = _GenerationCache.stack(rows), None
        cache.columns = T
        return cache, logits, loss

    # -- generation ------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: HybridCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The model's inputs for one `generate` step: the columns the cache has not seen
        (all of them without a cache) and the whole attention mask."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids")
        if cache is None:
            cache = past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.columns :]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        inputs[_CACHE_FIELD] = cache
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


class MiniMaxM1ForCausalLM(MiniMaxText01ForCausalLM):
    """`MiniMaxText01ForCausalLM` for MiniMax-M1 checkpoints (model_type "minimax_m1")."""

    config_class = MiniMaxM1Config


def register() -> None:
    """Makes `transformers`' AutoConfig / AutoModelForCausalLM (and so `pipeline`) load
    "minimax_text_01" and "minimax_m1" checkpoints as lightlong models. Idempotent."""
    for config_class, model_class in (
        (MiniMaxText01Config, MiniMaxText01ForCausalLM),
        (MiniMaxM1Config, MiniMaxM1ForCausalLM),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


# -- padding ---------------------------------------------------------------------------------


def _check_mask(mask: Tensor | None, B: int, T: int) -> Tensor | None:
    """The mask as bool [B, T], or None when it masks nothing."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, T):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask must be [B={B}, T={T}] (every column so far), got {shape}"
        )
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 and 1 only")
    mask = mask.bool()
    return None if bool(mask.all()) else mask


def _spans(mask: Tensor) -> tuple[Tensor, Tensor]:
    """int64 [B] start and end of each row's run of ones; ValueError for gaps or empty rows."""
    n = mask.sum(1)
    if not bool((n > 0).all()):
        raise ValueError("attention_mask: every row needs at least one token")
    starts = mask.int().argmax(1)
    ends = starts + n
    cols = torch.arange(mask.shape[1], device=mask.device)
    if not bool((mask == ((cols >= starts[:, None]) & (cols < ends[:, None]))).all()):
        raise ValueError(
            "attention_mask: each row's ones must be one contiguous run (left or right "
            "padding), not padding between tokens"
        )
    return starts, ends


def _kept_columns(keep: int | Tensor | None, T: int, device: torch.device) -> Tensor:
    """int64 [T'] columns whose logits are wanted (lightlong's logits_to_keep convention)."""
    if keep is None:
        return torch.arange(T, device=device)
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 0 <= keep <= T:
            raise ValueError(f"logits_to_keep must be in [0, T={T}], got {keep}")
        return torch.arange(T - keep, T, device=device)
    if isinstance(keep, Tensor) and keep.dim() == 1:
        return keep.to(device=device, dtype=torch.int64)
    raise ValueError("logits_to_keep must be an int >= 0 or a 1-D index tensor")


def _packed_forward(
    lm: HybridLM, input_ids: Tensor, mask: Tensor, labels: Tensor | None,
    keep: int | Tensor | None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """A padded batch as documents packed into one row (cu_seqlens): no token, state or loss
    crosses into padding or another row. Logits [B, T', V], zeros at padding."""
    B, T = input_ids.shape
    starts, ends = _spans(mask)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int64, device=input_ids.device)
    cu_seqlens[1:] = (ends - starts).cumsum(0)
    ids_1N = input_ids[mask][None]
    labels_1N = None if labels is None else labels[mask][None]
    cols = _kept_columns(keep, T, input_ids.device)
    # packed index of every kept (row, column) that is a token
    where_BC = (cols[None] >= starts[:, None]) & (cols[None] < ends[:, None])
    packed_BC = cu_seqlens[:-1, None] + cols[None] - starts[:, None]
    out = lm(ids_1N, cu_seqlens=cu_seqlens, labels=labels_1N, logits_to_keep=packed_BC[where_BC])
    logits = out.logits.new_zeros(B, len(cols), out.logits.shape[-1])
    logits[where_BC] = out.logits[0]
    return logits, out.loss
