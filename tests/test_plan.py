"""The planner: profiles, the cost model's formulas, the pick, ``plait plan`` and ``--strategy auto``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import plait
from plait.errors import ConfigError
from plait.models import GPT, preset
from plait.plan import Candidate, Profile, candidates, from_hardware, make_plan, predict, workload_for
from plait.plan.cost import Collectives
from plait.plan.measure import fit_alpha_beta, measure_links
from plait.plan.profile import load
from tests.harness import run_ranks

LINK = {"gbps": 8.0, "latency_us": 100.0}  # 1 GB/s, 100 us per call
HAND = {
    "name": "test cluster",
    "hosts": 2,
    "gpus_per_host": 2,
    "gpu": {"tflops": 1.0, "mfu": 0.5, "hbm_gb": 1.0},
    "host_link": LINK,
    "network_link": {"gbps": 0.8, "latency_us": 100.0},
    "overlap": 0.0,
    "base_gb": 0.1,
}


def _profile(**changes) -> Profile:
    return from_hardware({**HAND, **changes})


def test_alpha_beta_fit_recovers_the_line():
    link = fit_alpha_beta([(x, 2e-4 + x / 1e9) for x in (2**16, 2**20, 2**23)])
    assert link.alpha_s == pytest.approx(2e-4)
    assert link.bandwidth == pytest.approx(1e9)
    assert link.seconds(1e9, calls=3) == pytest.approx(6e-4 + 1.0)
    # one large message 10% slow (noise) must not move alpha, which tp's many small messages pay
    sizes = (2**12, 2**16, 2**19, 2**21, 2**23)
    noisy = fit_alpha_beta([(x, (2e-4 + x / 1e9) * (1.1 if x == 2**23 else 1.0)) for x in sizes])
    assert noisy.alpha_s == pytest.approx(2e-4, rel=0.1)


def test_hand_written_profile_round_trips_through_json(tmp_path):
    profile = _profile()
    link = profile.link("network", "all_reduce")
    assert (link.alpha_s, link.bandwidth) == (pytest.approx(1e-4), pytest.approx(1e8))
    assert profile.flops_per_s == 0.5e12
    path = tmp_path / "profile.json"
    path.write_text(profile.to_json())
    assert load(path) == profile
    path.write_text(json.dumps(HAND))
    assert load(path) == profile
    with pytest.raises(ConfigError, match="lacks 'gpu'"):
        from_hardware({"name": "x"})


def test_data_parallel_traffic_follows_the_ring_formulas():
    profile = _profile(hosts=1)
    work = workload_for("gpt-tiny", 32, 8, bucket_bytes=2**40)  # one bucket: one call
    g = work.params * 4
    ddp = predict(Candidate("ddp", dp=2), work, profile, hosts=1)
    assert ddp.bytes_per_level == {"host": 2 * 1 / 2 * g}
    assert ddp.comm_s == pytest.approx(1e-4 + g / 1e9)  # alpha + 2(N-1)/N g / bandwidth
    zero1 = predict(Candidate("zero1", dp=2, zero=1), work, profile, hosts=1)
    assert zero1.bytes_per_level["host"] == pytest.approx(
        ddp.bytes_per_level["host"]
    )  # ZeRO-1 moves DDP's bytes
    zero3 = predict(Candidate("zero3", dp=2, zero=3), work, profile, hosts=1)
    micro_batches = 32 // (2 * 8)
    assert ddp.bytes_per_level["host"] * micro_batches < zero3.bytes_per_level["host"]
    assert zero3.bytes_per_level["host"] < 1.5 * ddp.bytes_per_level["host"] * micro_batches
    bf16 = predict(Candidate("ddp", dp=2, compression="bf16"), work, profile, hosts=1)
    assert bf16.bytes_per_level["host"] == pytest.approx(ddp.bytes_per_level["host"] / 2)


def test_hierarchical_all_reduce_sends_a_shard_across_hosts():
    profile = _profile()
    collectives = Collectives(profile, size=4, hosts=2)
    g = 4e6
    _, flat = collectives.flat("all_reduce", g)
    _, hier = collectives.hierarchical_all_reduce(g)
    assert flat["network"] == pytest.approx(2 * 3 / 4 * g * 2 / 4)  # the ring crosses on 2 of its 4 links
    assert hier["network"] == pytest.approx(2 * 1 / 2 * g / 2)  # 2(H-1)/H x g / R
    assert hier["network"] * 2 <= flat["network"] * 4 * 2 / 3 + 1  # per host at most 2/3 of the flat ring's


def test_pipeline_bubble_and_stage_memory():
    profile = _profile(hosts=1)
    work = workload_for("gpt-tiny", 32, 2, bucket_bytes=2**40)
    pp = predict(Candidate("pp", dp=1, pp=2), work, profile, hosts=1)
    k = 32 // 2
    assert pp.bubble == pytest.approx(1 / (k + 1))
    one = predict(Candidate("ddp", dp=1), work, profile, hosts=1)
    # each stage runs about half the FLOPs for k + p - 1 slots
    assert pp.compute_s == pytest.approx(one.compute_s / k * (k + 1) * _largest_stage_share(work), rel=1e-6)
    gpipe = predict(Candidate("pp", dp=1, pp=2, schedule="gpipe"), work, profile, hosts=1)
    assert gpipe.activation_bytes == pytest.approx(pp.activation_bytes * k / 2)  # k alive against p


def _largest_stage_share(work) -> float:
    from plait.plan.cost import _stages

    flops = work.layer_flops
    return max(sum(flops[i] for i in stage) for stage in _stages(work, 2)) / sum(flops)


def _one_step(strategy: object) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """gpt-tiny under ``strategy`` after one training step."""
    torch.manual_seed(0)
    model, optimizer = plait.setup(
        GPT(preset("gpt-tiny")), strategy, lambda ps: plait.optim.AdamW(ps, lr=1e-3)
    )
    x = torch.randint(0, 256, (2, 33))
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    return model, optimizer


def _model_states(strategy: str) -> int:
    return plait.memory_report(*_one_step(strategy)).model_states


def _zero3_theory(microbatches: int) -> int:
    """Bytes plait's zero3 runtime counts for a train_step of gpt-tiny over ``microbatches``."""
    torch.manual_seed(0)
    model, optimizer = plait.setup(
        GPT(preset("gpt-tiny")), "zero3", lambda ps: plait.optim.AdamW(ps, lr=1e-3)
    )
    x = torch.randint(0, 256, (2 * microbatches, 33))
    model.train_step(x[:, :-1], x[:, 1:], microbatches=microbatches)
    optimizer.step()
    return model.plait_runtime.theory_bytes_per_step()


@pytest.mark.parametrize("microbatches", [1, 3])
def test_zero3_bytes_are_what_the_runtime_sends(microbatches):
    """The cost model's zero3 bytes against the runtime's theory (which tests/test_zero.py checks
    against the bytes sent): units kept gathered between forward and backward and between micro-batches."""
    work = workload_for("gpt-tiny", 2 * 2 * microbatches, 2)
    predicted = predict(Candidate("zero3", dp=2, zero=3), work, _profile(hosts=1), hosts=1)
    assert run_ranks(_zero3_theory, 2, microbatches)[0] == pytest.approx(
        predicted.bytes_per_level["host"], rel=1e-3
    )


def test_model_states_match_what_plait_holds():
    """The memory model's model states against live tensors after a step, at 2 ranks, fp32."""
    work = workload_for("gpt-tiny", 32, 8)
    profile = _profile(hosts=1)
    for name in ("ddp", "zero1", "zero2", "zero3"):
        stage = 0 if name == "ddp" else int(name[-1])
        predicted = predict(Candidate(name, dp=2, zero=stage), work, profile, hosts=1).model_state_bytes
        measured = run_ranks(_model_states, 2, name)
        assert max(measured) == pytest.approx(predicted, rel=0.02), name


def _communication_buffers(strategy: object) -> tuple[int, int]:
    """Bytes of communication memory a runtime allocated beside its model states in one step, and
    for zero2 how many buckets its pool may hold at once (0 for the others)."""
    runtime = _one_step(strategy)[0].plait_runtime
    if hasattr(runtime, "transient"):  # zero2: the most its bucket pool held at once
        pool = runtime.transient.pool
        return pool.peak_bytes, pool.limit + 1
    return sum(t.numel() * t.element_size() for t in runtime.buffer_tensors()), 0


@pytest.mark.parametrize("bucket_mb", [25, 0.5])
def test_buffers_are_what_the_runtime_allocates(bucket_mb):
    """The memory model's buffers against the runtime's own at 2 ranks: ddp reduces in place in its
    flat gradient (nothing beside it), zero2 holds at most three pooled buckets, PowerSGD a residual.

    zero2's pool reaches its bound only when reductions finish slower than backward fills buckets
    (a finished bucket's buffer serves the next), so how many it held depends on timing: the model
    predicts the bound, which the pool must never pass and which must be the pool's own limit."""
    work = workload_for("gpt-tiny", 16, 8, bucket_bytes=bucket_mb * 2**20)
    profile = _profile(hosts=1)
    cases = [
        (Candidate("ddp", dp=2), plait.DDP(bucket_mb=bucket_mb)),
        (Candidate("zero2", dp=2, zero=2), plait.Zero(stage=2, bucket_mb=bucket_mb)),
        (
            Candidate("ddp", dp=2, compression="powersgd"),
            plait.DDP(bucket_mb=bucket_mb, compression=plait.PowerSGD(rank=4)),
        ),
    ]
    for candidate, strategy in cases:
        predicted = predict(candidate, work, profile, hosts=1).buffer_bytes
        measured, pool_buckets = max(run_ranks(_communication_buffers, 2, strategy))
        if candidate.strategy != "zero2" or predicted >= work.params * 4:
            # no pool, or the bound is the whole gradient (three buckets cover it): no timing enters
            assert measured == pytest.approx(predicted, rel=0.05, abs=1024), candidate.label
        else:
            assert predicted == pool_buckets * work.bucket_bytes
            assert work.bucket_bytes * 0.95 <= measured <= predicted * 1.05, candidate.label


def _saved_block_activations(tensor_parallel: bool) -> int:
    """Bytes autograd saves inside the blocks of gpt-tiny's forward (weights excluded)."""
    torch.manual_seed(0)
    model = GPT(preset("gpt-tiny"))
    if tensor_parallel:
        model, _ = plait.setup(model, plait.TensorParallel(size=2))
    weights = {p.data_ptr() for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and t.data_ptr() not in weights:
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    x = torch.randint(0, 256, (2, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


def test_tensor_parallel_splits_the_activations_the_model_says():
    """Under tp = 2 a block saves (4 + 13/2)/17 of what it saves whole (TP_REPLICATED_ACTIVATIONS)."""
    from plait.plan.cost import TP_REPLICATED_ACTIVATIONS as whole_share

    whole, split = (
        run_ranks(_saved_block_activations, 1, False)[0],
        max(run_ranks(_saved_block_activations, 2, True)),
    )
    assert split / whole == pytest.approx(whole_share + (1 - whole_share) / 2, rel=0.03)


def test_the_pick_is_the_fastest_that_fits_and_says_why():
    profile = _profile(hosts=1)
    work = workload_for("gpt-tiny", 32, 8)
    plan = make_plan(work, profile, world=2, hosts=1)
    assert plan.pick is next(p for p in plan.predictions if p.candidate.exact)
    ddp_states = predict(Candidate("ddp", dp=2), work, profile, hosts=1).model_state_bytes
    capped = make_plan(work, profile, world=2, hosts=1, cap_gb=ddp_states / 1e9 * 0.9)
    assert capped.pick.model_state_bytes <= ddp_states * 0.9
    assert capped.pick.candidate.strategy != "ddp"
    with pytest.raises(ConfigError, match="no strategy fits"):
        make_plan(work, profile, world=2, hosts=1, cap_gb=1e-6)
    labels = {c.label for c in candidates(work, 4, 2)}
    assert {"ddp", "zero3", "ddp hier", "hybrid dp2 tp2", "hybrid dp2 pp2", "tp", "pp"} <= labels


def _profile_links():
    links = measure_links(plait.init().world)
    return {op: (link.alpha_s, link.bandwidth) for op, link in links.items()}


def test_links_are_measured_for_every_op():
    (rank0, _) = run_ranks(_profile_links, 2)
    assert set(rank0) == {"all_reduce", "reduce_scatter", "all_gather", "p2p"}
    assert all(alpha >= 0 and bandwidth > 0 for alpha, bandwidth in rank0.values())


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", *args], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )


def test_plait_plan_json_and_train_auto_under_a_cap_that_rules_out_ddp(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fast = _profile(hosts=1, host_link={"gbps": 80.0, "latency_us": 100.0})  # here data parallelism wins
    (run_dir / "profile.json").write_text(fast.to_json())
    common = ["--model", "gpt-tiny", "--nproc", "2", "--profile-file", str(run_dir / "profile.json")]
    ddp_gb = (
        predict(Candidate("ddp", dp=2), workload_for("gpt-tiny", 4, 1), fast, hosts=1).model_state_bytes / 1e9
    )
    cap = f"{ddp_gb * 0.8:.4f}"
    done = _cli(
        tmp_path, "plan", *common, "--global-batch", "4", "--micro-batch", "1", "--mem-cap-gb", cap, "--json"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert {"strategy", "predicted_step_s", "predicted_mem_gb", "fits"} <= set(rows[0])
    (pick,) = [r for r in rows if r["pick"]]
    assert pick["fits"] and pick["strategy"].startswith("zero")
    assert not next(r for r in rows if r["strategy"] == "ddp")["fits"]

    done = _cli(
        tmp_path, "train", "--strategy", "auto", "--mem-cap-gb", cap, "--nproc", "2", "--model", "gpt-tiny",
        "--data", "synthetic", "--steps", "2", "--batch-size", "4", "--micro-batch", "1", "--eval-every", "0",
        "--no-progress", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--strategy auto: " + pick["strategy"] in done.stdout
    summary = json.loads(Path(run_dir, "summary.json").read_text())
    assert summary["strategy"] == pick["strategy"]
    assert summary["model_state_bytes"] <= float(cap) * 1e9


def _auto_plan(tmp_path, *given: str):
    """``--strategy auto`` on gpt-tiny, 2 ranks, under a memory cap ddp exceeds, with ``given`` options."""
    from plait.cli import train_config
    from plait.plan.command import plan_for_training

    fast = _profile(hosts=1, host_link={"gbps": 80.0, "latency_us": 100.0})
    (tmp_path / "profile.json").write_text(fast.to_json())
    ddp = predict(Candidate("ddp", dp=2), workload_for("gpt-tiny", 4, 1), fast, hosts=1)
    launch_config, config = train_config(
        ["--strategy", "auto", "--mem-cap-gb", f"{ddp.model_state_bytes / 1e9 * 0.8:.4f}", "--nproc", "2",
         "--model", "gpt-tiny", "--batch-size", "4", "--micro-batch", "1", "--run-dir", str(tmp_path), *given]
    )  # fmt: skip
    return plan_for_training(config, launch_config)


def test_train_auto_keeps_the_options_given_that_the_pick_takes(tmp_path):
    plan, config = _auto_plan(tmp_path, "--bucket-mb", "3", "--find-unused-parameters")
    assert config.train.strategy == plan.pick.candidate.strategy and config.train.strategy.startswith("zero")
    assert config.strategy.bucket_mb == 3.0 and config.strategy.find_unused_parameters


def test_train_auto_says_which_given_options_the_pick_has_none_of(tmp_path, capsys):
    _, config = _auto_plan(tmp_path, "--grad-dtype", "bf16", "--bucket-mb", "3")
    # ZeRO has no grad_dtype: its gradients travel as computed
    assert config.train.strategy.startswith("zero")
    out = capsys.readouterr().out
    assert f"picked {config.train.strategy}, which has no option grad_dtype: not applied" in out, out


def test_shares_follow_speed_in_whole_micro_batches():
    from plait.data.balance import loss_weight, parse_shares, shares_from_speed

    assert shares_from_speed([2.0, 1.0], [16, 16], 32, 4) == (12, 20)  # rank 0 twice as slow
    assert shares_from_speed([1.0, 1.0, 1.0, 1.0], [8] * 4, 32, 4) == (8, 8, 8, 8)
    assert shares_from_speed([100.0, 1.0], [16, 16], 32, 4)[0] == 4  # at least one micro-batch each
    assert loss_weight(24, 32, 2) == 1.5
    assert parse_shares("equal", 2, 32, 4) is None
    with pytest.raises(ConfigError, match="summing to batch_size=32"):
        parse_shares("20,8", 2, 32, 4)


def _losses_with_shares(balance: str, run_dir: str) -> list[float]:
    from tests.test_train import SMALL, _fit

    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"].update(balance=balance, eval_every=0)
    return _fit(values, run_dir)


def test_unequal_shares_give_the_equal_split_losses(tmp_path):
    """Rank 0 takes 6 of 8 sequences, rank 1 takes 2: with the loss weights, the same update."""
    equal = run_ranks(_losses_with_shares, 2, "equal", str(tmp_path / "equal"))
    unequal = run_ranks(_losses_with_shares, 2, "6,2", str(tmp_path / "unequal"))
    torch.testing.assert_close(unequal[0], equal[0], rtol=1e-5, atol=0)


def test_every_candidate_on_two_hosts_is_a_valid_plait_train_command():
    """What ``plan --validate`` runs (flags) and what ``--strategy auto`` builds (fields), for each candidate."""
    from plait.cli import train_config
    from plait.plan.planner import train_flags
    from plait.train.config import build

    found = candidates(workload_for("gpt-tiny", 8, 1), world=4, hosts=2)
    assert any(c.hierarchical for c in found) and any(c.compression for c in found)
    for candidate in found:
        _, config = train_config(["--model", "gpt-tiny", "--nproc", "2", "--batch-size", "8",
                                  "--micro-batch", "1", *train_flags(candidate)])  # fmt: skip
        options = dict(candidate.train_options())
        strategy = options.pop("strategy")
        strategy = "hybrid" if strategy in ("tp", "pp") else strategy
        built = build(
            {"train": {"strategy": strategy, "batch_size": 8, "micro_batch": 1}, "strategy": options}
        )
        for made in (config, built):
            assert made.train.strategy == strategy, candidate.label
            assert getattr(made.strategy, "hierarchical", False) == candidate.hierarchical, candidate.label
            assert (getattr(made.strategy, "compression", None) is None) == (
                candidate.compression is None
            ) or (
                candidate.compression == "bf16"  # as grad_dtype="bf16"
            ), candidate.label
