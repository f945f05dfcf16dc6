"""`lightlong <command>`: parses arguments, then calls the packages that do the work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lightlong.config import add_config_args, config_from_args


def _bench_attention(args: argparse.Namespace) -> None:
    from lightlong.bench.attention import AttentionBenchConfig, run_attention_bench

    cfg = config_from_args(AttentionBenchConfig, args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    run_attention_bench(cfg)


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    from lightlong.bench.attention import AttentionBenchConfig

    parser = argparse.ArgumentParser(prog="lightlong", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    attention = bench.add_parser(
        "attention", help="lightning attention vs softmax SDPA, T = 1K ... 1M"
    )
    add_config_args(attention, AttentionBenchConfig)
    attention.set_defaults(func=_bench_attention)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lightlong` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"lightlong: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
