"""The training loop behind ``plait train``: a GPT on the embedded corpus under any strategy.

One optimizer step = one global batch of ``batch_size`` sequences, whatever the number of ranks:
each rank takes its slice (``BatchSampler``) and splits it into micro-batches of ``micro_batch``;
all but the last run under ``model.no_sync()``, so gradients are communicated once per step.
Then the global gradient norm is clipped, the learning rate follows linear warmup and cosine decay,
and the optimizer steps. Every rank appends its measurements to ``RUN_DIR/metrics.jsonl``; rank 0
shows a progress bar and, at the end, a summary table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import plait
from plait import checkpoint
from plait.checkpoint import latest
from plait.comm import Context, delta
from plait.data import BatchSampler, eval_batches, load_corpus, split_micro_batches, synthetic_tokens
from plait.errors import ConfigError, MemoryCapExceeded, divisors
from plait.metrics import MetricsLog, memory_report, peak_memory_bytes
from plait.models import GPT, preset
from plait.strategies import DDP, AsyncPS, Hybrid, LocalSGD, Zero, resolve
from plait.train.config import RunConfig
from plait.train.report import print_summary


@dataclasses.dataclass
class Summary:
    """What a run achieved, as the summary table and ``summary.json`` report it."""

    strategy: str
    world_size: int
    params: int
    steps: int
    tokens_per_step: int
    train_loss_first: float
    train_loss_last: float
    val_loss_first: float | None
    val_loss_last: float | None
    tokens_per_s: float
    step_time_s: float
    peak_memory_bytes: list[int]
    bytes_per_step: float
    theory_bytes_per_step: int
    theory: str
    comm_seconds_per_step: float
    strategy_metrics: dict
    """This rank's (rank 0's) strategy-specific figures: staleness histogram, pushes, synchronizations."""
    mesh: dict[str, int] | None = None
    """Ranks along each axis (dp, pp, tp) under tp, pp or hybrid."""
    model_state_bytes: float | None = None
    """The largest rank's model states (live tensors) after the first step, when a memory cap is set."""
    mem_cap_gb: float | None = None
    """The cap those model states were checked against (``--mem-cap-gb``)."""


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's grouping: decay matrices and embeddings (dim >= 2), not norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _strategy(config: RunConfig, world_size: int) -> plait.Strategy:
    """The strategy object ``config.train`` names, with its options."""
    train = config.train
    if train.mixed_precision is not None and train.strategy not in ("ddp", "zero1", "zero2", "zero3"):
        raise ConfigError(
            f"mixed_precision={train.mixed_precision!r} needs strategy ddp or zero1/2/3, not {train.strategy!r}"
        )
    if train.strategy == "ddp":
        return DDP(
            bucket_mb=train.bucket_mb, grad_dtype=train.grad_dtype, mixed_precision=train.mixed_precision
        )
    if train.strategy in ("zero1", "zero2", "zero3"):
        return Zero(
            stage=int(train.strategy[-1]), bucket_mb=train.bucket_mb, mixed_precision=train.mixed_precision
        )
    if train.strategy == "async":
        return AsyncPS(staleness=train.staleness, servers=train.servers)
    if train.strategy == "local-sgd":
        return LocalSGD(period=train.period, outer=train.outer, outer_lr=train.outer_lr)
    if train.strategy in ("tp", "pp", "hybrid"):
        return _mesh(train, world_size)
    return resolve(train.strategy)


def _mesh(train: Any, world_size: int) -> Hybrid:
    """tp, pp and hybrid as one mesh: the ranks left over by tp x pp are data parallel.

    A pipeline's micro-batches are the trainer's: batch_size / (dp x micro_batch) of them per step.
    """
    tp = train.tp or (2 if train.strategy == "tp" else 1)
    pp = train.pp or (2 if train.strategy == "pp" else 1)
    if world_size % (tp * pp):
        raise ConfigError(
            f"tp x pp = {tp} x {pp} must divide the world size {world_size}; "
            f"tp x pp in {divisors(world_size)}"
        )
    dp = world_size // (tp * pp)
    per_step = dp * train.micro_batch
    if pp > 1 and train.batch_size // per_step < pp:
        local = train.batch_size // dp
        fits = [str(m) for m in range(1, local + 1) if local % m == 0 and local // m >= pp]
        raise ConfigError(
            f"pp={pp} stages need at least {pp} micro-batches per step, but batch_size / (dp x micro_batch) "
            f"= {train.batch_size} / ({dp} x {train.micro_batch}) gives {train.batch_size // per_step}; "
            + (
                f"use a micro_batch in {{{', '.join(fits)}}}"
                if fits
                else f"use a batch_size of at least {dp * pp}"
            )
        )
    return Hybrid(
        dp=dp,
        tp=tp,
        pp=pp,
        zero=train.zero,
        microbatches=max(1, train.batch_size // per_step) if pp > 1 else None,
        schedule=train.schedule,
    )


def check_memory_cap(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, cap_gb: float, strategy: str, ctx: Context
) -> float:
    """The largest rank's model-state bytes (live tensors); MemoryCapExceeded on every rank over ``cap_gb``."""
    report = memory_report(model, optimizer)
    largest = torch.tensor([float(report.model_states)])
    ctx.world.all_reduce(largest, op="max")  # every rank decides alike, so none is left waiting
    if largest.item() <= cap_gb * 1e9:
        return largest.item()
    raise MemoryCapExceeded(
        f"out of memory: rank {ctx.rank} holds {report.model_states / 1e9:.3f} GB of model states (parameters "
        f"{report.parameters / 1e9:.3f}, gradients {report.gradients / 1e9:.3f}, optimizer state "
        f"{report.optimizer_state / 1e9:.3f}, master {report.master / 1e9:.3f}) under strategy={strategy!r}, over "
        f"--mem-cap-gb {cap_gb:g}. zero1/2/3 shard these over the ranks (plait estimate --model ... --nproc N "
        "shows how much each holds); or use more ranks or a smaller model."
    )


class Trainer:
    """Trains ``plait.models.GPT`` as ``config`` says, on this process's rank of the job."""

    def __init__(self, config: RunConfig, ctx: Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or plait.init()
        train = config.train
        overrides = {
            k: v for k, v in dataclasses.asdict(config.model).items() if k != "model" and v is not None
        }
        self.model_config = preset(config.model.model, **overrides)
        self.train_tokens, self.val_tokens = self._load_data()

        torch.manual_seed(train.seed)
        model = GPT(self.model_config)
        self.params = model.num_params()
        optim = config.optim
        self.model, self.optimizer = plait.setup(
            model,
            _strategy(config, self.ctx.world_size),
            lambda _: plait.optim.AdamW(
                adamw_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2)
            ),
            ctx=self.ctx,
        )
        self.runtime = self.model.plait_runtime
        # the ranks that train (a parameter server's dedicated servers do not) share each global batch
        self.group = self.runtime.dp_group or self.ctx.world
        self.rank, self.ranks = self.model.dp_rank, self.model.dp_size
        per_step = train.micro_batch * self.ranks
        if train.batch_size % per_step:
            raise ConfigError(
                f"batch_size={train.batch_size} is not a multiple of micro_batch x training ranks = "
                f"{train.micro_batch} x {self.ranks}; use a micro_batch in {divisors(train.batch_size // self.ranks)} "
                f"or a batch_size that is a multiple of {per_step}"
            )
        self.accumulate = train.batch_size // per_step
        self.pipelined = getattr(self.runtime, "pipeline", None) is not None
        """A pipeline runs the step's micro-batches through its schedule: one ``train_step`` per step."""
        self.sampler = BatchSampler(
            self.train_tokens,
            self.model_config.block_size,
            train.batch_size,
            self.rank,
            self.ranks,
            train.seed,
        )
        self.checkpoints = Path(train.run_dir, "checkpoints")
        self.resumed_from = self._resume()
        self.log = MetricsLog(train.run_dir, self.ctx.rank)
        if self.resumed_from is not None:
            self.log.write("resume", step=self.sampler.step, checkpoint=str(self.resumed_from))
            if self.ctx.rank == 0:
                print(f"plait: resumed from {self.resumed_from} at step {self.sampler.step}", flush=True)

    def _resume(self) -> Path | None:
        """Continue from the newest complete checkpoint in RUN_DIR/checkpoints, if checkpointing and one exists."""
        if not self.config.train.save_every:
            return None
        found = latest(self.checkpoints)
        if found is not None:
            _, extra = checkpoint.load(found, self.model, self.optimizer)
            self.sampler.load_state_dict(extra["sampler"])
        return found

    def _save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (data position included); keep the newest ``keep_checkpoints``."""
        train = self.config.train
        extra = {"sampler": self.sampler.state_dict()}
        directory = self.checkpoints / f"step_{step:06d}"
        checkpoint.save(
            directory, self.model, self.optimizer, step=step, extra=extra, blocking=not train.async_checkpoint
        )
        if self.ctx.rank == 0:
            complete = sorted(p for p in self.checkpoints.glob("step_*") if (p / "manifest.json").exists())
            for old in complete[: -train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def _load_data(self) -> tuple[np.ndarray, np.ndarray]:
        data = self.config.data
        if data.data == "synthetic":
            tokens = synthetic_tokens(
                data.synthetic_tokens, self.model_config.vocab_size, self.config.train.seed
            )
            split = int(len(tokens) * (1 - data.val_fraction))
            return tokens[:split], tokens[split:]
        if self.model_config.vocab_size < 256:
            raise ConfigError(
                f"vocab_size={self.model_config.vocab_size} is too small for the byte-level corpus; it needs 256"
            )
        corpus = load_corpus(data.val_fraction)
        return corpus.train, corpus.val

    # -- one step -----------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on this rank's slice of the global batch; returns its measurements."""
        optim, train = self.config.optim, self.config.train
        lr = lr_at(step, train.steps, optim.lr, optim.min_lr, optim.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        before = self.ctx.stats.snapshot()
        start = time.perf_counter()
        x, y = self.sampler.next_batch()
        if self.pipelined:  # the schedule runs the local batch as its micro-batches
            local_loss = torch.tensor(self.model.train_step(x.to(self.ctx.device), y.to(self.ctx.device)))
        else:
            local_loss = self._forward_backward(x, y)
        grad_norm = plait.clip_grad_norm_(self.model, optim.grad_clip) if optim.grad_clip else None
        self.optimizer.step()
        self.optimizer.zero_grad()
        if train.slow_rank == self.ctx.rank and train.slow_factor > 1:
            # a straggler for experiments: this rank's steps take slow_factor times as long
            time.sleep((train.slow_factor - 1) * (time.perf_counter() - start))
        step_time = time.perf_counter() - start
        comm = delta(self.ctx.stats.snapshot(), before)
        # synchronous strategies report the global mean loss; asynchronous ones must not wait for a
        # collective every step (that would re-synchronize them), so each rank reports its own
        loss = self._mean_over_ranks(local_loss) if self.runtime.synchronous else float(local_loss)
        return {
            **self.runtime.metrics(),
            "loss": loss,
            "lr": lr,
            "step_time": step_time,
            "tokens_per_s": train.batch_size * self.model_config.block_size / step_time,
            "bytes_sent": sum(t.bytes_sent for t in comm.values()),
            "comm_seconds": sum(t.seconds for t in comm.values()),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
        }

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient accumulation over micro-batches, communicating only after the last where it can."""
        local_loss = torch.zeros(())
        for i, (xm, ym) in enumerate(split_micro_batches(x, y, self.accumulate)):
            last = i == self.accumulate - 1
            defer = not last and self.model.plait_runtime.supports_no_sync
            with self.model.no_sync() if defer else contextlib.nullcontext():
                logits = self.model(xm.to(self.ctx.device))
                loss = (
                    F.cross_entropy(logits.flatten(0, 1), ym.to(self.ctx.device).flatten()) / self.accumulate
                )
                loss.backward()
            local_loss += loss.detach().cpu()
        return local_loss

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (a 4-byte all-reduce, made after the step's accounting)."""
        value = value.reshape(1).float()
        self.group.all_reduce(value, op="avg")
        return value.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over fixed windows spread over the validation tokens.

        Synchronous strategies split the windows over the ranks and average; an asynchronous rank
        evaluates all of them on its own replica, so evaluation never makes it wait for the others.
        """
        train = self.config.train
        synchronous = self.runtime.synchronous
        self.model.eval()
        batches = eval_batches(
            self.val_tokens,
            self.model_config.block_size,
            train.batch_size,
            train.eval_batches,
            self.rank if synchronous else 0,
            self.ranks if synchronous else 1,
        )
        total = torch.zeros(())
        for x, y in batches:
            logits = self.model(x.to(self.ctx.device))
            total += F.cross_entropy(logits.flatten(0, 1), y.to(self.ctx.device).flatten()).cpu()
        self.model.train()
        mean = total / len(batches)
        return self._mean_over_ranks(mean) if synchronous else float(mean)

    # -- the run ------------------------------------------------------------------------------------

    def fit(self) -> Summary:
        """Train for ``steps`` steps, evaluating every ``eval_every``; return (and on rank 0 print) the summary."""
        train = self.config.train
        records, evals = [], []
        self.model_state_bytes: float | None = None
        progress = _Progress(train.steps) if self.ctx.rank == 0 and train.progress else None
        started = time.perf_counter()
        try:
            for step in range(self.sampler.step, train.steps):
                record = self.train_step(step)
                if train.mem_cap_gb is not None and not records:  # everything is allocated after one step
                    self.model_state_bytes = check_memory_cap(
                        self.model, self.optimizer, train.mem_cap_gb, train.strategy, self.ctx
                    )
                record["peak_memory"] = peak_memory_bytes(self.ctx.device)
                self.log.write("step", step=step, time=time.perf_counter() - started, **record)
                records.append(record)
                if progress is not None:
                    progress.update(step, record)
                last = step == train.steps - 1
                if train.desync_every and (step + 1) % train.desync_every == 0:
                    plait.check_replicas(self.model)
                if train.save_every and ((step + 1) % train.save_every == 0 or last):
                    self._save(step + 1)
                if train.eval_every and (step % train.eval_every == 0 or last):
                    val = self.evaluate()
                    self.log.write("eval", step=step, time=time.perf_counter() - started, val_loss=val)
                    evals.append(val)
            checkpoint.wait_for_pending()
        finally:
            if progress is not None:
                progress.close()
            self.log.close()
        if not records:
            raise ConfigError(
                f"nothing to train: the run in {train.run_dir} resumed at step {self.sampler.step} of steps={train.steps}"
            )
        summary = self._summarize(records, evals)
        if self.ctx.rank == 0:
            Path(train.run_dir, "summary.json").write_text(
                json.dumps(dataclasses.asdict(summary), indent=2) + "\n"
            )
            print_summary(summary, train.run_dir)
        return summary

    def _summarize(self, records: list[dict[str, float]], evals: list[float]) -> Summary:
        steady = records[1:] or records  # the first step pays one-time costs (allocation, bucket order)
        # every rank of a mesh; the training ranks otherwise (a parameter server's servers have left)
        group = self.ctx.world if hasattr(self.runtime, "mesh") else self.group
        peak = torch.tensor([float(peak_memory_bytes(self.ctx.device))])
        peaks = torch.zeros(group.size)
        group.all_gather(peaks, peak)
        return Summary(
            strategy=self.config.train.strategy,
            world_size=group.size,
            mesh=self.runtime.mesh.sizes if hasattr(self.runtime, "mesh") else None,
            params=self.params,
            steps=len(records),
            tokens_per_step=self.config.train.batch_size * self.model_config.block_size,
            train_loss_first=records[0]["loss"],
            train_loss_last=records[-1]["loss"],
            val_loss_first=evals[0] if evals else None,
            val_loss_last=evals[-1] if evals else None,
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
            step_time_s=statistics.median(r["step_time"] for r in steady),
            peak_memory_bytes=[int(p) for p in peaks.tolist()],
            bytes_per_step=statistics.mean(r["bytes_sent"] for r in steady),
            theory_bytes_per_step=self.model.plait_runtime.theory_bytes_per_step(),
            theory=self.model.plait_runtime.theory,
            comm_seconds_per_step=statistics.mean(r["comm_seconds"] for r in steady),
            strategy_metrics=self.runtime.metrics(),
            model_state_bytes=self.model_state_bytes,
            mem_cap_gb=self.config.train.mem_cap_gb,
        )


class _Progress:
    """Rank 0's progress bar: step, loss, tokens/s."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("train", total=total, loss=float("nan"), tps=0.0)
        self._bar.start()

    def update(self, step: int, record: dict[str, float]) -> None:
        self._bar.update(self._task, completed=step + 1, loss=record["loss"], tps=record["tokens_per_s"])

    def close(self) -> None:
        self._bar.stop()
