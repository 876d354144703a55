"""``plait train --deepspeed ds_config.json``: a DeepSpeed JSON config mapped onto plait's fields.

What maps (DeepSpeed's name -> plait's):

=====================================================  ==================================================
``train_batch_size``                                   ``batch_size`` (sequences per optimizer step)
``train_micro_batch_size_per_gpu``                     ``micro_batch``
``gradient_accumulation_steps``                        implied: batch_size = micro_batch x accumulation x
                                                       world size, DeepSpeed's rule; any two give the third
``zero_optimization.stage``                            ``strategy``: 0 ddp, 1/2/3 zero1/2/3
``zero_optimization.reduce_bucket_size``               ``[strategy] bucket_mb`` (fp32 elements, x 4 B)
``bf16.enabled`` / ``fp16.enabled``                    ``[strategy] mixed_precision`` bf16 / fp16
``fp16.initial_scale_power``, ``loss_scale_window``    the dynamic loss scaler's start 2^power, growth interval
``optimizer`` Adam / AdamW, ``params``                 plait's AdamW: lr, betas, eps, weight_decay
``scheduler`` WarmupLR, WarmupDecayLR, WarmupCosineLR  the learning rate of every step (:func:`lr_schedule`)
``gradient_clipping``                                  ``grad_clip``
``steps_per_print``                                    ``print_every``
``tensorboard.enabled``                                ``tensorboard``
=====================================================  ==================================================

DeepSpeed's ``Adam`` is AdamW unless ``adam_w_mode`` is false (its FusedAdam's default), so both map to
plait's AdamW. Keys plait does not implement are listed in one message: the harmless ones (logging,
profiling, communication tuning that leaves the numbers alone) are ignored with a note; the ones that
change training or what fits in memory (offload, other optimizers or schedulers, a static loss scale,
curriculum...) are a ConfigError unless ``--deepspeed-lenient``, which ignores them with the note.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.errors import ConfigError
from plait.strategies import zero_stage_name

HARMLESS = {
    "wall_clock_breakdown", "memory_breakdown", "flops_profiler", "comms_logger", "wandb", "csv_monitor",
    "comet", "dump_state", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "checkpoint",
    "elasticity", "aio", "timers", "monitor_config", "fp16.auto_cast", "fp16.consecutive_hysteresis",
    "fp16.hysteresis", "fp16.min_loss_scale", "zero_optimization.overlap_comm",
    "zero_optimization.contiguous_gradients", "zero_optimization.allgather_partitions",
    "zero_optimization.reduce_scatter", "zero_optimization.allgather_bucket_size",
    "zero_optimization.round_robin_gradients", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold", "zero_optimization.stage3_max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance", "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save", "zero_optimization.sub_group_size",
    "zero_optimization.elastic_checkpoint", "zero_optimization.load_from_fp32_weights",
    "zero_optimization.memory_efficient_linear", "optimizer.params.torch_adam", "activation_checkpointing",
}  # fmt: skip
"""Keys that change nothing plait computes. ``fp16.hysteresis`` and ``min_loss_scale`` are here with a
caveat in their note: plait halves the scale at the first overflow and has no floor."""

_NOTES = {
    "fp16.hysteresis": "plait halves the loss scale at the first overflowing step (hysteresis 1)",
    "fp16.consecutive_hysteresis": "plait halves the loss scale at the first overflowing step",
    "fp16.min_loss_scale": "plait's dynamic loss scale has no floor",
    "zero_optimization.allgather_bucket_size": "plait uses one bucket size (reduce_bucket_size) for both",
    "activation_checkpointing": (
        "it configures DeepSpeed's checkpointing API, which plait does not call; plait's own is --activation-checkpointing"
    ),
    "zero_optimization.overlap_comm": "plait overlaps the reductions with backward itself",
}

MAPPED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "zero_optimization.stage", "zero_optimization.reduce_bucket_size", "bf16.enabled", "fp16.enabled",
    "fp16.loss_scale", "fp16.initial_scale_power", "fp16.loss_scale_window", "optimizer.type",
    "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
    "optimizer.params.adam_w_mode", "scheduler.type", "scheduler.params", "gradient_clipping",
    "steps_per_print", "tensorboard.enabled", "tensorboard.output_path", "tensorboard.job_name",
}  # fmt: skip

SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
_SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"warmup_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps",
                       "cos_min_ratio", "last_batch_iteration"},
}  # fmt: skip


def read(path: str | os.PathLike) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the DeepSpeed config {str(path)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must be a JSON object")
    return values


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, but ``scheduler.params`` and betas stay whole."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("scheduler.params", "activation_checkpointing") and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _is_enabled(flat: dict[str, Any], section: str) -> bool:
    return bool(flat.get(f"{section}.enabled", False))


def _batch(flat: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(batch_size, micro_batch) by DeepSpeed's rule train_batch_size = micro x accumulation x world size."""
    total = flat.get("train_batch_size")
    micro = flat.get("train_micro_batch_size_per_gpu")
    accumulation = flat.get("gradient_accumulation_steps")
    if total is not None and micro is not None and accumulation is not None:
        if total != micro * accumulation * world_size:
            raise ConfigError(
                f"train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps="
                f"{accumulation} x world size {world_size} = {micro * accumulation * world_size}; DeepSpeed "
                "requires them equal: fix one, or give only two of the three"
            )
    elif total is not None and micro is not None:
        if total % (micro * world_size):
            raise ConfigError(
                f"train_batch_size={total} is not a multiple of train_micro_batch_size_per_gpu={micro} x world "
                f"size {world_size}; use a train_batch_size that is a multiple of {micro * world_size}"
            )
    elif total is not None:
        micro = total // (world_size * (accumulation or 1))
        if micro < 1 or total != micro * world_size * (accumulation or 1):
            raise ConfigError(
                f"train_batch_size={total} does not split over world size {world_size} x "
                f"gradient_accumulation_steps={accumulation or 1}"
            )
    elif micro is not None:
        total = micro * (accumulation or 1) * world_size
    else:
        raise ConfigError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")
    return total, micro


def to_plait(
    values: dict[str, Any], world_size: int, lenient: bool = False
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``({section: {field: value}}, notes)`` for ``plait.train.config.build``, from a DeepSpeed config."""
    flat = _flatten(values)
    unsupported, notes = [], []
    # "auto" is the HF Trainer's placeholder for "fill in from the trainer": plait's own value stands
    for key in [k for k, v in flat.items() if v == "auto"]:
        notes.append(f"{key}=auto: plait's own setting")
        del flat[key]
    for key, value in flat.items():
        if key in MAPPED:
            continue
        known = next((h for h in HARMLESS if key == h or key.startswith(h + ".")), None)
        if known is not None:
            notes.append(f"{key}: ignored" + (f" ({_NOTES[known]})" if known in _NOTES else ""))
        elif key.startswith("zero_optimization.offload") and value in ({}, None, "none"):
            continue  # an offload section that offloads nothing
        else:
            unsupported.append(f"{key}={json.dumps(value)}")
    train: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    options: dict[str, Any] = {}  # the [strategy] table: options of plait.DDP / plait.Zero
    train["batch_size"], train["micro_batch"] = _batch(flat, world_size)
    train["strategy"] = strategy(values)
    if "zero_optimization.reduce_bucket_size" in flat:
        options["bucket_mb"] = float(flat["zero_optimization.reduce_bucket_size"]) * 4 / 2**20
    if _is_enabled(flat, "bf16") and _is_enabled(flat, "fp16"):
        raise ConfigError("bf16.enabled and fp16.enabled are both true; enable one")
    if _is_enabled(flat, "bf16"):
        options["mixed_precision"] = "bf16"
    if _is_enabled(flat, "fp16"):
        options["mixed_precision"] = "fp16"
        if flat.get("fp16.loss_scale", 0) != 0:
            unsupported.append(
                f"fp16.loss_scale={flat['fp16.loss_scale']} (a static scale; plait's is dynamic: 0)"
            )
    if "gradient_clipping" in flat:
        optim["grad_clip"] = float(flat["gradient_clipping"])
    if "steps_per_print" in flat:
        train["print_every"] = int(flat["steps_per_print"])
    if _is_enabled(flat, "tensorboard"):
        train["tensorboard"] = True
    kind = flat.get("optimizer.type")
    if kind is not None:
        if kind.lower() not in ("adam", "adamw"):
            unsupported.append(f"optimizer.type={kind!r} (plait maps Adam and AdamW)")
        elif kind.lower() == "adam" and flat.get("optimizer.params.adam_w_mode") is False:
            unsupported.append(
                "optimizer.params.adam_w_mode=false (Adam with L2 in the gradient; plait's is AdamW)"
            )
        for name in ("lr", "eps", "weight_decay"):
            if f"optimizer.params.{name}" in flat:
                optim[name] = float(flat[f"optimizer.params.{name}"])
        if "optimizer.params.betas" in flat:
            optim["beta1"], optim["beta2"] = (float(b) for b in flat["optimizer.params.betas"])
    scheduler = flat.get("scheduler.type")
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            unsupported.append(f"scheduler.type={scheduler!r} (plait maps {', '.join(SCHEDULERS)})")
        else:
            extra = set(flat.get("scheduler.params", {})) - _SCHEDULER_PARAMS[scheduler]
            unsupported += [f"scheduler.params.{name}" for name in sorted(extra)]
    if unsupported and not lenient:
        raise ConfigError(
            "the DeepSpeed config asks for what plait does not implement, which would change training: "
            + "; ".join(unsupported)
            + ". Remove them, or pass --deepspeed-lenient to train without them"
            + (f" (also ignored, harmless: {'; '.join(notes)})" if notes else "")
        )
    notes += [f"{item}: ignored (--deepspeed-lenient)" for item in unsupported]
    return {"train": train, "optim": optim, "strategy": options}, notes


def strategy(values: dict[str, Any]) -> str:
    """The plait strategy of the config's ``zero_optimization.stage`` (0 ddp, 1/2/3 zero1/2/3), named by
    the one resolver (``plait.strategies.zero_stage_name``)."""
    stage = (values.get("zero_optimization") or {}).get("stage", 0)
    try:
        return zero_stage_name(stage)
    except ConfigError:
        raise ConfigError(
            f"zero_optimization.stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3"
        ) from None


def lr_schedule(values: dict[str, Any], peak_lr: float) -> Callable[[int], float] | None:
    """The learning rate at each step (from 0) of the config's DeepSpeed scheduler; None without one.

    As DeepSpeed's ``lr_schedules``: warmup from ``warmup_min_lr`` to ``warmup_max_lr`` over
    ``warmup_num_steps`` (``warmup_type`` "log", its default: gamma = ln(step + 1) / ln(warmup_num_steps);
    "linear": gamma = step / warmup_num_steps), then constant (WarmupLR), linear decay to 0 at
    ``total_num_steps`` (WarmupDecayLR), or, for WarmupCosineLR, the optimizer's lr times a ratio that
    warms from ``warmup_min_ratio`` to 1 and then follows a cosine down to ``cos_min_ratio``.
    """
    scheduler = values.get("scheduler")
    if not scheduler or scheduler.get("type") not in SCHEDULERS:
        return None
    kind, params = scheduler["type"], scheduler.get("params", {})
    warmup = int(params.get("warmup_num_steps", 1000))
    log_warmup = params.get("warmup_type", "log") == "log"
    if params.get("warmup_type", "log") not in ("log", "linear"):
        raise ConfigError(f"scheduler.params.warmup_type={params['warmup_type']!r}; use 'log' or 'linear'")
    total = params.get("total_num_steps")
    if kind != "WarmupLR" and total is None:
        raise ConfigError(f"scheduler {kind} needs params.total_num_steps")

    def gamma(step: int) -> float:
        if warmup <= 1:
            return 1.0
        if log_warmup:
            return math.log(step + 1) / math.log(warmup)
        return step / warmup

    if kind == "WarmupCosineLR":
        low, floor = float(params.get("warmup_min_ratio", 0.0)), float(params.get("cos_min_ratio", 1e-4))

        def cosine(step: int) -> float:
            if step < warmup:
                return peak_lr * (low + (1 - low) * gamma(step))
            progress = (step - warmup) / max(1, int(total) - warmup)
            return peak_lr * max(
                0.0, floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            )

        return cosine
    low, high = float(params.get("warmup_min_lr", 0.0)), float(params.get("warmup_max_lr", 0.001))

    def warmup_then(step: int) -> float:
        if step < warmup:
            return low + (high - low) * gamma(step)
        if kind == "WarmupLR":
            return high
        return low + (high - low) * max(0.0, (int(total) - step) / max(1, int(total) - warmup))

    return warmup_then


def apply_loss_scale(model: Any, values: dict[str, Any]) -> None:
    """Start fp16's dynamic loss scale at 2^initial_scale_power and grow it every loss_scale_window steps.

    DeepSpeed's defaults (16 and 1000) apply when the config enables fp16 without them; ``model`` is
    what ``plait.setup`` returned (its runtime's ``loss_scaler``).
    """
    fp16 = values.get("fp16") or {}
    if not fp16.get("enabled"):
        return
    scaler = model.plait_runtime.loss_scaler
    scaler.scale = 2.0 ** int(fp16.get("initial_scale_power", 16))
    scaler.growth_interval = int(fp16.get("loss_scale_window", 1000))
