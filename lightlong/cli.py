"""`lightlong <command>`: parses arguments, then calls the packages that do the work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lightlong.config import add_config_args, config_from_args
from lightlong.runtime import keep_freed_memory


def _run_config(cls, run):
    """A command that builds config `cls` from its flags, then calls `run(config)`."""

    def command(args: argparse.Namespace) -> None:
        cfg = config_from_args(cls, args)
        if args.print_config:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return
        run(cfg)

    return command


def _info(args: argparse.Namespace) -> None:
    import torch

    from lightlong.model.info import describe, resolve_config

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.context < 1 or args.batch < 1:
        raise ValueError("--context and --batch must be >= 1")
    print(describe(resolve_config(args.model), args.context, args.batch, dtypes[args.dtype]))


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    from lightlong.bench.attention import AttentionBenchConfig, run_attention_bench
    from lightlong.bench.model import ModelBenchConfig, run_model_bench

    parser = argparse.ArgumentParser(prog="lightlong", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    attention = bench.add_parser(
        "attention", help="lightning attention vs softmax SDPA, T = 1K ... 1M"
    )
    add_config_args(attention, AttentionBenchConfig)
    attention.set_defaults(func=_run_config(AttentionBenchConfig, run_attention_bench))
    model = bench.add_parser("model", help="the whole model, lightlong vs transformers")
    add_config_args(model, ModelBenchConfig)
    model.set_defaults(func=_run_config(ModelBenchConfig, run_model_bench))

    info = commands.add_parser("info", help="architecture, parameter counts, memory plan")
    info.add_argument("model", help="preset name or checkpoint directory")
    info.add_argument("--context", type=int, default=1_000_000, help="context length T")
    info.add_argument("--batch", type=int, default=1, help="sequences")
    info.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
        help="weight and KV dtype",
    )  # fmt: skip
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lightlong` console script."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        args.func(args)
    except ValueError as e:
        print(f"lightlong: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
