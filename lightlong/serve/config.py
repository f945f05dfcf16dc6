"""`ServerConfig`: the settings of `lightlong serve` (importable without the serve extra,
so that the command line can list them)."""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSER_NAMES = ("minimax-m1",)
"""Values of --reasoning-parser (`lightlong.serve.chat.REASONING_PARSERS` holds them)."""


@dataclass
class ServerConfig:
    """What `lightlong serve` runs, and how."""

    model: str = "small"
    """A checkpoint or training-run directory, a config .json file or a preset (random
    weights, for trying the server out)."""
    tokenizer: str | None = None
    """tokenizer.json or its directory (default: the checkpoint's, else UTF-8 bytes)."""
    chat_template: str | None = None
    """A Jinja chat template file (default: the tokenizer_config.json's, else a plain one)."""
    served_model_name: str | None = None
    """The name clients pass as `model` (default: the --model argument)."""
    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 serves other machines too."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at startup)."""
    api_key: str | None = None
    """Bearer token every /v1 request must carry (default: none)."""
    dtype: str = "float32"
    """Weight and KV dtype."""
    device: str = "cpu"
    """torch device."""
    quantize: str = "none"
    """none, or int8: projections and experts as int8 weights (`lightlong.nn.quantize_int8`)."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    seed: int = 0
    """Seed of a preset's random weights."""
    max_num_seqs: int = 64
    """Sequences decoding at once (the batch's rows; each of a request's n takes one)."""
    max_model_len: int = 0
    """Most prompt + output tokens per sequence; 0: the model's max_position_embeddings."""
    max_prefill_tokens: int = 512
    """Prompt tokens prefilled per engine step: the longest pause running streams see."""
    prefill_chunk: int = 4096
    """Most tokens per prefill forward pass."""
    prefix_block: int = 256
    """Prefix-cache snapshots are taken at multiples of this many prompt tokens."""
    prefix_cache_bytes: int = 1 << 30
    """Budget of the prefix cache (least recently used dropped first); 0 turns it off."""
    max_waiting: int = 256
    """Requests that may wait for a row; more are refused with 429."""
    max_body_bytes: int = 8 << 20
    """Largest request body accepted."""
    max_images_per_request: int = 8
    """Vision-language models: most images (image_url parts) per chat request."""
    max_image_pixels: int = 50_000_000
    """Most pixels (height x width) of one image; bigger ones are refused (400) before they
    are decoded."""
    max_image_bytes: int = 20_000_000
    """Most bytes of one encoded image (a data: URL's, or a fetched one's)."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs of chat requests. Off, only data: URLs are taken; on, the
    server fetches whatever address a client names (one it can reach and the client may
    not: turn it on only for trusted clients)."""
    remote_image_timeout_s: float = 10.0
    """Seconds a remote image may take to fetch (with --allow-remote-images)."""
    reasoning_parser: str | None = None
    """Split chat output into reasoning_content and content: minimax-m1."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, seconds running requests get to finish before they are ended."""
    log_level: str = "warning"
    """uvicorn's log level (debug, info, warning, error)."""

    def validate(self) -> ServerConfig:
        """Raises ValueError naming the field that is out of range; returns self."""
        for name in ("max_num_seqs", "max_prefill_tokens", "prefill_chunk", "prefix_block",
                     "max_waiting", "max_body_bytes", "max_images_per_request",
                     "max_image_pixels", "max_image_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("threads", "max_model_len", "prefix_cache_bytes", "port"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be none or int8, got {self.quantize!r}")
        if self.port > 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.remote_image_timeout_s > 0:
            raise ValueError(
                f"remote_image_timeout_s must be > 0, got {self.remote_image_timeout_s}"
            )
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.reasoning_parser not in (None, *REASONING_PARSER_NAMES):
            raise ValueError(
                f"reasoning_parser must be one of {list(REASONING_PARSER_NAMES)}, got "
                f"{self.reasoning_parser!r}"
            )
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it out for no authentication)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(
                f"log_level must be debug, info, warning or error, got {self.log_level!r}"
            )
        return self
