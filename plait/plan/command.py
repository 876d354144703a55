"""The ``plait plan`` command and ``plait train --strategy auto``: a profile, the plan, the pick."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from plait.errors import ConfigError
from plait.launch import LaunchConfig
from plait.plan.measure import measure_profile
from plait.plan.planner import Plan, make_plan, measure_candidate, print_table, record
from plait.plan.profile import Profile, load
from plait.plan.workload import workload_for

DEFAULT_PROFILE = "runs/plan/profile.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt-tiny", help="plait model preset to plan for")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per host")
    parser.add_argument(
        "--hosts", type=int, default=1, help="hosts (the profile must describe the link between them)"
    )
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward+backward")
    parser.add_argument("--mem-cap-gb", type=float, help="most GB of model states a rank may hold")
    parser.add_argument(
        "--profile", action="store_true", help="measure the cluster now (links, compute, memory) and save it"
    )
    parser.add_argument(
        "--profile-file",
        default=DEFAULT_PROFILE,
        help="profile JSON to read (or write with --profile): measured or hand-written",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per candidate instead of the table"
    )
    parser.add_argument(
        "--validate", type=int, metavar="STEPS", help="also train each candidate STEPS steps and measure"
    )


def profile_for(model: str, micro_batch: int, launch_config: LaunchConfig, path: str, fresh: bool) -> Profile:
    """The profile at ``path``, measured first when asked or when there is none."""
    if fresh or not Path(path).exists():
        return measure_profile(model, micro_batch, launch_config, path)
    return load(path)


def run(args: argparse.Namespace) -> int:
    launch_config = LaunchConfig(nproc=args.nproc)
    if args.hosts > 1 and args.profile:
        raise ConfigError(
            f"--hosts {args.hosts} --profile: measure on the hosts themselves (plait plan --profile under "
            "plait launch --nnodes) or write the link between them by hand (--profile-file)"
        )
    profile = profile_for(args.model, args.micro_batch, launch_config, args.profile_file, args.profile)
    world = args.nproc * args.hosts
    workload = workload_for(args.model, args.global_batch, args.micro_batch)
    plan = make_plan(workload, profile, world, args.hosts, args.mem_cap_gb)
    records = {p.candidate.label: record(p, args.mem_cap_gb) for p in plan.predictions}
    if args.validate:
        for p in plan.predictions:
            records[p.candidate.label].update(
                measure_candidate(p.candidate, args.model, world, workload, args.validate, [])
            )
    if args.json:
        print(
            json.dumps([{**r, "pick": r["strategy"] == plan.pick.candidate.label} for r in records.values()])
        )
    else:
        print(f"profile: {profile.name} ({args.profile_file})")
        print_table(plan, args.mem_cap_gb, records if args.validate else None)
    return 0


def plan_for_training(config, launch_config: LaunchConfig) -> tuple[Plan, object]:
    """``--strategy auto``: the plan for the run ``config`` describes, and the config with the pick in it.

    The profile is ``RUN_DIR/profile.json``, measured there on the first such run of that directory.
    """
    train = config.train
    path = str(Path(train.run_dir, "profile.json"))
    profile = profile_for(config.model.model, train.micro_batch, launch_config, path, fresh=False)
    hosts = int(launch_config.nnodes.split(":")[-1])
    overrides = {
        k: v
        for k, v in dataclasses.asdict(config.model).items()
        if k not in ("model", "activation_checkpointing") and v is not None
    }  # the model's shape
    workload = workload_for(
        config.model.model,
        train.batch_size,
        train.micro_batch,
        overrides,
        bucket_bytes=config.strategy.bucket_mb * 2**20,
        mixed_precision=config.strategy.mixed_precision is not None,
    )
    plan = make_plan(workload, profile, launch_config.nproc * hosts, hosts, train.mem_cap_gb)
    picked = dict(plan.pick.candidate.train_options())
    strategy = picked.pop("strategy")
    if strategy in ("tp", "pp"):  # the candidate's tp x pp layout is a mesh's
        strategy = "hybrid"
    from plait.strategies import DDP, options
    from plait.train.config import build

    values = config.to_dict()
    # the user's options (given for ddp, as auto's) that the pick also takes: mixed precision, buckets...
    takes = {f.name for f in options(strategy)}
    kept = {name: value for name, value in values["strategy"].items() if name in takes}
    defaults = dataclasses.replace(config, strategy=DDP()).to_dict()["strategy"]
    dropped = sorted(k for k, v in values["strategy"].items() if k not in takes and v != defaults[k])
    if dropped:  # said, not lost silently
        print(
            f"plait: --strategy auto picked {strategy}, which has no option {', '.join(dropped)}: not applied"
        )
    values["strategy"] = kept | picked
    values["train"] = values["train"] | {"strategy": strategy}
    return plan, build(values)
