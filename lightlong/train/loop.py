"""`Trainer`: the training loop — AdamW with warmup + cosine, clipping, accumulation, bf16
autocast, activation checkpointing, non-finite step skipping, evaluation, metrics (JSONL,
and TensorBoard when installed), checkpoints with exact resume, and DDP / FSDP2 across
processes.

Launch several processes with `torchrun --nproc-per-node N -m lightlong train ...`: each
takes its share of every global batch; rank 0 logs and saves. With `parallel.sequence=S`
the processes form a data × sequence grid: the S ranks of a replica hold contiguous chunks
of the same packed rows (`lightlong.parallel`), and gradients are all-reduced over all ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightlong.bench.machine import matmul_gflops
from lightlong.model import HybridConfig, HybridLM
from lightlong.model.checkpoint import CheckpointError, ensure_writable_dir
from lightlong.model.hybrid import check_splittable
from lightlong.model.info import train_flops_per_token
from lightlong.model.source import load_model
from lightlong.parallel import (
    SequenceSplit,
    apply_expert_parallel,
    expert_parameters,
    full_state_dict,
    split_next_token_targets,
)
from lightlong.runtime import check_device
from lightlong.train.checkpoint import load_trainer_state, resume_candidates, save_checkpoint
from lightlong.train.config import TrainConfig
from lightlong.train.data import Batch, SyntheticData, SyntheticTask, TextData


class NonFiniteLossError(RuntimeError):
    """Raised after `max_nonfinite` non-finite steps in a row."""


class TrainingInterrupted(KeyboardInterrupt):
    """A command that trains several models (demo, ablate) was stopped by SIGINT/SIGTERM;
    `signum` is the signal, the message says where the stopped run saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # crosses process pools (ablate's workers) intact
        return type(self), (str(self), self.signum)


# What a trainer state must hold to resume from it
_STATE_KEYS = ("step", "optimizer", "scheduler", "data", "rng", "nonfinite_total",
               "nonfinite_run")  # fmt: skip
# TrainConfig keys that fix the shape of the data a checkpoint's state belongs to
_DATA_KEYS = ("task", "seq_len", "batch_size", "grad_accum", "num_pairs", "num_queries",
              "min_pairs", "data_files", "text_field", "tokenizer")  # fmt: skip


class Trainer:
    """Builds the model, data and optimizer from a `TrainConfig`; `fit()` trains.

    In a process group (torchrun), the model is wrapped in DDP or FSDP2 and every process
    takes `batch_size / world_size` samples of each step. With sequence parallelism each
    replica (`sequence` ranks) takes `batch_size / replicas` samples, packed into one row
    per micro-batch that its ranks split into chunks; the model stays plain and the
    gradients are all-reduced after the backward.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        check_device(cfg.device)
        self.rank, self.world = _init_distributed(cfg.device)
        cfg.parallel.check_world(self.world)
        self.device = _device(cfg.device)
        self.sp, self.ep = cfg.parallel.sequence, cfg.parallel.expert
        self.by_hand = self.sp > 1 or self.ep > 1  # no DDP: gradients reduced by hand
        self.sp_group, self.data_rank, self.data_world = self._mesh()
        self.ep_group, self.ep_replicas = self._expert_mesh()
        self._check_row_fits()
        self.main = self.rank == 0
        self.out = Path(cfg.out_dir)
        if self.main:  # created at the first save; checked now, before anything is built
            ensure_writable_dir(self.out, create=False)
        candidates = resume_candidates(cfg.resume, self.out)

        self.model: HybridLM = load_model(cfg.model, device=self.device, seed=cfg.seed)
        self._check_model_splits()
        self.model.train()
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.wrapped: nn.Module = self._wrap(self.model)
        # ids of the expert-parallel shards (none without it): reduced and clipped apart
        self.expert_ids = set(map(id, expert_parameters(self.model).values()))
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2), fused=False,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.tokenizer = None  # the text task's; saved with every checkpoint
        self.data, self.eval_data = self._make_data()
        self.step = 0
        self.nonfinite_total = self.nonfinite_run = 0
        self.resumed_from = self._resume(candidates)
        self._stop_signal: int | None = None
        self.resume_hint = True
        """Say how to resume when a signal stops `fit` (commands that train several models,
        whose runs cannot be resumed from their command line, turn it off)."""

    # -- setup -----------------------------------------------------------------------------

    def _mesh(self) -> tuple[dist.ProcessGroup | None, int, int]:
        """(sequence-parallel group, replica index, replicas): a (data, sequence) DeviceMesh
        under sequence parallelism (a replica's ranks are consecutive)."""
        if self.sp == 1:
            return None, self.rank, self.world
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world // self.sp, self.sp),
                                mesh_dim_names=("data", "sequence"))  # fmt: skip
        return mesh["sequence"].get_group(), mesh["data"].get_local_rank(), self.world // self.sp

    def _expert_mesh(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(expert-parallel group, group of the ranks holding the same experts): a (replica,
        expert) DeviceMesh under expert parallelism (an expert group's ranks are
        consecutive; they hold different tokens, of one replica's row or of several)."""
        if self.ep == 1:
            return None, None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world // self.ep, self.ep),
                                mesh_dim_names=("replica", "expert"))  # fmt: skip
        replicas = mesh["replica"].get_group() if self.world > self.ep else None
        return mesh["expert"].get_group(), replicas

    def _check_row_fits(self) -> None:
        c = self.cfg
        samples = c.batch_size // c.grad_accum
        if samples % self.data_world:
            raise ValueError(
                f"batch_size / grad_accum = {samples} samples per micro-batch must divide by "
                f"the {self.data_world} replicas ({self.world} processes / parallel.sequence="
                f"{self.sp})"
            )
        row = samples // self.data_world * min([c.seq_len, *c.eval_lengths])
        if row < self.sp:
            raise ValueError(
                f"parallel.sequence={self.sp} splits rows of {row} tokens (seq_len, "
                "eval_lengths): each rank needs at least one (raise them or batch_size)"
            )

    def _check_model_splits(self) -> None:
        if self.sp > 1:
            check_splittable(self.model.config, f"parallel.sequence={self.sp}: ")

    def _wrap(self, model: HybridLM) -> nn.Module:
        if self.ep > 1:
            if model.config.num_experts % self.ep:
                raise ValueError(
                    f"parallel.expert={self.ep} must divide the model's {model.config.num_experts}"
                    " experts (num_local_experts)"
                )
            apply_expert_parallel(model, self.ep_group)
        if self.world == 1 or self.by_hand:
            return model
        if self.cfg.parallel.data == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            # An expert that gets no token on one rank has no gradient there, while another
            # rank's has one: reduce-scatter zeros for it, or the ranks' collectives differ.
            if hasattr(model, "set_reduce_scatter_unused_params"):  # not in older torch
                model.set_reduce_scatter_unused_params(True)
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Experts that get no token in a step have no gradient: DDP must look for them.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=True
        )

    def _make_data(self):
        c, V = self.cfg, self.model.config.vocab_size
        local = c.batch_size // c.grad_accum
        if c.task == "text":
            from lightlong.model.source import load_model_tokenizer

            # tokenizer= when given, else the one a checkpoint to fine-tune was trained on
            tok = self.tokenizer = load_model_tokenizer(c.model, c.tokenizer or None)
            if tok.vocab_size > V:
                raise ValueError(f"tokenizer has {tok.vocab_size} ids, the model {V}")
            make = lambda files: TextData(  # noqa: E731
                files, tok, c.seq_len, local, c.text_field, self.data_rank, self.data_world
            )
            # Held-out text: the last file when there are several, else the same data.
            files = c.data_files
            held = files[-1:] if len(files) > 1 else files
            return make(files[:-1] if len(files) > 1 else files), make(held)
        task = SyntheticTask(c.task, V, c.num_pairs, c.num_queries)
        train = SyntheticData(dataclasses.replace(task, min_pairs=c.min_pairs), c.seq_len, local,
                              c.seed, self.data_rank, self.data_world)  # fmt: skip
        held = SyntheticData(task, c.seq_len, local, c.seed + 1_000_003, self.data_rank,
                             self.data_world)  # fmt: skip
        return train, held

    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        return lr_factor(step, c.warmup_steps, c.steps, c.min_lr_ratio)

    # -- training --------------------------------------------------------------------------

    def _autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, batch: Batch):
        """The model's output on a micro-batch: under sequence parallelism on this rank's
        chunk, whose loss is this rank's share of the row's (the shares add up to it)."""
        ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
        where: dict = {"cu_seqlens": batch.cu_seqlens.to(self.device)}
        if self.sp > 1:
            ids, labels, split = self.chunk(batch)
            where = {"split": split}
        with self._autocast():
            return self.wrapped(ids, labels=labels, logits_to_keep=0, **where)

    def chunk(self, batch: Batch) -> tuple[Tensor, Tensor, SequenceSplit]:
        """This rank's chunk of a packed row: input_ids and labels [1, C_r] on the device,
        and the split (rows are cut into `parallel.sequence` chunks of near-equal length)."""
        split = SequenceSplit.even(batch.num_tokens, batch.cu_seqlens, self.sp_group)
        part = split.span
        return (batch.input_ids[:, part].to(self.device), batch.labels[:, part].to(self.device),
                split)  # fmt: skip

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; a non-finite loss or gradient
        skips the update (parameters unchanged) and is counted."""
        c = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
        tokens, finite = 0, True
        for _ in range(c.grad_accum):
            batch = next(self.data)
            out = self._loss(batch)
            finite &= bool(torch.isfinite(out.loss))
            # Backward (and clipping) even when non-finite: under DDP / FSDP they run
            # collectives that the other ranks wait for. A skipped step drops the gradients.
            (out.loss / c.grad_accum).backward()
            for k in totals:
                totals[k] += float(getattr(out, k).detach()) / c.grad_accum
            tokens += batch.num_tokens
        # Parameters without a gradient (experts no token chose) get zeros, as FSDP's
        # reduce-scatter gives them: every mode then takes the same AdamW step.
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.by_hand:
            self._reduce_gradients()
        if self.sp > 1:
            totals = self._row_totals(totals)
        grad_norm = self._clip()
        finite = _all_ranks(finite and math.isfinite(grad_norm), self.device)
        if finite:
            self.optimizer.step()
            self.nonfinite_run = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= c.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_run} non-finite steps in a row (max_nonfinite="
                    f"{c.max_nonfinite}) at step {self.step}: lower lr, or check the data"
                )
        self.scheduler.step()
        self.step += 1
        return {**totals, "grad_norm": grad_norm, "skipped": not finite,
                "tokens": tokens * self.data_world}  # fmt: skip

    def _reduce_gradients(self) -> None:
        """Sequence and expert parallel: each rank's gradient is its chunk's share of its
        replica's rows. Summed over all ranks and divided by the replicas, every rank holds
        the gradient of the mean over replicas (what DDP gives without them). A sharded
        expert's gradient already collects its expert group's tokens (the all-to-all's
        backward): it is summed over the ranks holding the same experts only."""
        experts = self.expert_ids
        replicated = [p.grad for p in self.model.parameters() if id(p) not in experts]
        _sum_over(replicated, None, self.data_world)
        sharded = [p.grad for p in self.model.parameters() if id(p) in experts]
        if self.ep_replicas is not None:  # one expert group: nothing to sum over
            _sum_over(sharded, self.ep_replicas, self.data_world)
        else:
            for g in sharded:
                g /= self.data_world

    def _row_totals(self, totals: dict) -> dict:
        """Sequence parallel: the row's loss from the ranks' shares (summed over the
        sequence group); the aux loss is already the row's on every rank."""
        shares = torch.tensor([totals["loss"], totals["lm_loss"]], dtype=torch.float64,
                              device=self.device)  # fmt: skip
        dist.all_reduce(shares, group=self.sp_group)
        return {**totals, "loss": float(shares[0]), "lm_loss": float(shares[1])}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.ep > 1:  # the norm over every expert: each expert group holds its share
            experts = self.expert_ids
            mine = [p.grad for p in params if id(p) in experts]
            norm_sq = torch.nn.utils.get_total_norm(mine).double() ** 2
            dist.all_reduce(norm_sq, group=self.ep_group)
            rest = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in experts])
            norm = (norm_sq + rest.double() ** 2).sqrt().to(rest.dtype)
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            return float(norm)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def fit(self) -> dict:
        """Trains to `steps`, evaluating, logging and saving on the way; SIGINT/SIGTERM
        save a checkpoint and return. Returns the last metrics."""
        c = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for partial in self.out.glob(".step-*"):
                shutil.rmtree(partial, ignore_errors=True)
            _truncate_metrics(metrics_path, self.step)
        peak = matmul_gflops(1024, device=str(self.device)) * 1e9
        flops_tok = train_flops_per_token(self.model.config, c.seq_len)
        bar = None
        if self.main and c.progress:
            from tqdm import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc="train", file=sys.stderr,
                       dynamic_ncols=True)  # fmt: skip
        board = _tensorboard(self.out / "tensorboard") if self.main else None
        last: dict = {}
        window_tokens, window_t0 = 0, time.perf_counter()
        with _signals(self):
            # a signal may reach the ranks at different steps: they stop together
            while self.step < c.steps and _all_ranks(self._stop_signal is None, self.device):
                m = self.train_step()
                window_tokens += m["tokens"]
                if bar is not None:
                    bar.update(1)
                at_end = self.step == c.steps
                eval_due = (c.eval_every and self.step % c.eval_every == 0) or at_end
                if self.step % c.log_every == 0 or eval_due:
                    dt = time.perf_counter() - window_t0
                    tok_s = window_tokens / dt
                    last = {"step": self.step, "loss": m["loss"], "lm_loss": m["lm_loss"],
                            "aux_loss": m["aux_loss"], "grad_norm": m["grad_norm"],
                            "lr": self.scheduler.get_last_lr()[0], "tok_s": tok_s,
                            "flops_frac": tok_s * flops_tok / peak,
                            "nonfinite": self.nonfinite_total}  # fmt: skip
                    if eval_due:
                        last.update(self.evaluate())
                    self._log(metrics_path, last, bar, board)
                    window_tokens, window_t0 = 0, time.perf_counter()
                if c.save_every and self.step % c.save_every == 0 and not at_end:
                    self.save()
            saved = self.save()
        if bar is not None:
            bar.close()
        if self.stopped and self.main and self.resume_hint:
            print(
                f"lightlong: {self.stopped} at step {self.step} of {c.steps}: saved {saved}; "
                f"resume with the same command and resume=auto out_dir={self.out}",
                file=sys.stderr,
            )
        if board is not None:
            board.close()
        if self.main and metrics_path.is_file():  # none when stopped before the first log
            plot_metrics(metrics_path, self.out / "loss.png")
        return last

    @property
    def stopped(self) -> str | None:
        """The name of the signal that stopped `fit` early (SIGINT, SIGTERM), else None."""
        return None if self._stop_signal is None else signal.Signals(self._stop_signal).name

    def raise_if_stopped(self, what: str) -> None:
        """TrainingInterrupted when `fit` was stopped: for commands that train several
        models (`what` names the one that was running)."""
        if self._stop_signal is not None:
            raise TrainingInterrupted(
                f"{self.stopped} while training {what} (step {self.step} of {self.cfg.steps}, "
                f"saved in {self.out}); no report written",
                self._stop_signal,
            )

    # -- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and answer accuracy at seq_len (and recall at eval_lengths)."""
        self.model.eval()
        out = self._eval_at(None)
        if isinstance(self.eval_data, SyntheticData):
            for T in self.cfg.eval_lengths:
                out.update({f"{k}@{T}": v for k, v in self._eval_at(T).items()})
        self.model.train()
        return out

    def _eval_at(self, length: int | None) -> dict:
        with self._autocast():
            totals = answer_totals(
                self.model, self.eval_data, self.cfg.eval_batches, length, self.device,
                chunk=self.chunk if self.sp > 1 else None,
            )  # fmt: skip
        if self.world > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
        return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1)}

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything but the weights that an exact resume needs."""
        return {
            "step": self.step,
            "optimizer": _optimizer_state(
                self.model, self.optimizer, self.world, self.cfg, self.ep_group
            ),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "config": dataclasses.asdict(self.cfg),
        }

    def save(self) -> Path | None:
        """Writes out_dir/step-N/ (rank 0 writes; every rank takes part in gathering)."""
        weights = _full_model_state(self.model, self.world, self.cfg)
        state = self.state_dict()
        path = None
        if self.main:
            tokenizer = self.tokenizer or f"synthetic task {self.cfg.task}"
            path = save_checkpoint(self.out, self.step, self.model.config, weights, state,
                                   self.cfg.keep_last, tokenizer=tokenizer)  # fmt: skip
        if self.world > 1:
            dist.barrier()
        return path

    def _resume(self, candidates) -> Path | None:
        """Loads the first of `candidates` that reads; with resume=auto one that does not is
        skipped with a warning saying why (and, in one process, moved to step-N.broken-TIME).
        A checkpoint of another model or data shape is refused (ValueError) before anything
        is loaded."""
        for path in candidates:
            try:
                self._refuse_mismatch(path)
                weights = HybridLM.from_pretrained(path, dtype=torch.float32).state_dict()
                state = load_trainer_state(path)
                missing = [k for k in _STATE_KEYS if k not in state]
                if missing:
                    raise CheckpointError(f"{path}: trainer state lacks {missing}")
            except CheckpointError as e:
                if self.cfg.resume != "auto":
                    raise
                where = ""
                if self.world == 1:  # out of keep_last's count, kept for a look (with
                    # several ranks, others may still be reading it: left in place)
                    aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
                    os.replace(path, aside)
                    where = f" (moved to {aside.name})"
                if self.main:
                    warnings.warn(f"resume: skipping {path}{where}: {e}", stacklevel=2)
                continue
            self._refuse_data_mismatch(path, state)
            self._load(weights, state)
            if self.main:
                print(f"resuming from {path} (step {self.step})", file=sys.stderr)
            return path
        return None

    def _refuse_mismatch(self, path: Path) -> None:
        try:
            saved = HybridConfig.from_json(path / "config.json")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        except OSError as e:
            raise CheckpointError(f"{path / 'config.json'}: {e.strerror or e}") from None
        ours, theirs = self.model.config.to_minimax_dict(), saved.to_minimax_dict()
        differ = [k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)]
        if differ:
            shown = ", ".join(
                f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(differ)[:4]
            )
            raise ValueError(
                f"resume: {path} is a checkpoint of another model ({shown}); use a new "
                "out_dir, or model= the checkpoint's"
            )

    def _refuse_data_mismatch(self, path: Path, state: dict) -> None:
        saved = state.get("config", {})
        ours = vars(self.cfg)
        differ = [k for k in _DATA_KEYS if k in saved and saved[k] != ours[k]]
        if differ:
            shown = ", ".join(f"{k}={saved[k]!r} there, {ours[k]!r} here" for k in differ)
            raise ValueError(f"resume: {path} was trained on other data ({shown})")

    def _load(self, weights: dict, state: dict) -> None:
        if self.world > 1 and self.cfg.parallel.data == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        elif self.ep > 1:  # this rank's experts of the full weights and moments
            mine = self.model.state_dict().keys()
            self.model.load_state_dict({k: v for k, v in weights.items() if k in mine})
            self.optimizer.load_state_dict(_local_optimizer_state(self.model, state["optimizer"]))
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]

    def _log(self, path: Path, metrics: dict, bar, board) -> None:
        if not self.main:
            return
        with path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if board is not None:
            for key, value in metrics.items():
                if key != "step":
                    board.add_scalar(key, value, metrics["step"])
        if bar is not None:
            shown = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tok_s']:,.0f}",
                     "mfu": f"{metrics['flops_frac']:.1%}"}  # fmt: skip
            if "eval_accuracy" in metrics:
                shown["eval_acc"] = f"{metrics['eval_accuracy']:.2f}"
            bar.set_postfix(shown)


@torch.no_grad()
def answer_totals(
    model: HybridLM,
    data: SyntheticData | TextData,
    batches: int,
    length: int | None,
    device: torch.device,
    chunk=None,
) -> Tensor:
    """Summed loss, correct argmax predictions and count over the labelled tokens of the
    first `batches` batches of held-out `data` (synthetic: at `length` if given): float64 [3].
    This rank's share only; a distributed caller sums them. With `chunk` (`Trainer.chunk`:
    batch -> this rank's ids, labels and split) each row runs split across ranks."""
    loss_sum = correct = count = 0.0
    for b in range(batches):
        if isinstance(data, SyntheticData):
            batch = synthetic_batch(data, b * data.batch_size, data.batch_size, length)
        else:
            data.position = b * data.batch_size  # batch_size: all ranks' windows
            batch = next(data)
        if chunk is None:
            ids, labels = batch.input_ids.to(device), batch.labels.to(device)
            logits = model(ids, cu_seqlens=batch.cu_seqlens.to(device)).logits[:, :-1]
            target = labels[:, 1:].clone()
            target[:, (batch.cu_seqlens[1:-1] - 1).to(device)] = -100  # documents' last
        else:  # the next rank's first label is the last position's target
            ids, labels, split = chunk(batch)
            logits = model(ids, split=split).logits
            target = split_next_token_targets(labels, split)[None]
        mask = target != -100
        pred = logits.argmax(-1)
        lp = torch.log_softmax(logits.float(), -1)
        nll = -lp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        loss_sum += float(nll[mask].sum())
        correct += float((pred == target)[mask].sum())
        count += float(mask.sum())
    return torch.tensor([loss_sum, correct, count], dtype=torch.float64)


def synthetic_batch(data: SyntheticData, first: int, count: int, length: int | None) -> Batch:
    """Samples first … first + count − 1 of `data` (at `length`), packed (this rank's share)."""
    from lightlong.train.data import _pack

    local = count // data.world_size
    start = first + data.rank * local
    samples = [data.sample(i, length) for i in range(start, start + local)]
    return _pack([s[0] for s in samples], [s[1] for s in samples])


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Training and held-out loss vs step from metrics.jsonl, titled with the run directory's
    name and the last step."""
    from lightlong.plot import pyplot, save, series, tidy

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss",
            **series(0, dense=True))  # fmt: skip
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], label="held-out",
                **series(1))  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{metrics_path.resolve().parent.name} — step {rows[-1]['step']}", fontsize=9)
    tidy(ax)
    save(fig, png)


# -- helpers -------------------------------------------------------------------------------


def _tensorboard(log_dir: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def lr_factor(step: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """The learning rate's multiplier at `step`: linear warm-up from 0, then cosine decay to
    min_lr_ratio at `steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, experts, embeddings); none on norms."""
    params = dict(model.named_parameters())
    decay, rest = _decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in rest], "weight_decay": 0.0}]  # fmt: skip


def _decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names with weight decay (matrices) and without, in the optimizer's order."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]


def _unsharded_split(model: HybridLM) -> tuple[list[str], list[str]]:
    """`_decay_split` of the model without expert parallelism (built on meta)."""
    with torch.device("meta"):
        return _decay_split(HybridLM(model.config))


def _gathered_optimizer_state(model: HybridLM, optimizer, group: dist.ProcessGroup) -> dict:
    """Expert parallel: the optimizer state as one process without it would have it (every
    expert's moments gathered from the ranks of `group`, indexed in the unsharded order), so
    a checkpoint resumes with any expert-parallel degree."""
    local = optimizer.state_dict()
    names = [n for group in _decay_split(model) for n in group]  # by optimizer index
    named = {names[i]: st for i, st in local["state"].items()}
    experts = expert_parameters(model)
    parts: list = [None] * dist.get_world_size(group)
    mine = {n: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
            for n, st in named.items() if n in experts}  # fmt: skip
    dist.all_gather_object(parts, mine, group=group)
    for part in parts:
        named.update(part)
    groups = _unsharded_split(model)
    index = {n: i for i, n in enumerate(n for group in groups for n in group)}
    return {
        "state": {index[n]: st for n, st in named.items()},
        "param_groups": [dict(g, params=[index[n] for n in names])
                         for g, names in zip(local["param_groups"], groups, strict=True)],
    }  # fmt: skip


def _local_optimizer_state(model: HybridLM, full: dict) -> dict:
    """The part of an unsharded optimizer state that this rank's parameters hold (expert
    parallel: its experts' moments), indexed as its optimizer expects."""
    names = [n for group in _unsharded_split(model) for n in group]
    groups = _decay_split(model)
    index = {n: i for i, n in enumerate(n for group in groups for n in group)}
    return {
        "state": {index[names[i]]: st for i, st in full["state"].items() if names[i] in index},
        "param_groups": [dict(g, params=[index[n] for n in mine])
                         for g, mine in zip(full["param_groups"], groups, strict=True)],
    }  # fmt: skip


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":  # object collectives and barriers use the current device
            torch.cuda.set_device(_device(device))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _device(name: str) -> torch.device:
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """flag on every rank (a step is skipped everywhere if any rank saw a non-finite value)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _sum_over(grads: list[Tensor], group: dist.ProcessGroup | None, divide: int) -> None:
    """Sums gradients over a group (None: all ranks) in one flat all-reduce, then divides."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divide
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def _full_model_state(model: HybridLM, world: int, cfg: TrainConfig) -> dict:
    """The full (unsharded) weights: every expert gathered under expert parallelism, and
    everything on CPU under FSDP."""
    if cfg.parallel.expert > 1:
        return full_state_dict(model)
    if world == 1 or cfg.parallel.data != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def _optimizer_state(
    model: HybridLM, optimizer, world: int, cfg: TrainConfig, ep_group: dist.ProcessGroup | None
) -> dict:
    if ep_group is not None:
        return _gathered_optimizer_state(model, optimizer, ep_group)
    if world == 1 or cfg.parallel.data != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines past `step` (a resumed run writes them again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


@contextlib.contextmanager
def _signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the loop to stop after the current step (it then saves)."""

    def handler(signum, frame):
        trainer._stop_signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
