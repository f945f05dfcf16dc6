"""`lightlong serve`: load a model, start the engine thread, serve the app with uvicorn.

SIGTERM or Ctrl-C stops admitting requests, gives the running ones `shutdown_grace_s`
seconds to finish (then ends them with an error event), and exits 0.
"""

from __future__ import annotations

import logging
import socket
import sys
from types import FrameType

import torch
import uvicorn

from lightlong.infer import HybridCache, PrefixCache, Runner
from lightlong.model import HybridLM, HybridVLM
from lightlong.model.source import (
    eos_token_ids,
    generation_config,
    load_image_processor,
    load_model,
    load_model_tokenizer,
)
from lightlong.model.vision import text_model
from lightlong.nn import Int8Linear
from lightlong.runtime import check_device, parse_dtype
from lightlong.serve.app import AppConfig, build_app
from lightlong.serve.chat import REASONING_PARSERS, ChatTemplate
from lightlong.serve.config import ServerConfig
from lightlong.serve.engine import AsyncEngine
from lightlong.serve.images import ImageReader, ImageSettings
from lightlong.serve.metrics import Metrics
from lightlong.tokenizer import Tokenizer
from lightlong.units import size as nbytes


class _Server(uvicorn.Server):
    """uvicorn's server, draining the engine on SIGTERM/SIGINT and announcing its URL."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_s: float, url: str):
        super().__init__(config)
        self.engine, self.grace_s, self.url = engine, grace_s, url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"lightlong serve: listening on {self.url}", file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.engine.draining:
            print(
                f"lightlong serve: stopping (signal {sig}): no new requests; running ones have "
                f"{self.grace_s:g} s to finish",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        self.engine.drain(self.grace_s)
        super().handle_exit(sig, frame)
        # a stop asked for by a signal is the normal end of a server: exit 0, not re-raise it
        self._captured_signals.clear()


def run_server(cfg: ServerConfig) -> None:
    """Loads the model, binds the socket, serves until SIGTERM/SIGINT."""
    cfg.validate()
    dtype, device = parse_dtype(cfg.dtype), check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_model_tokenizer(cfg.model, cfg.tokenizer)
    chat_template = ChatTemplate.for_tokenizer(tokenizer, cfg.chat_template)
    stop_ids = eos_token_ids(generation_config(cfg.model))
    model = load_model(
        cfg.model, dtype=dtype, device=device, seed=cfg.seed, quantize=cfg.quantize, vision=True
    )
    c = text_model(model).config
    max_model_len = cfg.max_model_len or c.max_position_embeddings
    if max_model_len > c.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} is over the model's max_position_embeddings="
            f"{c.max_position_embeddings}"
        )
    prefix = (
        PrefixCache(cfg.prefix_block, cfg.prefix_cache_bytes) if cfg.prefix_cache_bytes else None
    )
    runner = Runner(
        model, tokenizer, max_num_seqs=cfg.max_num_seqs, prefill_chunk=cfg.prefill_chunk,
        prefix_cache=prefix, stop_token_ids=stop_ids,
    )  # fmt: skip
    engine = AsyncEngine(
        runner, max_prefill_tokens=cfg.max_prefill_tokens, max_waiting=cfg.max_waiting,
        metrics=Metrics(),
    )  # fmt: skip
    name = cfg.served_model_name or cfg.model
    app_config = AppConfig(
        model_name=name, max_model_len=max_model_len, api_key=cfg.api_key,
        max_body_bytes=cfg.max_body_bytes,
        reasoning_parser=REASONING_PARSERS.get(cfg.reasoning_parser or ""),
        image_reader=_image_reader(cfg, model), max_images=cfg.max_images_per_request,
    )  # fmt: skip
    app = build_app(engine, tokenizer, chat_template, app_config)

    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(_startup_lines(cfg, model, tokenizer, chat_template, max_model_len, name),
          file=sys.stderr, flush=True)  # fmt: skip
    server = _Server(
        uvicorn.Config(app, log_level=cfg.log_level, access_log=cfg.log_level in ("info", "debug"),
                       timeout_keep_alive=5, lifespan="off"),
        engine, cfg.shutdown_grace_s, url,
    )  # fmt: skip
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    logging.getLogger("lightlong.serve").info("stopped")


def _image_reader(cfg: ServerConfig, model: HybridLM | HybridVLM) -> ImageReader | None:
    """What reads chat requests' images for a vision-language model (its checkpoint's
    preprocessor_config.json, else its config's processor); None for a text model."""
    if not isinstance(model, HybridVLM):
        return None
    processor = load_image_processor(cfg.model, model.config, max_pixels=cfg.max_image_pixels)
    settings = ImageSettings(
        max_pixels=cfg.max_image_pixels, max_bytes=cfg.max_image_bytes,
        allow_remote=cfg.allow_remote_images, timeout_s=cfg.remote_image_timeout_s,
    )  # fmt: skip
    return ImageReader(processor, settings)


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (IPv6 when host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and
    # without it Nagle's algorithm holds each response's last write ~40 ms for an ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _startup_lines(
    cfg: ServerConfig, model: HybridLM | HybridVLM, tokenizer: Tokenizer,
    chat_template: ChatTemplate, max_model_len: int, name: str,
) -> str:  # fmt: skip
    """The model, its memory plan and the settings, for the log."""
    c = text_model(model).config
    tensors = (*model.parameters(), *model.buffers())  # int8 weights are buffers
    weights = sum(t.numel() * t.element_size() for t in tensors)
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear)
    )
    per_row, per_token = HybridCache.row_bytes(c, parse_dtype(cfg.dtype))
    worst = cfg.max_num_seqs * (per_row + max_model_len * per_token)
    lines = [
        f"lightlong serve: model {cfg.model!r} served as {name!r}: {c.num_layers} layers "
        f"({', '.join(f'{n} {t}' for t, n in _counts(c.layer_types))}), "
        f"{params / 1e6:,.1f}M parameters, {cfg.dtype}"
        f"{' (projections and experts int8)' if cfg.quantize == 'int8' else ''} "
        f"on {cfg.device}; tokenizer {tokenizer!r}; chat template: {chat_template.source}",
        f"lightlong serve: memory: weights {nbytes(weights)}; per sequence {nbytes(per_row)} of "
        f"constant state + {nbytes(per_token)} of softmax KV per token; {cfg.max_num_seqs} "
        f"sequences x {max_model_len:,} tokens at most = {nbytes(worst)}; prefix cache up to "
        f"{nbytes(cfg.prefix_cache_bytes) if cfg.prefix_cache_bytes else 'off'}",
        f"lightlong serve: batching: {cfg.max_num_seqs} sequences, {cfg.max_prefill_tokens} "
        f"prefill tokens per step, prefix snapshots every {cfg.prefix_block} tokens; "
        f"{'API key required' if cfg.api_key else 'no API key'}",
    ]
    if isinstance(model, HybridVLM):
        v = model.config.vision
        lines.append(
            f"lightlong serve: images: a {v.num_layers}-layer ViT on {v.image_size} px tiles; "
            f"at most {cfg.max_images_per_request} per request, {cfg.max_image_pixels:,} "
            f"pixels and {nbytes(cfg.max_image_bytes)} each; "
            f"{'data: and http(s) URLs' if cfg.allow_remote_images else 'data: URLs only'}"
        )
    return "\n".join(lines)


def _counts(types: list[str]) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for t in types:
        out[t] = out.get(t, 0) + 1
    return list(out.items())
