"""`lightlong <command>`: parses arguments, then calls the packages that do the work."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from lightlong.config import ArgumentParser, add_config_args, config_from_args, fields_help
from lightlong.runtime import keep_freed_memory, parse_dtype

if TYPE_CHECKING:
    import torch

    from lightlong.infer.runner import Prefilled
    from lightlong.model import HybridLM
    from lightlong.model.image import ProcessedImage
    from lightlong.model.vision import VLConfig


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

    from lightlong.model.info import describe
    from lightlong.model.source import resolve_config

    if args.context < 1 or args.batch < 1:
        raise ValueError("--context and --batch must be >= 1")
    config = resolve_config(args.model, vision=True)
    print(describe(config, args.context, args.batch, parse_dtype(args.dtype)))


def _serve(args: argparse.Namespace) -> None:
    from lightlong.serve.config import ServerConfig

    cfg = config_from_args(ServerConfig, args).validate()
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    try:
        from lightlong.serve.server import run_server
    except ImportError as e:
        raise ValueError(
            f"lightlong serve needs the serve extra (pip install 'lightlong[serve]'): {e}"
        ) from None
    run_server(cfg)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lightlong.tokenizer import train_bpe

    tok = train_bpe(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote {tok.path} (vocab size {tok.vocab_size})")


def _generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from lightlong.infer import Engine, SamplingParams
    from lightlong.model.image import IMAGE_PLACEHOLDER, encode_with_images
    from lightlong.model.source import (
        eos_token_ids,
        generation_config,
        load_model,
        load_model_tokenizer,
        resolve_config,
    )
    from lightlong.model.vision import VLConfig, text_model
    from lightlong.runtime import check_device

    if "-" in (args.prompt, args.prompt_file):
        raw = getattr(sys.stdin, "buffer", None)  # bytes, decoded strictly (not surrogates)
        try:
            prompt = raw.read().decode("utf-8") if raw is not None else sys.stdin.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"stdin: the prompt is not UTF-8 (byte offset {e.start})") from None
    elif args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: {e}") from None
    else:
        prompt = args.prompt
    config = resolve_config(args.model, vision=True)
    vision = isinstance(config, VLConfig)
    if args.image and not vision:
        raise ValueError(
            f"--image: model {args.model!r} is a text model; it takes no images (a "
            "vision-language model does, e.g. tiny-vl)"
        )
    if args.image and args.sequence_parallel:
        raise ValueError("--sequence-parallel prefills text prompts only; drop --image")
    if args.image and IMAGE_PLACEHOLDER not in prompt:  # each image before the text
        prompt = f"{IMAGE_PLACEHOLDER}\n" * len(args.image) + prompt
    if vision and prompt.count(IMAGE_PLACEHOLDER) != len(args.image):
        n = prompt.count(IMAGE_PLACEHOLDER)
        raise ValueError(
            f"the prompt holds {n} {IMAGE_PLACEHOLDER!r} but {len(args.image)} --image "
            f"{'was' if len(args.image) == 1 else 'were'} given: write one "
            f"{IMAGE_PLACEHOLDER!r} per image where it goes (or none: each image then goes "
            "before the text)"
        )
    images = _load_images(args, config) if vision else []
    dtype = parse_dtype(args.dtype)
    tokenizer = load_model_tokenizer(args.model, args.tokenizer)
    generation = {} if args.ignore_eos else generation_config(args.model)
    device = check_device(args.device)
    if args.sequence_parallel:
        from lightlong.parallel import init_torchrun

        try:
            device = init_torchrun(device)
        except ValueError as e:
            raise ValueError(f"--sequence-parallel: {e}") from None
    model = load_model(
        args.model, dtype=dtype, device=device, seed=args.seed or 0, quantize=args.quantize,
        vision=True,
    )  # fmt: skip
    engine = Engine(model, tokenizer, prefill_chunk=args.prefill_chunk)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=args.stop, stop_token_ids=args.stop_token_id + eos_token_ids(generation),
        ignore_eos=args.ignore_eos,
    )  # fmt: skip
    if vision:  # "<image>" is the image token, the rest text
        ids = encode_with_images(tokenizer, prompt, config.image_token_id)
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give --prompt or --prompt-file some text")
    # the prompt as the model runs it: each image token expanded to its image's features
    length = len(ids) + sum(config.num_image_tokens(im.image_size) - 1 for im in images)
    prefilled = None
    if args.sequence_parallel:
        t0 = time.perf_counter()
        prefilled = _prefill_split(text_model(model), ids, device)
        if prefilled is None:  # not rank 0: its part is done
            return
        prefill_s = time.perf_counter() - t0
    bar = tqdm(
        total=length, desc="prefill", unit="tok", file=sys.stderr, unit_scale=True,
        disable=length < 4 * args.prefill_chunk or prefilled is not None,
    )  # fmt: skip
    with bar:
        events = engine.stream(
            ids, params, progress=bar.update, prefilled=[prefilled], images=[images]
        )
        first = next(events)
        bar.close()
        last = ""
        for ev in itertools.chain([first], events):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            last = ev.text or last
    if not last.endswith("\n"):
        print()  # the output ends its last line, as text files and shells expect
    st = engine.stats
    if prefilled is not None:  # the prompt ran across the ranks, before the engine
        st.prefill_tokens, st.prefill_seconds = len(ids), prefill_s
    kv = st.cache_bytes
    print(
        f"[{length:,} prompt tokens at {st.prefill_tok_s:,.0f} tok/s; {st.decode_tokens} "
        f"new at {st.decode_tok_s:,.1f} tok/s; finish: {ev.finish_reason}; cache "
        f"{kv['total'] / 2**20:,.1f} MiB (lightning {kv['lightning'] / 2**20:,.1f}, "
        f"softmax KV {kv['softmax_kv'] / 2**20:,.1f})]",
        file=sys.stderr,
    )


def _load_images(args: argparse.Namespace, config: VLConfig) -> list[ProcessedImage]:
    """The --image files, read (`--max-image-pixels`) and tiled by the model's processor:
    its checkpoint's preprocessor_config.json, else its config's."""
    from lightlong.model.image import load_image
    from lightlong.model.source import load_image_processor

    processor = load_image_processor(args.model, config, max_pixels=args.max_image_pixels)
    images = []
    for path in args.image:
        try:
            images.append(processor(load_image(path, max_pixels=args.max_image_pixels)))
        except ValueError as e:  # ImageError names the file; the processor's does not
            message = str(e) if str(e).startswith(path) else f"{path}: {e}"
            raise ValueError(f"--image {message}") from None
    return images


def _prefill_split(model: HybridLM, ids: list[int], device: torch.device) -> Prefilled | None:
    """The prompt prefilled across the torchrun processes (an even split), which then leave
    the process group: (cache, logits) on rank 0, None on the others."""
    import torch
    import torch.distributed as dist

    from lightlong.infer import prefill_split
    from lightlong.parallel import SequenceSplit

    try:
        split = SequenceSplit.even(len(ids))
    except ValueError:
        raise ValueError(
            f"--sequence-parallel: the prompt has {len(ids)} tokens, fewer than the "
            f"{dist.get_world_size()} processes"
        ) from None
    chunk_1C = torch.tensor(ids[split.span], dtype=torch.int64, device=device)[None]
    prefilled = prefill_split(model, chunk_1C, split)
    dist.destroy_process_group()  # decoding on rank 0 needs no other rank
    return prefilled


def _eval(args: argparse.Namespace) -> None:
    from lightlong.eval.runner import EvalConfig, run_eval

    cfg = config_from_args(EvalConfig, args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    run_eval(args.task, cfg)


def _train(args: argparse.Namespace) -> None:
    from lightlong.train import TrainConfig, Trainer

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    trainer = Trainer(cfg)
    final = trainer.fit()
    if trainer.main:
        print(json.dumps(final))


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    from lightlong.bench.attention import AttentionBenchConfig, run_attention_bench
    from lightlong.bench.generate import GenerateBenchConfig, run_generate_bench
    from lightlong.bench.model import ModelBenchConfig, run_model_bench
    from lightlong.bench.parallel import ParallelBenchConfig, run_parallel_bench
    from lightlong.bench.serve import ServeBenchConfig, run_serve_bench
    from lightlong.bench.train import TrainBenchConfig, run_train_bench
    from lightlong.eval.runner import TASKS as EVAL_TASKS
    from lightlong.eval.runner import EvalConfig
    from lightlong.serve.config import ServerConfig
    from lightlong.train.ablate import AblateConfig, run_ablation
    from lightlong.train.config import TrainConfig
    from lightlong.train.demo import DemoConfig, run_demo

    parser = ArgumentParser(prog="lightlong", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('lightlong')}")
    parser.set_defaults(keep_freed_memory=True)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not one line"
    )
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
    generate = bench.add_parser("generate", help="decode, prefill, cache at 1K ... 1M context")
    add_config_args(generate, GenerateBenchConfig)
    generate.set_defaults(func=_run_config(GenerateBenchConfig, run_generate_bench))
    train_bench = bench.add_parser("train", help="training tok/s, T = 2K ... 64K")
    add_config_args(train_bench, TrainBenchConfig)
    train_bench.set_defaults(func=_run_config(TrainBenchConfig, run_train_bench))
    serve_bench = bench.add_parser(
        "serve", help="lightlong serve under load: concurrency 1 ... 64, shared-prefix chats"
    )
    add_config_args(serve_bench, ServeBenchConfig)
    serve_bench.set_defaults(func=_run_config(ServeBenchConfig, run_serve_bench))
    parallel_bench = bench.add_parser(
        "parallel", help="sequence parallelism: per-rank memory, step time, bytes sent, SP = 1 2 4"
    )
    add_config_args(parallel_bench, ParallelBenchConfig)
    parallel_bench.set_defaults(func=_run_config(ParallelBenchConfig, run_parallel_bench))

    train = commands.add_parser(
        "train", help="train a model (torchrun --nproc-per-node N -m lightlong train ...)",
        epilog=f"keys (key=value, or in the --config file):\n{fields_help(TrainConfig)}",
    )  # fmt: skip
    train.add_argument("--config", help="TOML, YAML or JSON file of TrainConfig keys")
    train.add_argument("overrides", nargs="*", help="key=value (after the file)")
    train.add_argument("--print-config", action="store_true", help="print the config and exit")
    # Training gains nothing from kept memory and its heap fragments (2.5x the live peak).
    train.set_defaults(func=_train, keep_freed_memory=False)
    demo = commands.add_parser(
        "demo", help="train a hybrid and its all-lightning / all-softmax twins on recall (make run)"
    )
    add_config_args(demo, DemoConfig)
    demo.set_defaults(func=_run_config(DemoConfig, run_demo), keep_freed_memory=False)

    ablate = commands.add_parser(
        "ablate", help="train hybrid variants (lightning, cosformer, ...) alike and compare"
    )
    add_config_args(ablate, AblateConfig)
    ablate.set_defaults(func=_run_config(AblateConfig, run_ablation), keep_freed_memory=False)

    evaluate = commands.add_parser(
        "eval", help="long-context evaluation: NIAH, RULER-style, MR-NIAH, perplexity"
    )
    evaluate.add_argument(
        "task",
        choices=[*EVAL_TASKS, "all"],
        help="task, or all: every task (the oracle skips perplexity)",
    )
    add_config_args(evaluate, EvalConfig)
    evaluate.set_defaults(func=_eval)

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching (serve extra)"
    )
    add_config_args(serve, ServerConfig)
    serve.set_defaults(func=_serve)

    info = commands.add_parser("info", help="architecture, parameter counts, memory plan")
    info.add_argument("model", help="preset, checkpoint or run directory, or config .json")
    info.add_argument("--context", type=int, default=1_000_000, help="context length T")
    info.add_argument("--batch", type=int, default=1, help="sequences")
    info.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
        help="weight and KV dtype",
    )  # fmt: skip
    info.set_defaults(func=_info)

    tokenizer = commands.add_parser("tokenizer", help="tokenizers").add_subparsers(
        dest="tokenizer", required=True
    )
    train = tokenizer.add_parser("train", help="train a byte-level BPE on text files, offline")
    train.add_argument("files", nargs="+", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, help="ids, special included")
    train.add_argument("--out", required=True, help="directory for tokenizer.json")
    train.add_argument(
        "--min-frequency", type=int, default=2, help="least count of a pair to merge"
    )
    train.set_defaults(func=_tokenizer_train)

    gen = commands.add_parser("generate", help="stream a continuation of a prompt")
    gen.add_argument(
        "--model", required=True, help="preset, checkpoint or run directory, or config .json"
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text; - reads it from stdin")
    source.add_argument("--prompt-file", help="UTF-8 file holding the prompt; - for stdin")
    gen.add_argument(
        "--image", action="append", default=[], metavar="FILE",
        help="an image for a vision-language model (repeatable, in order): the prompt's "
        "i-th '<image>' stands for the i-th; a prompt without '<image>' gets one '<image>' "
        "and a newline per image before its text",
    )  # fmt: skip
    gen.add_argument(
        "--max-image-pixels", type=int, default=50_000_000,
        help="most pixels (height x width) of an image; bigger ones are refused unread",
    )  # fmt: skip
    gen.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the "
                     "model directory's, else bytes)")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 keeps all")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is off")
    gen.add_argument("--seed", type=int, help="seed of sampling and of a preset's weights "
                     "(default: a fresh sampling seed each run, weights seed 0)")  # fmt: skip
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stop-token-id", type=int, action="append", default=[],
                     help="stop token id (repeatable)")  # fmt: skip
    gen.add_argument("--ignore-eos", action="store_true", help="go on past end-of-text")
    gen.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per prefill pass")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="weight dtype")  # fmt: skip
    gen.add_argument("--device", default="cpu", help="torch device")
    gen.add_argument("--quantize", choices=["none", "int8"], default="none",
                     help="int8: projections and experts in int8 (lightlong.nn.quant)")  # fmt: skip
    gen.add_argument(
        "--sequence-parallel", action="store_true",
        help="under torchrun --nproc-per-node N -m lightlong generate: prefill the prompt "
        "split evenly across the N processes (NCCL on cuda, each on cuda:LOCAL_RANK; gloo "
        "otherwise), then decode on rank 0",
    )  # fmt: skip
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lightlong` console script.

    Every expected failure (a bad argument, config, file or checkpoint: ValueError and
    OSError with a message naming what and why) prints one line and exits 2; a run stopped
    by a signal exits 128 + its number. `--debug` shows the traceback instead."""
    from lightlong.train.loop import NonFiniteLossError, TrainingInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if not debug:  # warnings as one line each, like errors
        warnings.formatwarning = lambda message, *_, **__: f"lightlong: warning: {message}\n"
    if args.keep_freed_memory:
        keep_freed_memory()
    try:
        args.func(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except (ValueError, OSError, NonFiniteLossError) as e:
        if args.debug:
            raise
        print(f"lightlong: error: {_describe_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        signum = e.signum if isinstance(e, TrainingInterrupted) else signal.SIGINT
        print(f"lightlong: interrupted: {e or 'SIGINT'}", file=sys.stderr)
        raise SystemExit(128 + signum) from None


def _describe_error(e: Exception) -> str:
    """One line: the message, with the file an OSError names (e.g. "[Errno 13] Permission
    denied: 'x'" becomes "x: permission denied")."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror.lower()}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


if __name__ == "__main__":
    main()
