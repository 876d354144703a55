"""The ``plait`` command: ``train``, ``launch``, ``estimate``, ``bench``, ``export``.

Flags of ``plait train`` are derived from the config dataclasses (``plait.train.config``): every
field is a ``--field-name`` flag whose help is the field's docstring, and a TOML file given with
``--config`` fills the same fields (flags win over the file, the file over the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import plait
from plait.checkpoint import CheckpointError
from plait.errors import ConfigError, MemoryCapExceeded
from plait.launch import LaunchConfig, launch
from plait.train.config import SECTIONS, build, field_docs, load_toml, to_toml


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field, typed from its annotation, with the field's docstring as help; default: unset."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[field.name]
        if isinstance(kind, types.UnionType):  # "int | None" -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(field.name, '')} (default: {default})"
        if kind is bool:
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
                type=kind,
                default=None,
                help=help_text,
                metavar=kind.__name__.upper(),
            )


def _given(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)
        if getattr(namespace, f.name) is not None
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait", description="Train PyTorch models on many workers at once."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a GPT on the embedded corpus (the main job)")
    train.add_argument("--config", help="TOML file with [model] [data] [optim] [train] tables")
    _add_dataclass_flags(train, LaunchConfig, "processes (torchrun)")
    for section, cls in SECTIONS.items():
        _add_dataclass_flags(train, cls, section)

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

    export = commands.add_parser("export", help="write a checkpoint's model as one safetensors file")
    export.add_argument("checkpoint", help="a checkpoint directory (with manifest.json)")
    export.add_argument("out", help="the .safetensors file to write")

    bench = commands.add_parser("bench", help="measure plait's building blocks")
    bench.add_argument("--comm", action="store_true", help="time each reduce-scatter / all-gather algorithm")
    bench.add_argument("--nproc", type=int, default=2, help="ranks to measure on")
    bench.add_argument("--sizes-mb", default="1,16,64", help="message sizes in MiB, comma-separated")
    bench.add_argument("--dtypes", default="fp32,bf16", help="dtypes, comma-separated (fp32, bf16, fp16)")
    return parser


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _train(namespace: argparse.Namespace) -> int:
    from plait.train import Trainer

    launch_config = LaunchConfig(**_given(namespace, LaunchConfig))
    values = load_toml(namespace.config) if namespace.config else {}
    for section, cls in SECTIONS.items():
        values.setdefault(section, {}).update(_given(namespace, cls))
    config = build(values)
    if (launch_config.nproc > 1 or launch_config.nnodes != "1") and not _under_torchrun():
        # every rank runs `plait train` on the same resolved config, which also records the run
        path = Path(config.train.run_dir, "config.toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(config))
        return launch(launch_config, "plait.cli", ["train", "--config", str(path)], module=True)
    Trainer(config).fit()
    if _under_torchrun():
        plait.shutdown(exit_code=0)  # see plait.shutdown: avoids gloo's abort at interpreter exit
    return 0


def _report(error: Exception) -> None:
    """One line on stderr, from rank 0 only when every rank hits the same error."""
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"plait: error: {error}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    namespace = _parser().parse_args(argv)
    try:
        if namespace.command == "train":
            return _train(namespace)
        if namespace.command == "estimate":
            from plait.estimate import run

            return run(namespace.params, namespace.nproc, namespace.model, namespace.k, namespace.measure)
        if namespace.command == "export":
            from plait.checkpoint import export

            shapes = export(namespace.checkpoint, namespace.out)
            print(f"wrote {len(shapes)} tensors to {namespace.out}")
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
    except ConfigError as e:
        _report(e)
        return 2
    except MemoryCapExceeded as e:
        _report(e)
        return 3
    except CheckpointError as e:
        _report(e)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
