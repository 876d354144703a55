"""The training loop behind ``plait train``: a GPT on the embedded corpus under any strategy.

One optimizer step = one global batch of ``batch_size`` sequences, whatever the number of ranks:
each rank takes its slice (``BatchSampler``) and splits it into micro-batches of ``micro_batch``;
all but the last run under ``model.no_sync()``, so gradients are communicated once per step.
Then the global gradient norm is clipped, the learning rate follows linear warmup and cosine decay,
and the optimizer steps. Every rank appends its measurements to ``RUN_DIR/metrics.jsonl``; rank 0
shows a progress bar and, at the end, a summary table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import plait
from plait import checkpoint
from plait.comm import Context, delta
from plait.comm.stats import INTER_HOST
from plait.data import BatchSampler, eval_batches, load_corpus, synthetic_tokens
from plait.data.balance import loss_weight, parse_shares, shares_from_speed
from plait.data.files import load_files
from plait.errors import ConfigError, MemoryCapExceeded, divisors
from plait.metrics import MetricsLog, memory_report, peak_memory_bytes, read_metrics
from plait.metrics.plots import write_loss_plot
from plait.metrics.tensorboard import TensorBoardLog
from plait.models.hf import checkpoint_extra
from plait.train import deepspeed
from plait.train.config import RunConfig
from plait.train.models import build_model
from plait.train.report import Progress, Summary, print_summary
from plait.train.resume import resume
from plait.train.rundir import new_run_dir


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
    """Trains the model ``config.model`` names (plait's GPT or an HF causal LM) on this process's rank."""

    def __init__(self, config: RunConfig, ctx: Context | None = None) -> None:
        self.ctx = ctx or plait.init()
        if config.train.run_dir is None:
            if self.ctx.world_size > 1:
                raise ConfigError("run_dir is unset; give every rank the same run_dir (plait train does)")
            run_dir = new_run_dir(config.train.strategy)
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, run_dir=run_dir))
        self.config = config
        train = config.train
        torch.manual_seed(train.seed)
        torch.set_flush_denormal(train.flush_denormal)
        model, self.model_config = build_model(config.model)
        self.train_tokens, self.val_tokens = self._load_data()
        self.params = model.num_params()
        optim = config.optim
        self.model, self.optimizer = plait.setup(
            model,
            config.strategy.for_batch(self.ctx.world_size, train.batch_size, train.micro_batch),
            lambda _: plait.optim.AdamW(
                adamw_groups(model, optim.weight_decay),
                lr=optim.lr,
                betas=(optim.beta1, optim.beta2),
                eps=optim.eps,
            ),
            ctx=self.ctx,
        )
        self.runtime = self.model.plait_runtime
        ds_config = deepspeed.read(train.deepspeed) if train.deepspeed else {}
        deepspeed.apply_loss_scale(self.model, ds_config)
        self.lr_at = deepspeed.lr_schedule(ds_config, optim.lr) or (
            lambda step: lr_at(step, train.steps, optim.lr, optim.min_lr, optim.warmup_steps)
        )
        """The learning rate of each step: warmup and cosine decay, or the DeepSpeed config's scheduler."""
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
        """Micro-batches per ``train_step``: accumulated, or run through a pipeline's schedule."""
        self.loss_weight = 1.0
        """w_i = n_i N / B on this rank's mean loss (plait.data.balance): 1 under equal shares."""
        self.sampler = BatchSampler(
            self.train_tokens,
            self.model_config.block_size,
            train.batch_size,
            self.rank,
            self.ranks,
            train.seed,
        )
        shares = parse_shares(train.balance, self.ranks, train.batch_size, train.micro_batch)
        if shares is not None:
            self._set_shares(shares)
        self.checkpoints = Path(train.run_dir, "checkpoints")
        self.resumed_from = self._resume()
        sinks = [TensorBoardLog(train.run_dir, self.ctx.rank)] if train.tensorboard else []
        self.log = MetricsLog(train.run_dir, self.ctx.rank, sinks)
        if self.resumed_from is not None:
            self.log.write("resume", step=self.sampler.step, checkpoint=str(self.resumed_from))
            if self.ctx.rank == 0:
                print(f"plait: resumed from {self.resumed_from} at step {self.sampler.step}", flush=True)

    def _resume(self) -> Path | None:
        """Continue a run as ``train.resume`` says; the data position comes from the checkpoint, the data
        order (seed) from this run's settings."""
        resumed = resume(self.config, self.checkpoints, self.model, self.optimizer, self.ctx.rank)
        if resumed is None:
            return None
        found, extra = resumed
        self.sampler.load_state_dict({**extra["sampler"], "seed": self.config.train.seed})
        return found

    def _save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (data position included); keep the newest ``keep_checkpoints``."""
        train = self.config.train
        extra = {"sampler": self.sampler.state_dict(), **checkpoint_extra(self.model)}
        directory = checkpoint.step_directory(self.checkpoints, step)
        checkpoint.save(
            directory, self.model, self.optimizer, step=step, extra=extra, blocking=not train.async_checkpoint
        )
        if self.ctx.rank == 0:
            checkpoint.prune(self.checkpoints, train.keep_checkpoints)

    def _load_data(self) -> tuple[np.ndarray, np.ndarray]:
        data, shape = self.config.data, self.model_config
        if data.data not in ("stdlib", "synthetic"):
            return load_files(data.data, data.val_fraction, shape.vocab_size, shape.block_size)
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
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        before, links_before = self.ctx.stats.snapshot(), self.ctx.stats.link_snapshot()
        waited = self.ctx.stats.thread_seconds()
        start = time.perf_counter()
        x, y = self.sampler.next_batch()
        # the runtime owns the step: accumulation, a pipeline's schedule, the loss reduced once (a
        # synchronous strategy's global mean; an asynchronous rank's own, so no collective syncs it)
        loss = self.model.train_step(
            x.to(self.ctx.device), y.to(self.ctx.device), self._loss_fn(), microbatches=self.accumulate
        )
        grad_norm = plait.clip_grad_norm_(self.model, optim.grad_clip) if optim.grad_clip else None
        self.optimizer.step()
        self.optimizer.zero_grad()
        if train.slow_rank == self.ctx.rank and train.slow_factor > 1:
            # a straggler for experiments: this rank computes slow_factor times as long. Only its busy
            # time is scaled (the step less the time this thread was blocked in communication, which
            # is waiting for the others; not a colocated server thread's waits, which overlap it):
            # scaling the whole step would make its sleep grow with every wait, and a rank given less
            # work would stay exactly as slow
            busy = time.perf_counter() - start - (self.ctx.stats.thread_seconds() - waited)
            time.sleep((train.slow_factor - 1) * max(0.0, busy))
        step_time = time.perf_counter() - start
        comm = delta(self.ctx.stats.snapshot(), before)
        links = delta(self.ctx.stats.link_snapshot(), links_before)
        if train.balance == "auto" and step == 1:  # step 0 pays one-time costs
            self._rebalance(step_time - sum(t.seconds for t in comm.values()))
        return {
            **self.runtime.metrics(),
            "loss": loss,
            "lr": lr,
            "step_time": step_time,
            "tokens_per_s": train.batch_size * self.model_config.block_size / step_time,
            "bytes_sent": sum(t.bytes_sent for t in comm.values()),
            "inter_host_bytes": links[INTER_HOST].bytes_sent if INTER_HOST in links else 0,
            "comm_seconds": sum(t.seconds for t in comm.values()),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
        }

    def _set_shares(self, shares: tuple[int, ...]) -> None:
        if not self.runtime.uneven_shares:
            raise ConfigError(
                f"balance={self.config.train.balance!r} needs a synchronous data-parallel strategy (ddp, zero1/2/3) "
                f"without pipeline, not strategy={self.config.train.strategy!r}; use balance='equal'"
            )
        self.sampler.set_shares(shares)
        self.accumulate = shares[self.rank] // self.config.train.micro_batch
        self.loss_weight = loss_weight(shares[self.rank], self.config.train.batch_size, self.ranks)

    def _rebalance(self, busy_s: float) -> None:
        """Shares proportional to each rank's measured speed (its step less its time in collectives)."""
        mine = torch.tensor([busy_s, float(self.sampler.local_batch)], dtype=torch.float64)
        every = torch.zeros(2 * self.ranks, dtype=torch.float64)
        self.group.all_gather(every, mine)
        busy, samples = every.view(-1, 2).T.tolist()
        train = self.config.train
        shares = shares_from_speed(busy, [int(n) for n in samples], train.batch_size, train.micro_batch)
        self._set_shares(shares)
        self.log.write("balance", shares=list(shares), busy_s=busy)

    def _loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """None (the runtime's token cross-entropy, vocabulary-parallel under tp) unless shares are uneven."""
        if self.loss_weight == 1.0:
            return None
        weight = self.loss_weight
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()) * weight

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
        for x, y in batches:  # the loss training computes (vocabulary-parallel under tp: no logit gather)
            loss = self.runtime.forward_loss(x.to(self.ctx.device), y.to(self.ctx.device), None)
            total += loss.float().cpu()
        self.model.train()
        mean = total / len(batches)
        return self._mean_over_ranks(mean) if synchronous else float(mean)

    # -- the run ------------------------------------------------------------------------------------

    def fit(self) -> Summary:
        """Train for ``steps`` steps, evaluating every ``eval_every``; return (and on rank 0 print) the summary."""
        train = self.config.train
        records, evals = [], []
        self.model_state_bytes: float | None = None
        progress = Progress(train.steps) if self.ctx.rank == 0 and train.progress else None
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
                if train.print_every and (step + 1) % train.print_every == 0 and self.ctx.rank == 0:
                    print(f"step {step + 1}: loss {record['loss']:.4f} lr {record['lr']:.3g}", flush=True)
                last = step == train.steps - 1
                if train.desync_every and (step + 1) % train.desync_every == 0:
                    plait.check_replicas(self.model)
                if train.save_every and ((step + 1) % train.save_every == 0 or last):
                    self._save(step + 1)
                if last:  # the final evaluation (and the model fit leaves) is of the run's final parameters
                    self.runtime.final_parameters()
                if train.eval_every and (step % train.eval_every == 0 or last):
                    val = self.evaluate()
                    self.log.write("eval", step=step, time=time.perf_counter() - started, val_loss=val)
                    evals.append(val)
            self.runtime.finish_training()  # before the summary's collective: a straggler may be far behind
            checkpoint.wait_for_pending()
        finally:
            if progress is not None:
                progress.close()
            self.log.close()
        if not records:  # resumed at the end: a restart after the final checkpoint was committed
            records, evals = self._logged_run()
            if self.ctx.rank == 0:
                checkpoint.prune(self.checkpoints, train.keep_checkpoints)  # the last attempt died before it
                print(
                    f"plait: the run in {train.run_dir} was already complete at step {train.steps}",
                    flush=True,
                )
        summary = self._summarize(records, evals)
        if self.ctx.rank == 0:
            Path(train.run_dir, "summary.json").write_text(
                json.dumps(dataclasses.asdict(summary), indent=2) + "\n"
            )
            print_summary(summary, train.run_dir)
            print(f"loss plot: {write_loss_plot(train.run_dir)}")
        return summary

    def _logged_run(self) -> tuple[list[dict[str, Any]], list[float]]:
        """This rank's step records and the eval losses of an already complete run, as its attempts logged them."""
        steps: dict[int, dict[str, Any]] = {}
        evals: dict[int, float] = {}
        for r in read_metrics(self.config.train.run_dir):
            if r["rank"] == self.ctx.rank and r["kind"] == "step":
                steps[r["step"]] = r  # a later attempt's record of a step wins
            elif r["rank"] == self.ctx.rank and r["kind"] == "eval":
                evals[r["step"]] = r["val_loss"]
        if not steps:
            raise ConfigError(
                f"nothing to train: the checkpoint is at step {self.sampler.step} and steps={self.config.train.steps}, "
                f"and {self.config.train.run_dir} has no record of those steps; raise --steps to train further"
            )
        return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]

    def _summarize(self, records: list[dict[str, float]], evals: list[float]) -> Summary:
        steady = records[1:] or records  # the first step pays one-time costs (allocation, bucket order)
        group = self.runtime.summary_group()
        peak = torch.tensor([float(peak_memory_bytes(self.ctx.device))])
        peaks = torch.zeros(group.size)
        group.all_gather(peaks, peak)
        # a record resumed from an older run has no inter_host_bytes
        across = torch.tensor(
            [statistics.mean(r.get("inter_host_bytes", 0) for r in steady)], dtype=torch.float64
        )
        across_all = torch.zeros(group.size, dtype=torch.float64)
        group.all_gather(across_all, across)
        return Summary(
            strategy=self.config.train.strategy,
            world_size=group.size,
            mesh=self.runtime.mesh_sizes(),
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
            inter_host_bytes_per_step=across_all.tolist(),
            theory_bytes_per_step=self.runtime.theory_bytes_per_step() + self.runtime.loss_bytes(),
            theory=self.model.plait_runtime.theory,
            comm_seconds_per_step=statistics.mean(r["comm_seconds"] for r in steady),
            strategy_metrics=self.runtime.metrics(),
            model_state_bytes=self.model_state_bytes,
            mem_cap_gb=self.config.train.mem_cap_gb,
        )
