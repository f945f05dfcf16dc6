"""`lightlong bench parallel`: sequence parallelism on one machine — per-rank memory, step
time and the bytes each collective moves, vs sequence length, at SP = 1, 2, 4.

For each preset and degree R, R gloo processes start together (spawned, a file rendezvous,
one torch thread each; killed past `timeout_s`) and build the same seeded model. A step is
one training step on one row of T tokens (one document) split evenly across them
(`HybridLM.forward(split=...)`): forward with labels, backward; fp32, no activation
checkpointing, no optimizer. Per length T, every rank:

1. runs one step counting its collectives (`CollectiveCounter`: a TorchDispatchMode sees
   every c10d op, forward and backward, and module hooks say which layer issued it);
2. runs `reps` timed steps. Step time: the slowest rank's wall time, median over the steps;
   CPU time likewise. Peak: the largest rise of a rank's resident memory during a step
   above its resident memory before it (weights, gradients, the runtime), glibc's malloc
   trimmed first (`peak_since` on the CPU; bytes allocated on CUDA).

Then, for a per-rank budget on that peak, the longest T each degree trains within it:
doubling from the longest measured T that fits, then bisection (`longest_within`). Last,
one lightning layer's op alone (`lightning_attn_split`, forward and backward, the preset's
H, K, V) at `byte_lengths`, where the whole model would not fit or finish, to count its
bytes at long T.

Bytes are the payload per rank: what it contributes to an all-gather (its shard), its shard
of a reduce-scatter's result, the tensor of an all-reduce. A ring sends (R − 1)× that for
the first two, 2(R − 1)/R× for the third ("ring" in the JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightlong.bench.machine import (
    Roofline,
    describe_machine,
    measure_roofline,
    peak_since,
    reset_peak,
)
from lightlong.bench.report import (
    check_overwrite,
    failed_line,
    fmt,
    ratio,
    target,
    targets_line,
    write_results,
)
from lightlong.bench.roofline import train_flops_per_token
from lightlong.bench.worker import log
from lightlong.model import HybridConfig, HybridLM
from lightlong.model.config import PRESETS
from lightlong.model.hybrid import SPLIT_TYPES
from lightlong.ops import decay_rates
from lightlong.parallel import SequenceSplit, lightning_attn_split
from lightlong.runtime import release_freed_memory

FULL = {"lengths": [1024, 2048, 4096], "reps": 3, "budget_mib": 1024.0,
        "byte_lengths": [16384, 262144]}  # fmt: skip
QUICK = {"lengths": [256, 512], "reps": 1, "budget_mib": 128.0, "byte_lengths": [1024, 4096]}
FP32 = 4
"""Bytes per element: the model and the lightning states run in float32."""


@dataclass
class ParallelBenchConfig:
    """What `lightlong bench parallel` measures."""

    presets: list[str] = field(default_factory=lambda: ["small-linear", "small"])
    """Model presets (commas also separate); lightning and softmax layers only."""
    sp: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Sequence-parallel degrees: gloo processes on this machine, one torch thread each."""
    quick: bool = False
    """Shorter lengths, one timed step, a smaller budget; the files get -quick, so the
    committed ones stay."""
    lengths: list[int] = field(default_factory=list)
    """Row lengths T of the sweep; empty means 1K, 2K, 4K (quick: 256, 512)."""
    reps: int = 0
    """Timed steps per length (the median is reported); 0 means 3 (quick: 1)."""
    budget_mib: float = 0.0
    """Per-rank budget of the longest-T search: MiB a step may add to a rank's resident
    memory (weights, gradients, runtime); 0 means 1024 (quick: 128)."""
    byte_lengths: list[int] = field(default_factory=list)
    """Row lengths at which one lightning layer's op alone counts its bytes (SP > 1);
    empty means 16K, 256K (quick: 1K, 4K)."""
    timeout_s: float = 1800.0
    """Seconds one preset at one degree (all its steps) may take before it is stopped."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""
    overwrite: bool = False
    """Replace result files already in out_dir (else the run stops before measuring)."""

    def __post_init__(self):
        self.presets = [p for item in self.presets for p in item.split(",") if p]

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        for p in self.presets:
            if p not in PRESETS:
                raise ValueError(f"presets: unknown preset {p!r}; valid: {sorted(PRESETS)}")
            others = sorted(set(PRESETS[p].layer_types) - set(SPLIT_TYPES))
            if others:
                raise ValueError(
                    f"presets: {p} has {others} layers; a split row runs {list(SPLIT_TYPES)}"
                )
        if not self.presets:
            raise ValueError("presets must name at least one preset")
        if not self.sp or any(r < 1 for r in self.sp) or len(set(self.sp)) != len(self.sp):
            raise ValueError(f"sp must be distinct degrees >= 1, got {self.sp}")
        for name in ("lengths", "byte_lengths"):
            if any(max(self.sp) > T for T in getattr(self, name)):
                raise ValueError(f"{name} must give every rank a token (>= {max(self.sp)})")
        for name in ("reps", "budget_mib"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = default), got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def resolved(self) -> ParallelBenchConfig:
        """This config with the empty and zero fields at their (quick) defaults."""
        defaults = QUICK if self.quick else FULL
        values = {k: getattr(self, k) or v for k, v in defaults.items()}
        lists = {k: sorted(v) for k, v in values.items() if isinstance(v, list)}
        return dataclasses.replace(self, **values | lists, sp=sorted(self.sp))


def run_parallel_bench(cfg: ParallelBenchConfig) -> dict:
    """Measures every preset at every degree, prints the tables, writes JSON + Markdown +
    PNG; returns the report."""
    cfg.validate()
    cfg = cfg.resolved()
    check_overwrite(results_stem(cfg), cfg.overwrite)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' one thread each
    try:
        roofline = measure_roofline("cpu")
    finally:
        torch.set_num_threads(before)
    log(roofline.summary())
    t0, load = time.perf_counter(), [os.getloadavg()[0]]
    groups, failed = [], []
    for preset in cfg.presets:
        for R in cfg.sp:
            log(f"{preset} SP={R}: {R} process(es)")
            result = _run_group(cfg, preset, R)
            if result is not None:
                groups.append(result)
            else:
                failed.append({"what": f"{preset} SP={R}", "error": "failed or timed out",
                               "preset": preset, "sp": R})  # fmt: skip
    load.append(os.getloadavg()[0])
    report = _summarise(cfg, groups, time.perf_counter() - t0, load, roofline, failed)
    print(format_table(report))
    write_results(
        results_stem(cfg), report, format_table(report), plot_parallel, overwrite=cfg.overwrite
    )
    return report


def results_stem(cfg: ParallelBenchConfig) -> Path:
    """Where the results go, without the suffix: parallel-cpu or parallel-cpu-quick."""
    return Path(cfg.out_dir) / ("parallel-cpu" + ("-quick" if cfg.quick else ""))


# ---------------------------------------------------------------------------- counting


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# Per collective: (payload bytes per rank, ring bytes per payload byte) from its arguments
# and the group's size R.
_COLLECTIVES: dict[str, Callable[[tuple, int], tuple[int, float]]] = {
    # (input shard, group size, group name) -> the gathered [R·shard]
    "_c10d_functional::all_gather_into_tensor": lambda a, R: (_nbytes(a[0]), R - 1),
    # (input [R·shard], op, group size, group name) -> this rank's reduced shard
    "_c10d_functional::reduce_scatter_tensor": lambda a, R: (_nbytes(a[0]) // R, R - 1),
    "_c10d_functional::all_reduce": lambda a, R: (_nbytes(a[0]), 2 * (R - 1) / R),
    # dist.all_gather_into_tensor(output, input) and dist.all_reduce([tensors])
    "c10d::_allgather_base_": lambda a, R: (_nbytes(a[1]), R - 1),
    "c10d::allreduce_": lambda a, R: (sum(_nbytes(t) for t in a[0]), 2 * (R - 1) / R),
}
_NO_DATA = {"_c10d_functional::wait_tensor", "_c10d_functional::_wrap_tensor_autograd"}


class CollectiveCounter(TorchDispatchMode):
    """Counts the bytes of every collective this rank issues while active, forward and
    backward, by the module of `modules` that issued it (module hooks mark where each one's
    forward and backward begin and end) or as `other`.

    An op of the c10d namespaces that it cannot size raises RuntimeError, so nothing sent
    goes uncounted."""

    def __init__(self, world: int, modules: Sequence[nn.Module] = ()):
        super().__init__()
        self.world = world
        self.modules = list(modules)
        self.by_module = [_zero_bytes() for _ in self.modules]
        """Per module: payload bytes sent forward, backward, and as a ring would send."""
        self.other = _zero_bytes()
        """The same for collectives outside the modules (the loss, MoE statistics)."""
        self._inside: int | None = None
        self._hooks: list = []

    def __enter__(self) -> CollectiveCounter:
        def inside(i: int | None) -> Callable[..., None]:
            def hook(*_) -> None:
                self._inside = i

            return hook

        for i, m in enumerate(self.modules):
            self._hooks += [
                m.register_forward_pre_hook(inside(i)),
                m.register_forward_hook(inside(None)),
                m.register_full_backward_pre_hook(inside(i)),
                m.register_full_backward_hook(inside(None)),
            ]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if func.namespace in ("_c10d_functional", "c10d") and name not in _NO_DATA:
            if name not in _COLLECTIVES:
                raise RuntimeError(f"collective {name} is not counted: size it in _COLLECTIVES")
            payload, ring = _COLLECTIVES[name](args, self.world)
            backward = torch._C._current_graph_task_id() != -1  # autograd's engine runs it
            entry = self.other if self._inside is None else self.by_module[self._inside]
            entry["backward" if backward else "forward"] += payload
            entry["ring"] += round(ring * payload)
        return out


def _zero_bytes() -> dict[str, int]:
    return {"forward": 0, "backward": 0, "ring": 0}


# ------------------------------------------------------------------------------ search


def longest_within(
    budget: float,
    peaks: dict[int, float],
    probe: Callable[[int], float],
    grain: int,
    max_probes: int = 12,
) -> dict:
    """The longest T, a multiple of `grain`, whose peak fits `budget`, given peaks already
    measured (at least one) and `probe(T)` to measure another: doubling from the longest T
    that fits (halving from the shortest when none does), then bisection until the bracket
    is within 1/16 of its lower end or one grain; at most `max_probes` probes.

    Returns {"T": longest T that fits (0: none), "over": shortest T above it that does not
    (None: none found), "probes": [[T, peak], ...] in the order measured}.
    """
    peaks = dict(peaks)
    probes: list[list[float]] = []
    while True:
        lo = max((T for T, p in peaks.items() if p <= budget), default=0)
        hi = min((T for T, p in peaks.items() if p > budget and lo < T), default=None)
        if hi is None:
            T = 2 * lo
        elif lo == 0:
            T = hi // 2 // grain * grain
        elif hi - lo > max(grain, lo // 16):
            T = (lo + hi) // 2 // grain * grain
        else:
            break
        if len(probes) == max_probes or lo >= T or T in peaks:
            break
        peaks[T] = probe(T)
        probes.append([T, peaks[T]])
    return {"T": lo, "over": hi, "probes": probes}


# ------------------------------------------------------------------------------- ranks


def _run_group(cfg: ParallelBenchConfig, preset: str, R: int) -> dict | None:
    """Runs `_rank_main` on R spawned processes; rank 0's result, or None (logged) when a
    process fails or the group passes cfg.timeout_s."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        procs = [
            ctx.Process(target=_rank_main, args=(r, R, f"{tmp}/rdv", cfg, preset, str(out)))
            for r in range(R)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + cfg.timeout_s
        # until all are done, one fails (the others would wait on it) or the time is up
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode for p in procs):
                break
            time.sleep(0.2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        codes = [p.exitcode for p in procs]
        if any(codes) or not out.exists():
            log(f"  {preset} SP={R}: failed or timed out (exit codes {codes})")
            return None
        return json.loads(out.read_text())


def _rank_main(
    rank: int, world: int, rendezvous: str, cfg: ParallelBenchConfig, preset: str, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = _measure_group(cfg, preset)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _measure_group(cfg: ParallelBenchConfig, preset: str) -> dict:
    """Every rank's part: the sweep, the longest-T search and the op's bytes; the figures
    are the group's (maxima over the ranks), the same on every rank."""
    R = dist.get_world_size()
    config = HybridConfig.from_preset(preset)
    torch.manual_seed(0)
    model = HybridLM(config).train()
    attention = [layer.self_attn for layer in model.model.layers]

    def step(T: int, counter: CollectiveCounter | None = None) -> None:
        split = SequenceSplit.even(T)
        row = torch.randint(
            0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)
        )
        ids = row[:, split.span]
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: not in the peak
        with counter or nullcontext():
            model(ids, labels=ids, split=split, logits_to_keep=0).loss.backward()

    step(min(cfg.lengths))  # allocates the gradients, warms the code paths
    rows = []
    for T in cfg.lengths:
        counter = CollectiveCounter(R, attention)
        counted = _measure(partial(step, T, counter))
        timed = [_measure(partial(step, T)) for _ in range(cfg.reps)]
        rows.append({
            "T": T, "chunk": -(-T // R),
            "step_s": statistics.median(m["wall_s"] for m in timed),
            "cpu_s": statistics.median(m["cpu_s"] for m in timed),
            "steps_s": [m["wall_s"] for m in timed],
            "peak_bytes": max(m["peak_bytes"] for m in [counted, *timed]),
            "base_bytes": max(m["base_bytes"] for m in [counted, *timed]),
            "layers": [{"type": t, **b} for t, b in zip(config.layer_types, counter.by_module,
                                                        strict=True)],
            "other": counter.other,
        })  # fmt: skip
    budget = cfg.budget_mib * 2**20
    longest = longest_within(
        budget, {r["T"]: r["peak_bytes"] for r in rows},
        lambda T: _measure(partial(step, T))["peak_bytes"], grain=64 * R,
    )  # fmt: skip
    op_bytes = []
    if R > 1 and "lightning" in config.layer_types:
        op_bytes = [{"T": T, **_lightning_op_bytes(config, T, R)} for T in cfg.byte_lengths]
    return {"preset": preset, "sp": R, "rows": rows, "longest": longest, "op_bytes": op_bytes}


def _measure(fn: Callable[[], None]) -> dict:
    """One call of fn on every rank: the slowest rank's wall and CPU seconds, and the largest
    peak memory above, and resident memory before, of any rank."""
    release_freed_memory()  # freed pages back to the OS, so that the peak counts reuse
    dist.barrier()
    base = reset_peak("cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = torch.tensor([wall, cpu, peak_since("cpu", base), base], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    wall, cpu, peak, base = stats.tolist()
    return {"wall_s": wall, "cpu_s": cpu, "peak_bytes": int(peak), "base_bytes": int(base)}


def _lightning_op_bytes(config: HybridConfig, T: int, R: int) -> dict[str, int]:
    """Bytes one lightning layer's op (forward + backward) sends from this rank on a row of
    T tokens split across the R ranks: q, k, v [1, T/R, H, K] in fp32, one document."""
    split = SequenceSplit.even(T)
    H, K = config.num_heads, config.head_dim
    g = torch.Generator().manual_seed(split.rank)
    q, k, v = (
        torch.randn(1, split.lengths[split.rank], H, K, generator=g).requires_grad_()
        for _ in range(3)
    )
    decay = decay_rates(H, 0, config.num_layers)
    counter = CollectiveCounter(R)
    with counter:
        o, _ = lightning_attn_split(q, k, v, decay, split, scale=1.0,
                                    block_size=config.block_size)  # fmt: skip
        o.sum().backward()
    return counter.other


# ----------------------------------------------------------------------------- report


def _formulas(config: HybridConfig, T: int, R: int) -> dict[str, int]:
    """Payload bytes per rank per step that one layer of each kind should send: lightning
    2·H·K·V·4 (its fp32 end state, forward and backward), softmax 2·⌈T/R⌉·G·2D·4 (its
    chunk of keys and values, padded to the longest, forward and backward)."""
    H, G, D = config.num_heads, config.num_kv_heads, config.head_dim
    return {"lightning": 2 * H * D * D * FP32, "softmax": 2 * -(-T // R) * G * 2 * D * FP32}


def _per_kind(row: dict) -> dict[str, int]:
    """Payload bytes per step (forward + backward) of one layer of each kind in the row:
    the largest over that kind's layers (they are equal when the count is right)."""
    sent: dict[str, int] = {}
    for layer in row["layers"]:
        b = layer["forward"] + layer["backward"]
        sent[layer["type"]] = max(sent.get(layer["type"], 0), b)
    return sent


def _summarise(
    cfg: ParallelBenchConfig,
    groups: list[dict],
    seconds: float,
    load: list,
    roofline: Roofline,
    failed: list[dict],
) -> dict:
    models = {}
    for p in cfg.presets:
        c = HybridConfig.from_preset(p)
        with torch.device("meta"):
            params = HybridLM(c).param_count()["total"]
        models[p] = {"layer_types": c.layer_types, "params": params, "H": c.num_heads,
                     "G": c.num_kv_heads, "head_dim": c.head_dim}  # fmt: skip
    for g in groups:
        c = HybridConfig.from_preset(g["preset"])
        # a step is forward + backward (3 × forward FLOPs) on R ranks of one thread each
        cores = min(g["sp"], os.cpu_count() or 1)
        for r in g["rows"]:
            r["sent_per_layer"] = _per_kind(r)
            r["formula_per_layer"] = _formulas(c, r["T"], g["sp"])
            flops = train_flops_per_token(c, r["T"]) * r["T"] / r["step_s"]
            r["of_gemm"] = flops / 1e9 / (cores * roofline.gemm("float32"))
        for r in g["op_bytes"]:
            r["formula"] = _formulas(c, r["T"], g["sp"])["lightning"]
    report = {
        "benchmark": "parallel",
        "config": asdict(cfg),
        "models": models,
        "machine": {**describe_machine("cpu"), "torch_threads": 1},
        "load_average_1min": {"start": load[0], "end": load[-1]},
        "roofline": roofline.to_dict(),
        "seconds": seconds,
        "groups": groups,
        "failed": failed,
    }
    report["targets"] = _targets(report)
    return report


def _targets(report: dict) -> dict:
    """Per preset with lightning layers: its op's bytes equal at the shortest and longest
    byte length, and those and every lightning layer's in the model's steps (SP > 1) equal
    to the formula; per all-lightning preset: the longest T within the budget at the
    largest degree over SP = 1. A preset with a degree that failed has its targets not
    measured (none holds over fewer degrees than asked)."""
    targets = {}
    cfg = report["config"]
    short, long = cfg["byte_lengths"][0], cfg["byte_lengths"][-1]
    for p, model in report["models"].items():
        broken = any(f["preset"] == p for f in report.get("failed", []))
        groups = {g["sp"]: g for g in report["groups"] if g["preset"] == p}
        ops = [r for g in groups.values() for r in g["op_bytes"]]
        lightning = "lightning" in model["layer_types"] and max(cfg["sp"]) > 1
        if ops or (broken and lightning):
            flat = []
            for g in groups.values():
                at = {r["T"]: r["forward"] + r["backward"] for r in g["op_bytes"]}
                if short in at and long in at and long > short:
                    flat.append(abs(at[long] / at[short] - 1))
            sent = [(r["forward"] + r["backward"], r["formula"]) for r in ops] + [
                (layer["forward"] + layer["backward"], row["formula_per_layer"]["lightning"])
                for g in groups.values() if g["sp"] > 1 for row in g["rows"]
                for layer in row["layers"] if layer["type"] == "lightning"
            ]  # fmt: skip
            off = [abs(b / formula - 1) for b, formula in sent]
            targets[f"{p}:lightning_bytes_flat"] = target(
                None if broken else max(flat, default=None), "<=", 0.01,
                f"{p} lightning bytes per layer, T={short:,} vs {long:,}: largest relative "
                "difference",
                ".4f",
            )  # fmt: skip
            targets[f"{p}:lightning_bytes_formula"] = target(
                None if broken else max(off, default=None), "<=", 0.05,
                f"{p} lightning bytes per layer (every one, SP > 1) vs 2·H·K·V·4: largest "
                "relative difference", ".4f",
            )  # fmt: skip
        if set(model["layer_types"]) == {"lightning"} and (groups or broken):
            top = max(cfg["sp"])
            one = groups.get(1, {}).get("longest", {}).get("T")
            value = ratio(groups[top]["longest"]["T"], one) if top in groups else None
            targets[f"{p}:longest"] = target(
                None if broken else value,
                ">=",
                3.5,
                f"{p} longest T within {cfg['budget_mib']:g} MiB per rank, SP={top} / SP=1",
            )
    return targets


def format_table(report: dict) -> str:
    """Markdown: the sweep, the longest T within the budget, the op's bytes at long T, then
    the machine, what was measured and the targets."""
    mib, kib = 2**20, 1024
    lines = [
        "| preset | SP | T | tokens per rank | step s | tok/s | of GEMM | rank CPU s | "
        "peak MiB per rank | lightning KiB per layer (formula) | softmax KiB per layer "
        "(formula) | other bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in report["groups"]:
        for r in g["rows"]:
            sent, formula = r["sent_per_layer"], r["formula_per_layer"]
            kinds = [
                f"{sent[k] / kib:,.1f} ({formula[k] / kib:,.1f})" if k in sent else "-"
                for k in ("lightning", "softmax")
            ]
            other = r["other"]["forward"] + r["other"]["backward"]
            lines.append(
                f"| {g['preset']} | {g['sp']} | {r['T']:,} | {r['chunk']:,} | "
                f"{r['step_s']:.2f} | {r['T'] / r['step_s']:,.0f} | "
                f"{fmt(r.get('of_gemm'), '.2f')} | {r['cpu_s']:.2f} | "
                f"{r['peak_bytes'] / mib:,.0f} | {kinds[0]} | {kinds[1]} | {other:,} |"
            )
    budget = report["config"]["budget_mib"]
    lines += [
        "",
        f"| preset | SP | longest T within {budget:g} MiB per rank | shortest T over it | "
        "peak MiB at the longest | × SP=1 |",
        "|---|---|---|---|---|---|",
    ]
    for g in report["groups"]:
        s = g["longest"]
        peaks = {r["T"]: r["peak_bytes"] for r in g["rows"]} | {T: p for T, p in s["probes"]}
        peak = peaks.get(s["T"])
        one = next((h["longest"]["T"] for h in report["groups"]
                    if h["preset"] == g["preset"] and h["sp"] == 1), None)  # fmt: skip
        lines.append(
            f"| {g['preset']} | {g['sp']} | {s['T']:,} | {fmt(s['over'], ',')} | "
            f"{fmt(peak and peak / mib, ',.0f')} | "
            f"{fmt(ratio(s['T'], one), '.2f')} |"
        )
    ops = [(g, r) for g in report["groups"] for r in g["op_bytes"]]
    if ops:
        lines += [
            "",
            "| preset | SP | T | lightning op bytes per rank, forward + backward | "
            "formula 2·H·K·V·4 | ring bytes |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {g['preset']} | {g['sp']} | {r['T']:,} | {r['forward'] + r['backward']:,} | "
            f"{r['formula']:,} | {r['ring']:,} |"
            for g, r in ops
        ]
    m, load, cfg = report["machine"], report["load_average_1min"], report["config"]
    base = max((r["base_bytes"] for g in report["groups"] for r in g["rows"]), default=0)
    lines += [
        "",
        f"machine: {m['cpu']}, {m['cores']} cores shared by the ranks (one torch thread "
        f"each), torch {m['torch']}; load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end; {report['seconds'] / 60:.1f} minutes in all",
        f"step: fp32, one row of T tokens (one document) split evenly, forward with labels "
        f"and backward, no optimizer, no activation checkpointing; step s and rank CPU s: "
        f"the slowest rank, median of {cfg['reps']} steps; peak: a rank's largest rise in "
        f"resident memory during a step (VmHWM, reset each step, malloc trimmed) above its "
        f"resident memory before it (weights, gradients, runtime: up to {base / mib:,.0f} MiB)",
        "bytes: payload per rank per step, forward + backward (all-gather: the rank's shard; "
        "reduce-scatter: its shard of the result; all-reduce: the tensor), counted on every "
        "c10d op by a TorchDispatchMode; other: the loss's and the MoE's collectives; at SP=1 "
        "the calls run on a group of one (counted; nothing leaves the rank, ring bytes 0); "
        "the op rows run one lightning layer's op alone (the whole model does not fit at "
        "long T)",
        Roofline.from_dict(report["roofline"]).summary() + " (one thread); of GEMM: a "
        "step's 3 × forward FLOPs per second ÷ (min(SP, cores) × one thread's fp32 GEMM peak)",
        *filter(None, [failed_line(report.get("failed", []))]),
        targets_line(report["targets"]),
    ]
    return "\n".join(lines)


def plot_parallel(report: dict, path: Path) -> None:
    """Three panels against T: peak MiB per rank (with the budget), step seconds, and bytes
    per layer per step (lightning: the model and the op alone; softmax)."""
    from lightlong.plot import pyplot, save, series, tidy

    fig, (mem, secs, sent) = pyplot().subplots(1, 3, figsize=(16, 4.4))
    for i, g in enumerate(report["groups"]):
        label = f"{g['preset']} SP={g['sp']}"
        peaks = sorted(
            [(r["T"], r["peak_bytes"]) for r in g["rows"]]
            + [(T, p) for T, p in g["longest"]["probes"]]
        )
        mem.plot(*zip(*[(T, p / 2**20) for T, p in peaks], strict=True), label=label,
                 **series(i))  # fmt: skip
        secs.plot([r["T"] for r in g["rows"]], [r["step_s"] for r in g["rows"]], label=label,
                  **series(i))  # fmt: skip
    mem.axhline(report["config"]["budget_mib"], color="grey", linestyle=":", label="budget")
    lines = 0
    for g in report["groups"]:
        if g["sp"] == 1:
            continue
        points = {k: [(r["T"], r["sent_per_layer"][k] / 1024) for r in g["rows"]
                      if k in r["sent_per_layer"]] for k in ("lightning", "softmax")}  # fmt: skip
        points["lightning"] += [(r["T"], (r["forward"] + r["backward"]) / 1024)
                                for r in g["op_bytes"]]  # fmt: skip
        for kind, pts in points.items():
            if pts:
                sent.plot(*zip(*sorted(pts), strict=True),
                          label=f"{g['preset']} SP={g['sp']} {kind}", **series(lines))  # fmt: skip
                lines += 1
    for ax, title, ylabel in (
        (mem, "peak memory a step adds, per rank", "MiB"),
        (secs, "step time (slowest rank)", "s"),
        (sent, "bytes sent per layer per step, per rank", "KiB"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens in the row)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"sequence parallelism, fp32 training step — {m['cpu']}, {m['cores']} cores "
                 f"shared by the ranks", fontsize=9)  # fmt: skip
    tidy(mem, secs, sent)
    save(fig, path, dpi=120)
