"""The ``plait`` command: ``train``, ``launch``, ``estimate``, ``plan``, ``bench``, ``export``, ``report``.

Flags of ``plait train`` are derived from the config dataclasses (``plait.train.config``, their fields
read by ``plait.train.fields``): every field is a ``--field-name`` flag whose help is the field's
docstring, and a TOML file given with ``--config`` fills the same fields (flags win over the file,
the file over the defaults). The strategy's options are the fields of its own dataclass: the command line is read twice, first for
``--strategy`` (or the file's ``[train] strategy``), then with that strategy's fields as flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import typing
from pathlib import Path
from typing import Any

import plait
from plait.checkpoint import CheckpointError
from plait.errors import ConfigError, MemoryCapExceeded
from plait.launch import LaunchConfig, launch
from plait.strategies import STRATEGIES, options, strategy_class
from plait.train.config import (
    AUTO,
    SECTIONS,
    RunConfig,
    TrainConfig,
    build,
    check_tables,
    load_toml,
    parsed_as,
    to_toml,
)
from plait.train.fields import field_docs, from_text, hints, plain
from plait.train.rundir import hold, new_run_dir


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(hint: Any) -> str:
    """INT, FLOAT, STR, LIST, TABLE or CLASS: what a flag of type ``hint`` takes."""
    arms = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else [hint]
    origin = typing.get_origin(arms[0]) or arms[0]
    names = {int: "INT", float: "FLOAT", str: "STR", tuple: "LIST", type: "CLASS"}
    return names.get(origin, "TABLE")


def _add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, title: str, fields: list[dataclasses.Field] | None = None
) -> None:
    """One flag per field with the field's docstring as help; default: unset. Values are read as TOML
    values (``fields.from_text``) and type-checked with the file's values, so both give one message."""
    group = parser.add_argument_group(title)
    docs, kinds = field_docs(cls), hints(cls)
    for field in dataclasses.fields(cls) if fields is None else fields:
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(field.name, '')} (default: {plain(default)})"
        kind = kinds[field.name]
        if kind in (bool, bool | None):
            group.add_argument(
                _flag(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(
                _flag(field.name),
                dest=field.name,
                type=functools.partial(from_text, hint=kind),
                default=None,
                help=help_text,
                metavar=_metavar(kind),
            )


def _given(
    namespace: argparse.Namespace, cls: type, fields: list[dataclasses.Field] | None = None
) -> dict[str, Any]:
    return {
        f.name: getattr(namespace, f.name)
        for f in (dataclasses.fields(cls) if fields is None else fields)
        if getattr(namespace, f.name) is not None
    }


def _train_parser(strategy: str) -> argparse.ArgumentParser:
    """``plait train``'s flags: the run's sections, then the options of ``strategy``."""
    parser = argparse.ArgumentParser(
        prog="plait train",
        description="Train a GPT on the embedded corpus. `plait train --strategy NAME --help` lists NAME's options.",
    )
    parser.add_argument("--config", help="TOML file with [model] [data] [optim] [train] [strategy] tables")
    _add_dataclass_flags(parser, LaunchConfig, "processes (torchrun)")
    for section, cls in SECTIONS.items():
        _add_dataclass_flags(parser, cls, section)
    cls, _ = strategy_class(strategy)
    _add_dataclass_flags(parser, cls, f"strategy {strategy} ({cls.__name__})", options(strategy))
    return parser


def _unknown_flags(strategy: str, unknown: list[str]) -> ConfigError:
    """Flags left over: say which strategy takes them, if one does."""
    flag = next((a.split("=")[0] for a in unknown if a.startswith("--")), unknown[0])
    owners = [n for n in STRATEGIES if flag in {_flag(f.name) for f in options(n)}]
    mine = ", ".join(_flag(f.name) for f in options(strategy)) or "none"
    where = f"an option of strategy {' / '.join(owners)}, not of {strategy!r}" if owners else "not an option"
    return ConfigError(f"{flag} is {where}; {strategy}'s options: {mine} (plait train --help lists the rest)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait", description="Train PyTorch models on many workers at once."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "train", help="train a GPT on the embedded corpus (the main job)", add_help=False
    )  # its flags depend on --strategy: _train parses them

    run = commands.add_parser("launch", help="run a script on N local ranks through torchrun")
    _add_dataclass_flags(run, LaunchConfig, "processes (torchrun)")
    run.add_argument("-n", dest="nproc", type=int, help="ranks to start on this node (same as --nproc)")
    run.add_argument("-m", "--module", action="store_true", help="run TARGET as a module (python -m)")
    run.add_argument("target", help="script to run on every rank")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    estimate = commands.add_parser("estimate", help="model-state memory per device under ddp and ZeRO 1/2/3")
    estimate.add_argument("--params", type=float, help="parameter count, e.g. 7.5e9")
    estimate.add_argument("--model", help="take the parameter count from a plait model preset")
    estimate.add_argument("--nproc", type=int, default=1, help="data-parallel devices")
    estimate.add_argument(
        "--k", type=float, default=12.0, help="optimizer-state bytes per parameter (paper: 12)"
    )
    estimate.add_argument(
        "--measure",
        type=int,
        metavar="STEPS",
        help="also train --model for STEPS steps on --nproc local ranks and measure",
    )

    from plait.plan.command import add_arguments as add_plan_arguments

    add_plan_arguments(commands.add_parser("plan", help="predict every strategy's cost here and pick one"))

    export = commands.add_parser("export", help="write a checkpoint's model as one safetensors file")
    export.add_argument("checkpoint", help="a checkpoint directory (with manifest.json)")
    export.add_argument("out", nargs="?", help="the .safetensors file to write")
    export.add_argument(
        "--hf", metavar="DIR", help="instead write DIR for transformers' from_pretrained (an hf: model's run)"
    )

    report = commands.add_parser("report", help="PNG plots and a markdown summary of runs, overlaid")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories plait train wrote")
    report.add_argument("--out", help="where to write (default: RUN_DIR/report for one run, else ./report)")

    bench = commands.add_parser("bench", help="measure plait's building blocks")
    bench.add_argument("--comm", action="store_true", help="time each reduce-scatter / all-gather algorithm")
    bench.add_argument("--nproc", type=int, default=2, help="ranks to measure on")
    bench.add_argument("--sizes-mb", default="1,16,64", help="message sizes in MiB, comma-separated")
    bench.add_argument("--dtypes", default="fp32,bf16", help="dtypes, comma-separated (fp32, bf16, fp16)")
    return parser


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _compress_alias(argv: list[str]) -> list[str]:
    """``--compress NAME [--compress-rank R]`` as the strategy option ``--compression NAME`` (or, for
    powersgd with a rank, ``--compression {rank = R}``): the short spelling of issue 13."""
    alias = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    alias.add_argument("--compress", choices=["none", "bf16", "powersgd", "sign"])
    alias.add_argument("--compress-rank", type=int)
    try:
        known, rest = alias.parse_known_args(argv)
    except SystemExit:
        raise ConfigError(
            "--compress takes none, bf16, powersgd or sign; --compress-rank an integer"
        ) from None
    if known.compress_rank is not None and known.compress != "powersgd":
        raise ConfigError(
            f"--compress-rank {known.compress_rank} needs --compress powersgd, not {known.compress}"
        )
    if known.compress is None:
        return rest
    rank = known.compress_rank
    return [*rest, "--compression", known.compress if rank is None else f"{{rank = {rank}}}"]


def train_config(argv: list[str]) -> tuple[LaunchConfig, RunConfig]:
    """``plait train``'s arguments as the launch and run configs (flags over the file over the defaults)."""
    argv = _compress_alias(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--strategy", type=str)
    first.add_argument("--config")
    first.add_argument("--deepspeed")
    known, _ = first.parse_known_args(argv)
    values = load_toml(known.config) if known.config else {}
    check_tables(values)
    ds_path = known.deepspeed or values.get("train", {}).get("deepspeed")
    ds_config = None
    if isinstance(ds_path, str):  # any other type is for build() to reject
        from plait.train import deepspeed

        ds_config = deepspeed.read(ds_path)
    strategy = values.get("train", {}).get(
        "strategy", deepspeed.strategy(ds_config) if ds_config is not None else TrainConfig.strategy
    )
    strategy = known.strategy if known.strategy is not None else strategy
    if not isinstance(strategy, str):
        raise ConfigError(f"strategy={strategy!r} is {type(strategy).__name__}; use a strategy name")
    namespace, unknown = _train_parser(parsed_as(strategy)).parse_known_args(argv)
    if unknown:
        raise _unknown_flags(parsed_as(strategy), unknown)
    for section, cls in SECTIONS.items():
        values.setdefault(section, {}).update(_given(namespace, cls))
    if values["train"].get("strategy", strategy) != strategy:
        values.pop("strategy", None)  # the file's options were for the file's strategy
    values["train"]["strategy"] = strategy
    values.setdefault("strategy", {}).update(
        _given(namespace, strategy_class(parsed_as(strategy))[0], options(parsed_as(strategy)))
    )
    launch_config = LaunchConfig(**_given(namespace, LaunchConfig))
    if ds_config is not None:
        _merge_deepspeed(values, ds_config, launch_config)
    return launch_config, build(values)


def _train(argv: list[str]) -> int:
    launch_config, config = train_config(argv)
    if _under_torchrun():  # a rank: the launcher holds the run dir
        return _train_rank(config)
    train = config.train
    if train.run_dir is None and launch_config.nnodes != "1":
        raise ConfigError(
            f"--nnodes {launch_config.nnodes} needs --run-dir: the same path on every host (each host's launcher "
            "would otherwise make its own runs/<time>-... directory)"
        )
    if train.run_dir is None:
        config = dataclasses.replace(
            config, train=dataclasses.replace(train, run_dir=new_run_dir(train.strategy))
        )
    job = None if launch_config.nnodes == "1" else f"{launch_config.rdzv_endpoint}/{launch_config.rdzv_id}"
    with hold(config.train.run_dir, job) as lock:
        if config.train.strategy == AUTO:
            from plait.plan.command import plan_for_training

            plan, config = plan_for_training(config, launch_config)
            print(f"plait: --strategy auto: {plan.why}", flush=True)
        if launch_config.nproc == 1 and launch_config.nnodes == "1":
            return _train_rank(config)
        # every rank runs `plait train` on the same resolved config
        path = Path(config.train.run_dir, "config.toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(config))
        code = launch(launch_config, "plait.cli", ["train", "--config", str(path)], module=True)
        lock.succeeded = code == 0
        return code


def _train_rank(config: RunConfig) -> int:
    from plait.train import Trainer

    try:
        Trainer(config).fit()
    except (ConfigError, MemoryCapExceeded, CheckpointError) as e:
        raise _OnRank(e) from e
    if _under_torchrun():
        plait.shutdown(exit_code=0)  # see plait.shutdown: avoids gloo's abort at interpreter exit
    return 0


def _merge_deepspeed(
    values: dict[str, dict[str, Any]], ds_config: dict[str, Any], launch_config: LaunchConfig
) -> None:
    """Fill the fields a DeepSpeed config maps to (flags and --config win); print what it ignores.

    Its strategy options (bucket size, mixed precision) go to the ``[strategy]`` table; a strategy the
    user chose that has no such option is an error, not a silent loss of the setting.
    """
    nodes = int(launch_config.nnodes.split(":")[-1])
    world = int(os.environ.get("WORLD_SIZE", launch_config.nproc * nodes))
    lenient = bool(values["train"].get("deepspeed_lenient"))
    from plait.train import deepspeed

    mapped, notes = deepspeed.to_plait(ds_config, world, lenient)
    strategy = parsed_as(values["train"]["strategy"])
    known = {f.name for f in options(strategy)}
    lost = {name: value for name, value in mapped["strategy"].items() if name not in known}
    if lost:
        raise ConfigError(
            f"the DeepSpeed config sets {lost}, which strategy {strategy!r} has no option for; use ddp or "
            "zero1/2/3, or remove those settings from the DeepSpeed config"
        )
    for section, fields in mapped.items():
        for name, value in fields.items():
            values.setdefault(section, {}).setdefault(name, value)
    if notes and not _under_torchrun():
        print("plait: from the DeepSpeed config, " + "; ".join(notes), file=sys.stderr)


class _OnRank(Exception):
    """An error one rank met while training: only that rank may have seen it, so that rank reports it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


EXIT_CODES: dict[type[Exception], int] = {ConfigError: 2, MemoryCapExceeded: 3, CheckpointError: 4}
"""``plait``'s exit status for each error it explains (anything else is a traceback and 1)."""


def _report(error: Exception) -> int:
    """One line on stderr; its exit status.

    A bad configuration is found alike by every rank before any of them starts (they read the same
    file), so each host's local rank 0 says it once. An error met while training may be one rank's
    alone (a corrupt shard it hashed): every rank that meets one says it, naming itself.
    """
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if isinstance(error, _OnRank):
        error = error.error
        where = f" (rank {rank} of {world})" if world != "1" else ""
        sys.stderr.write(f"plait: error: {error}{where}\n")
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        sys.stderr.write(f"plait: error: {error}\n")
    sys.stderr.flush()
    return next(code for kind, code in EXIT_CODES.items() if isinstance(error, kind))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    namespace, rest = _parser().parse_known_args(argv)
    if rest and namespace.command != "train":
        _parser().parse_args(argv)  # argparse's own message and exit status for unknown flags
    try:
        if namespace.command == "train":
            return _train(rest)
        if namespace.command == "estimate":
            from plait.estimate import run

            return run(namespace.params, namespace.nproc, namespace.model, namespace.k, namespace.measure)
        if namespace.command == "plan":
            from plait.plan.command import run as plan

            return plan(namespace)
        if namespace.command == "export":
            from plait.checkpoint import export

            if namespace.hf:
                from plait.models.hf import export_checkpoint

                export_checkpoint(namespace.checkpoint, namespace.hf)
                print(f"wrote {namespace.hf}/config.json and model.safetensors (from_pretrained loads it)")
                return 0
            if namespace.out is None:
                raise ConfigError("plait export needs OUT (a .safetensors file) or --hf DIR")
            shapes = export(namespace.checkpoint, namespace.out)
            print(f"wrote {len(shapes)} tensors to {namespace.out}")
            return 0
        if namespace.command == "report":
            from plait.metrics.report import write_report

            out = namespace.out or (
                Path(namespace.run_dirs[0], "report") if len(namespace.run_dirs) == 1 else Path("report")
            )
            for path in write_report(namespace.run_dirs, out):
                print(path)
            return 0
        if namespace.command == "bench":
            if not namespace.comm:
                print(
                    "plait bench: say what to measure (--comm); the model benchmarks live in benchmarks/",
                    file=sys.stderr,
                )
                return 2
            args = ["--sizes-mb", namespace.sizes_mb, "--dtypes", namespace.dtypes]
            return launch(LaunchConfig(nproc=namespace.nproc), "plait.comm.bench", args, module=True)
        if namespace.command == "launch":
            config = LaunchConfig(**_given(namespace, LaunchConfig))
            return launch(config, namespace.target, namespace.args, module=namespace.module)
    except (_OnRank, *EXIT_CODES) as e:
        code = _report(e)
        if isinstance(e, _OnRank) and _under_torchrun():
            plait.shutdown(exit_code=code)  # a rank's error, too, ends without interpreter teardown
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
