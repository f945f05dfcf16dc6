"""lm-evaluation-harness adapter: run `lm_eval` tasks on lightlong models.

Needs the optional extra (`pip install 'lightlong[lm_eval]'`). Importing this module registers
the model name "lightlong" with lm_eval.

Python:

    import lm_eval
    from lightlong.eval.harness import LightlongLM

    lm = LightlongLM(pretrained="runs/demo/tiny/step-1500", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

CLI: lm_eval's own CLI does not import this module, so run it through ours, which registers
"lightlong" and hands the remaining arguments to lm_eval's CLI unchanged:

    python -m lightlong.eval.harness run --model lightlong \\
        --model_args pretrained=runs/demo/tiny/step-1500,dtype=bfloat16,prefill_chunk=2048 \\
        --tasks lambada_openai --batch_size 8

Lengths follow lm_eval's Hugging Face model (HFLM): `max_length` is the most tokens the model
reads in one pass. A scored sequence (context + continuation) is left-truncated to
max_length + 1 tokens (its last token is only predicted); a generation prompt to
max_length − max_gen_toks tokens. max_length is at most max_position_embeddings (the
default).

Scoring runs one request at a time through `token_logprobs` (chunked prefill through the
inference cache, memory bounded by `prefill_chunk`); `batch_size` batches generation only.

# T tokens
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    _MISSING = f"lightlong.eval.harness needs lm_eval ({e}): pip install 'lightlong[lm_eval]'"
    if __name__ == "__main__":
        print(f"lightlong: error: {_MISSING}", file=sys.stderr)
        raise SystemExit(2) from None
    raise ImportError(_MISSING) from e

from lightlong.eval.logprobs import token_logprobs
from lightlong.infer import Engine, SamplingParams
from lightlong.model import HybridLM
from lightlong.model.source import load_model, load_model_tokenizer
from lightlong.runtime import check_device, parse_dtype
from lightlong.tokenizer import Tokenizer, load_tokenizer

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
"""The lm_eval generation kwargs `generate_until` understands; any other key is an error."""


def _int_arg(value: Any, name: str, minimum: int) -> int:
    """`value` (an int, or a string from `--model_args`) as an int >= minimum."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if (isinstance(value, float) and value != number) or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _check_device(device: str) -> torch.device:
    """`device` as a torch.device, or a ValueError when this machine does not have it."""
    try:
        return check_device(device)
    except ValueError as e:
        raise ValueError(
            f"{e}; lm_eval's CLI asks for cuda:0 unless given --device, e.g. --device cpu"
        ) from None


@register_model("lightlong")
class LightlongLM(LM):
    """A lightlong model as an lm_eval `LM`.

    Args:
        pretrained: a checkpoint directory or a preset name (seeded random weights), loaded
            with `load_model`; or a `HybridLM` already built.
        tokenizer: a tokenizer directory or `.json` file; default: the checkpoint directory's
            (`ByteTokenizer` when it has none, and for presets).
        batch_size: prompts per `Engine.generate` call in `generate_until`.
        max_length: most tokens the model reads in one pass (see the module docstring);
            default max_position_embeddings.
        prefill_chunk: tokens per forward pass when scoring and prefilling.
        dtype: "float32" or "bfloat16" weights (ignored for a built `HybridLM`).
        device: where the model runs (ignored for a built `HybridLM`); an unavailable one
            is an error, not a fallback.
        seed: weights seed for presets and the sampling seed when `do_sample` is set.
        max_gen_toks: tokens to generate when a request's gen_kwargs do not say.
        max_batch_size: accepted because lm_eval passes it; unused (no automatic batch size).
        quantize: "none" or "int8" (`lightlong.nn.quantize_int8`; ignored for a built
            `HybridLM`).
    """

    def __init__(
        self,
        pretrained: str | HybridLM,
        tokenizer: str | None = None,
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        prefill_chunk: int | str = 4096,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int | str = 0,
        max_gen_toks: int | str = 256,
        max_batch_size: int | str | None = None,
        quantize: str = "none",
    ) -> None:
        super().__init__()
        self.seed = _int_arg(seed, "seed", 0)
        if isinstance(pretrained, HybridLM):
            model = pretrained
        else:
            pretrained = str(pretrained)  # `--model_args` turns a name like "123" into an int
            model = load_model(
                pretrained,
                dtype=parse_dtype(dtype, ("float32", "bfloat16")),
                device=_check_device(device),
                seed=self.seed,
                quantize=quantize,
            )
        self.model = model.eval()
        self._device = self.model.lm_head.weight.device
        if isinstance(pretrained, HybridLM):
            self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        else:
            self.tokenizer = load_model_tokenizer(pretrained, tokenizer)

        limit = self.model.config.max_position_embeddings
        if max_length is None:
            self.max_length = limit
        else:
            self.max_length = _int_arg(max_length, "max_length", 1)
            if self.max_length > limit:
                raise ValueError(
                    f"max_length must be <= max_position_embeddings = {limit}, "
                    f"got {self.max_length}"
                )
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ValueError(
                f"batch_size must be an integer (no automatic sizing), got {batch_size!r}"
            )
        self.batch_size = _int_arg(batch_size, "batch_size", 1)
        self.prefill_chunk = _int_arg(prefill_chunk, "prefill_chunk", 1)
        self.max_gen_toks = _int_arg(max_gen_toks, "max_gen_toks", 1)
        self.engine = Engine(self.model, self.tokenizer, prefill_chunk=self.prefill_chunk)

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's repr (its class and file), which fingerprints request caches."""
        return repr(self.tokenizer)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context or a rolling window starts from: eos, else bos."""
        tok = self.tokenizer
        prefix = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        if prefix is None:
            raise ValueError(
                f"{tok!r} has neither an eos nor a bos token, needed to score text without "
                "a context (empty contexts, loglikelihood_rolling)"
            )
        return prefix

    # -- scoring ----------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) request, split as lm_eval's HFLM splits them.

        Whitespace ending the context moves to the start of the continuation; the joined
        string is encoded whole and split after the context's own tokens, so the continuation
        gets the tokens it has in running text. An empty context becomes the prefix token,
        unless the continuation already starts with it, which then serves as the context.
        """
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        if not context:
            cont = self.tokenizer.encode(continuation)
            prefix = self.prefix_token_id
            return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx) :]

    def score(
        self, context_ids: Sequence[int], continuation_ids: Sequence[int]
    ) -> tuple[float, bool]:
        """Log-probability of the continuation tokens after the context tokens.

        The joined ids are left-truncated to max_length + 1 tokens.

        Args:
            context_ids: token ids [T_ctx], T_ctx >= 1.
            continuation_ids: token ids [T_cont], T_cont <= max_length (0 scores (0.0, True)).

        Returns:
            the sum of the continuation's log-probabilities, and whether greedy decoding
            would produce every continuation token.
        """
        n = len(continuation_ids)
        if n == 0:
            return 0.0, True
        if n > self.max_length:
            raise ValueError(
                f"the continuation has {n} tokens, more than max_length={self.max_length} can score"
            )
        if not context_ids:
            raise ValueError("context_ids must hold at least one token")
        ids = [*context_ids, *continuation_ids][-(self.max_length + 1) :]
        logprobs, greedy = token_logprobs(self.model, ids, chunk=self.prefill_chunk)
        return float(logprobs[-n:].sum(dtype=torch.float64)), bool(greedy[-n:].all())

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each request's (context,
        continuation); the context may be empty."""
        results = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            result = self.score(*self.encode_pair(context, continuation))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm_eval's disjoint rolling windows over `text`'s tokens: (context, continuation)
        pairs of at most max_length + 1 tokens together, every token predicted exactly once,
        the first after the prefix token."""
        windows = get_rolling_token_windows(
            token_list=self.tokenizer.encode(text),
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length,
            context_len=1,
        )
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """log p(text) for each request's (text,), scored in max_length windows (0.0 for "")."""
        results = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            total = sum(self.score(ctx, cont)[0] for ctx, cont in self.rolling_windows(text))
            results.append(float(total))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), float(total))
        return results

    # -- generation -------------------------------------------------------------------------

    def sampling_params(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        """lm_eval gen_kwargs as `SamplingParams`: `until` → stop, `max_gen_toks` →
        max_new_tokens; greedy unless `do_sample` (temperature then defaults to 1) or a
        temperature > 0 without `do_sample`; `do_sample=False` is greedy at any temperature."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"unsupported gen_kwargs {unknown}; supported: {list(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"gen_kwargs 'until' must be a string or a list of them: {until!r}")
        do_sample = gen_kwargs.get("do_sample")
        temperature = float(gen_kwargs.get("temperature", 1.0 if do_sample else 0.0))
        if do_sample is False:
            temperature = 0.0
        return SamplingParams(
            max_new_tokens=_int_arg(
                gen_kwargs.get("max_gen_toks", self.max_gen_toks), "max_gen_toks", 1
            ),
            temperature=temperature,
            top_p=float(gen_kwargs.get("top_p", 1.0)),
            top_k=_int_arg(gen_kwargs.get("top_k", 0), "top_k", 0),
            seed=self.seed,
            stop=[s for s in until if s],  # "" is lm_eval's placeholder for a missing eos
        ).validate(self.model.config.vocab_size)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generated text for each request's (context, gen_kwargs), cut before the first stop
        string, in request order. Requests with equal gen_kwargs run batch_size at a time."""
        groups: list[tuple[dict[str, Any], list[int]]] = []
        for i, req in enumerate(requests):
            gen_kwargs = req.args[1]
            for kwargs, rows in groups:
                if kwargs == gen_kwargs:
                    rows.append(i)
                    break
            else:
                groups.append((gen_kwargs, [i]))
        texts: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for gen_kwargs, rows in groups:
            params = self.sampling_params(gen_kwargs)
            room = self.max_length - params.max_new_tokens  # prompt tokens that fit
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={params.max_new_tokens} leaves no room for a prompt within "
                    f"max_length={self.max_length}"
                )
            for a in range(0, len(rows), self.batch_size):
                batch = rows[a : a + self.batch_size]
                prompts = [self._prompt_ids(requests[i].args[0], room) for i in batch]
                for i, gen in zip(batch, self.engine.generate(prompts, params), strict=True):
                    texts[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                bar.update(len(batch))
        bar.close()
        return texts

    def _prompt_ids(self, context: str, room: int) -> list[int]:
        """The context's last `room` tokens; the prefix token alone for an empty context."""
        ids = self.tokenizer.encode(context)[-room:]
        return ids or [self.prefix_token_id]


def main() -> None:
    """`python -m lightlong.eval.harness <lm_eval CLI args>`: lm_eval's CLI (it reads
    sys.argv) with "lightlong" registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    # Run as a script this module is `__main__`; alias it so a later import of
    # lightlong.eval.harness reuses it instead of registering "lightlong" a second time
    # (lm_eval refuses a name registered to two classes).
    sys.modules.setdefault("lightlong.eval.harness", sys.modules[__name__])
    main()
