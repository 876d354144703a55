"""``plait train --deepspeed ds_config.json``: DeepSpeed's JSON, written as its tutorials write it."""

import json
import math
import subprocess
import sys

import pytest

import plait
from plait.cli import train_config
from plait.metrics import read_metrics
from plait.train import deepspeed

# the CIFAR-10 tutorial's config (Adam, WarmupLR, plain data parallelism)
CIFAR = {
    "train_batch_size": 16,
    "steps_per_print": 2000,
    "optimizer": {
        "type": "Adam",
        "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000},
    },
    "wall_clock_breakdown": False,
}
# the ZeRO tutorial's stage-2 section with fp16 and its loss-scale settings
ZERO2 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "initial_scale_power": 12, "hysteresis": 2,
             "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True},
}  # fmt: skip


def test_the_cifar_tutorial_config_maps_onto_plait():
    mapped, notes = deepspeed.to_plait(CIFAR, world_size=2)
    assert mapped["train"] == {"batch_size": 16, "micro_batch": 8, "strategy": "ddp", "print_every": 2000}
    assert mapped["optim"] == {"lr": 0.001, "eps": 1e-8, "weight_decay": 3e-7, "beta1": 0.8, "beta2": 0.999}
    assert notes == ["wall_clock_breakdown: ignored"]


def test_the_zero_tutorial_config_maps_stage_buckets_fp16_and_clipping():
    mapped, notes = deepspeed.to_plait(ZERO2, world_size=4)
    train, options = mapped["train"], mapped["strategy"]
    assert (train["batch_size"], train["micro_batch"], train["strategy"]) == (16, 2, "zero2")
    assert options == {"mixed_precision": "fp16", "bucket_mb": pytest.approx(5e8 * 4 / 2**20)}
    assert mapped["optim"] == {"grad_clip": 1.0}
    assert any("fp16.hysteresis: ignored (plait halves the loss scale" in n for n in notes)
    assert any(n.startswith("zero_optimization.overlap_comm: ignored") for n in notes)


def test_each_zero_stage_names_the_strategy_the_resolver_builds_for_it():
    """Stage s -> the name whose strategy has ZeRO stage s (0: DDP); a stage that is not an integer 0-3
    is an error (before, true became the strategy name 'zeroTrue')."""
    built = [
        plait.strategies.resolve(deepspeed.strategy({"zero_optimization": {"stage": s}})) for s in range(4)
    ]
    assert built == [plait.DDP(), plait.Zero(stage=1), plait.Zero(stage=2), plait.Zero(stage=3)]
    for stage in (True, 4, "2", 1.0):
        with pytest.raises(plait.ConfigError, match=r"zero_optimization.stage=.* is not a ZeRO stage"):
            deepspeed.strategy({"zero_optimization": {"stage": stage}})


def test_the_zero_section_becomes_the_strategy_and_its_options_where_flags_leave_them(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ZERO2))
    _, config = train_config(["--deepspeed", str(path), "--nproc", "4"])
    assert config.strategy == plait.Zero(stage=2, bucket_mb=5e8 * 4 / 2**20, mixed_precision="fp16")
    _, config = train_config(
        ["--deepspeed", str(path), "--nproc", "4", "--strategy", "zero3", "--bucket-mb", "2"]
    )
    assert config.strategy == plait.Zero(stage=3, bucket_mb=2.0, mixed_precision="fp16")
    with pytest.raises(plait.ConfigError, match=r"sets \{.*'mixed_precision': 'fp16'.*strategy 'local-sgd'"):
        train_config(["--deepspeed", str(path), "--nproc", "4", "--strategy", "local-sgd"])


def test_deepspeeds_batch_rule_derives_the_third_and_rejects_inconsistent_sizes():
    assert deepspeed._batch({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4) == (32, 4)
    assert deepspeed._batch({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 2) == (
        12,
        3,
    )
    with pytest.raises(plait.ConfigError, match=r"train_batch_size=30 != .* = 32"):
        deepspeed._batch(
            {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}, 2
        )


def test_what_plait_lacks_is_listed_in_one_error_unless_lenient():
    config = {
        **ZERO2,
        "zero_optimization": {
            **ZERO2["zero_optimization"],
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        },
        "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}},
        "flops_profiler": {"enabled": True},
    }
    with pytest.raises(plait.ConfigError) as error:
        deepspeed.to_plait(config, world_size=2)
    message = str(error.value)
    for item in (
        'zero_optimization.offload_optimizer.device="cpu"',
        "optimizer.type='OneBitAdam'",
        "--deepspeed-lenient",
    ):
        assert item in message
    assert "flops_profiler.enabled: ignored" in message  # the harmless ones are named too, as ignored
    _, notes = deepspeed.to_plait(config, world_size=2, lenient=True)
    assert any("OneBitAdam" in n and "--deepspeed-lenient" in n for n in notes)


def test_schedulers_follow_deepspeeds_formulas():
    warm = deepspeed.lr_schedule(CIFAR, 0.001)
    assert warm(0) == 0.0 and warm(999) == pytest.approx(0.001 * math.log(1000) / math.log(1000))
    assert warm(5000) == 0.001 and warm(9) == pytest.approx(0.001 * math.log(10) / math.log(1000))
    decay = deepspeed.lr_schedule(
        {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 10,
                                                           "total_num_steps": 110, "warmup_type": "linear"}}},
        0.0,
    )  # fmt: skip
    assert decay(5) == pytest.approx(0.005) and decay(60) == pytest.approx(0.005) and decay(110) == 0.0
    cosine = deepspeed.lr_schedule(
        {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10, "total_num_steps": 110,
                                                            "warmup_type": "linear", "cos_min_ratio": 0.1}}},
        0.02,
    )  # fmt: skip
    assert cosine(5) == pytest.approx(0.01) and cosine(60) == pytest.approx(0.02 * 0.55)
    assert cosine(110) == pytest.approx(0.002)


def test_plait_train_with_a_tutorial_config_and_with_an_unsupported_key(tmp_path):
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "steps_per_print": 3,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.01,
                                                          "warmup_num_steps": 3, "total_num_steps": 6,
                                                          "warmup_type": "linear"}},
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e5},
        "gradient_clipping": 1.0,
        "wall_clock_breakdown": False,
    }  # fmt: skip
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "plait.cli", "train", "--nproc", "2", "--deepspeed", str(path), "--steps", "6",
               "--n-layer", "2", "--n-embd", "64", "--block-size", "32", "--data", "synthetic",
               "--synthetic-tokens", "50000", "--eval-every", "0", "--no-progress", "--run-dir", str(run_dir)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wall_clock_breakdown: ignored" in done.stderr and "step 3: loss" in done.stdout
    steps = sorted((r for r in read_metrics(run_dir, "step") if r["rank"] == 0), key=lambda r: r["step"])
    assert [r["lr"] for r in steps] == pytest.approx([0.0, 0.01 / 3, 0.02 / 3, 0.01, 0.02 / 3, 0.01 / 3])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == "zero1" and summary["world_size"] == 2
    assert steps[-1]["loss"] < steps[0]["loss"]
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path.write_text(json.dumps(config))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        'zero_optimization.offload_optimizer.device="cpu"' in done.stderr and "Traceback" not in done.stderr
    )


@pytest.mark.parametrize(
    "strategy",
    [plait.Zero(stage=2, mixed_precision="fp16"), plait.Hybrid(data_parallel=plait.DDP(mixed_precision="fp16"))],
    ids=["zero2", "hybrid"],
)
def test_the_fp16_loss_scale_settings_reach_the_scaler_of_any_runtime(strategy):
    """Asked of the runtime (``loss_scaler``), not read from its internals: a mesh's dp axis owns it."""
    import torch

    model, _ = plait.setup(torch.nn.Linear(4, 4), strategy, lambda ps: plait.optim.AdamW(ps, lr=1e-3))
    deepspeed.apply_loss_scale(model, {"fp16": {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 500}})
    scaler = model.plait_runtime.loss_scaler
    assert (scaler.scale, scaler.growth_interval) == (2.0**12, 500)
