"""Configuration of ``plait train``: every field typed and range-checked in one place, clear errors."""

import dataclasses
import os
import re
import subprocess
import sys
import typing
from unittest import mock

import pytest

import plait
from plait.cli import main, train_config
from plait.comm.context import _env_seconds
from plait.models.gpt import Block
from plait.strategies import STRATEGIES, options, strategy_class
from plait.train.config import build, load_toml, to_toml
from plait.train.fields import hints


def _cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_a_bad_watchdog_limit_is_a_config_error(monkeypatch):
    done = _cli("train", "--data", "synthetic", "--steps", "1", env={"PLAIT_WATCHDOG_S": "abc"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "plait: error: environment variable PLAIT_WATCHDOG_S='abc' is not a number of seconds" in done.stderr
    )
    assert "Traceback" not in done.stderr
    for value in ("nan", "-1", "inf"):
        monkeypatch.setenv("PLAIT_WATCHDOG_S", value)
        with pytest.raises(plait.ConfigError, match=f"PLAIT_WATCHDOG_S='{value}' is not a number of seconds"):
            _env_seconds("PLAIT_WATCHDOG_S", 300.0)
    monkeypatch.setenv("PLAIT_WATCHDOG_S", "2.5")
    assert _env_seconds("PLAIT_WATCHDOG_S", 300.0) == 2.5


# -- every strategy option from the command line and from TOML ----------------------------------------

SAMPLES = {
    # field: (command-line text, TOML value, the value the strategy object holds)
    "grad_dtype": ("bf16", '"bf16"', "bf16"),
    "mixed_precision": ("bf16", '"bf16"', "bf16"),
    "unit_classes": ("plait.models.gpt.Block", '["plait.models.gpt.Block"]', (Block,)),
    "outer": ("nesterov", '"nesterov"', "nesterov"),
    "schedule": ("gpipe", '"gpipe"', "gpipe"),
    "update": ("scale", '"scale"', "scale"),
    "compensation": ("dc", '"dc"', "dc"),
    "boundaries": ("1,2", "[1, 2]", (1, 2)),
    "plan": (
        '{"transformer.h.*.mlp.c_fc" = "col"}',
        '{"transformer.h.*.mlp.c_fc" = "col"}',
        {"transformer.h.*.mlp.c_fc": "col"},
    ),
    "stage": None,  # fixed by the name (zero1/2/3)
    "compression": ("{rank = 2}", "{rank = 2}", plait.PowerSGD(rank=2)),  # a name works as any string
    "data_parallel": ("{bucket_mb = 10.0}", "{bucket_mb = 10.0}", plait.DDP(bucket_mb=10.0)),
}


def _sample(field: dataclasses.Field, hint) -> tuple[str, str, object]:
    """A value for ``field`` other than its default, as flag text, as TOML and as held."""
    if field.name in SAMPLES:
        return SAMPLES[field.name]
    arms = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if arms[0] is bool:
        return ("", str(not field.default).lower(), not field.default)
    if arms[0] is int:
        value = (field.default or 0) + 2
        return (str(value), str(value), value)
    if arms[0] is float:
        value = (field.default or 1.0) / 2
        return (repr(value), repr(value), value)
    raise AssertionError(f"add a sample value for the strategy option {field.name!r} ({hint}) to SAMPLES")


def _every_option():
    for name in STRATEGIES:
        cls, _ = strategy_class(name)
        for field in options(name):
            yield name, field, hints(cls)[field.name]


@pytest.mark.parametrize(
    ("name", "field", "hint"), list(_every_option()), ids=lambda v: getattr(v, "name", v)
)
def test_every_strategy_option_is_settable_from_the_command_line_and_toml(name, field, hint, tmp_path):
    text, toml_value, held = _sample(field, hint)
    assert held != field.default
    flag = "--" + field.name.replace("_", "-")
    argv = ["--strategy", name] + ([flag if held else "--no-" + flag[2:]] if text == "" else [flag, text])
    _, from_cli = train_config(argv)
    assert getattr(from_cli.strategy, field.name) == held
    path = tmp_path / "run.toml"
    path.write_text(f'[train]\nstrategy = "{name}"\n[strategy]\n{field.name} = {toml_value}\n')
    _, from_file = train_config(["--config", str(path)])
    assert from_file == from_cli
    path.write_text(to_toml(from_cli))  # and the recorded config reads back the same
    assert build(load_toml(path)) == from_cli


@pytest.mark.parametrize(
    "argv",
    [
        "--strategy zero3 --mixed-precision bf16",
        "--strategy async --staleness 2",
        "--strategy hybrid --tp 2 --pp 2 --micro-batch 4",
        "--strategy hybrid --pp 2 --zero 1 --schedule gpipe",
        "--grad-dtype bf16",
    ],
)
def test_the_readme_commands_still_parse(argv):
    _, config = train_config(argv.split())
    for flag, value in zip(argv.split()[::2], argv.split()[1::2]):
        name = flag[2:].replace("-", "_")
        section = (
            config.train if name in {f.name for f in dataclasses.fields(config.train)} else config.strategy
        )
        assert str(getattr(section, name)) == value


def test_a_flag_of_another_strategy_names_the_strategy_that_takes_it():
    with pytest.raises(plait.ConfigError, match=r"--staleness is an option of strategy async, not of 'ddp'"):
        train_config(["--staleness", "2"])
    with pytest.raises(
        plait.ConfigError, match=r"--mixed-precision is an option of strategy .*zero3.*not of 'async'"
    ):
        train_config(["--strategy", "async", "--mixed-precision", "bf16"])


# -- bad input: a clear error, nothing trained -------------------------------------------------------

BAD_FLAGS = [
    ("--lr nan", "lr=nan is not a finite number"),
    ("--lr inf", "lr=inf is not a finite number"),
    ("--grad-clip nan", "grad_clip=nan is not a finite number"),
    ("--weight-decay -5", "weight_decay=-5.0 must be >= 0"),
    ("--desync-every -1", "desync_every=-1 must be >= 0"),
    ("--slow-factor nan", "slow_factor=nan is not a finite number"),
    ("--seed -1", "seed=-1 must be >= 0"),
    ("--steps -1", "steps=-1 must be > 0"),
    ("--save-every 1.5", "save_every=1.5 is a float; save_every takes an integer"),
    ("--beta2 1", "beta2=1.0 must be >= 0 and < 1"),
    ("--strategy zero3 --bucket-mb nan", "bucket_mb=nan is not a finite number"),
    ("--strategy dpp", "strategy='dpp' is not known"),
]

BAD_TOML = [
    ("[optim]\nlr = nan", "lr=nan is not a finite number"),
    ("[train]\nsave_every = 1.5", "save_every=1.5 is a float; save_every takes an integer"),
    (
        '[train]\nasync_checkpoint = "false"',
        "async_checkpoint='false' is a string; async_checkpoint takes true or false",
    ),
    ("train = 5", r"\[train\] must be a table of fields \(name = value\), not 5"),
    ('[optim]\nlr = "0.1"', "lr='0.1' is a string; lr takes a finite number"),
    ("[train]\nsteps = true", "steps=True is a boolean; steps takes an integer"),
    (
        '[train]\nstrategy = "zero3"\n[strategy]\nunit_classes = ["no.such.Module"]',
        "unit_classes\\[0\\]='no.such.Module' does not import",
    ),
    (
        '[train]\nstrategy = "ddp"\n[strategy]\nstaleness = 2',
        r"strategy 'ddp' has no option\(s\) \['staleness'\]",
    ),
]


def _rejects(argv: list[str], fragment: str, capsys) -> None:
    """``plait train ARGV`` exits 2 with one ``plait: error:`` line containing ``fragment``, training nothing."""
    with mock.patch("plait.train.Trainer") as trainer:
        assert main(["train", *argv]) == 2
    assert not trainer.called
    err = capsys.readouterr().err
    assert re.search("^plait: error: .*" + fragment, err), err


@pytest.mark.parametrize(("flags", "fragment"), BAD_FLAGS, ids=[f for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_a_clear_error(flags, fragment, capsys):
    _rejects(flags.split(), re.escape(fragment), capsys)


@pytest.mark.parametrize(("toml", "fragment"), BAD_TOML, ids=[t.replace("\n", " ") for t, _ in BAD_TOML])
def test_a_bad_config_file_value_is_a_clear_error(toml, fragment, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    _rejects(["--config", str(path)], fragment, capsys)


def test_bad_paths_are_clear_errors(tmp_path, capsys):
    _rejects(["--config", str(tmp_path)], "is a directory; give a TOML file", capsys)
    binary = tmp_path / "run.toml"
    binary.write_bytes(b"[train]\nsteps = 3 # \xff\xfe\n")
    _rejects(["--config", str(binary)], "is not UTF-8 text", capsys)
    _rejects(["--config", str(tmp_path / "missing.toml")], "does not exist", capsys)
    _rejects(["--run-dir", str(binary)], "is a file, not a directory; give a directory", capsys)


def test_a_rank_other_than_zero_reports_its_error():
    """Before: only RANK 0 printed, so `RANK=1 plait train --steps -1` exited 2 with no output."""
    done = _cli("train", "--steps", "-1", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert done.returncode == 2
    assert "plait: error: steps=-1 must be > 0" in done.stderr


def test_an_error_met_while_training_is_reported_by_the_rank_that_met_it(monkeypatch, capsys):
    """A CheckpointError only rank 1 saw (a corrupt shard it hashed) reaches the terminal, naming rank 1;
    a config error, alike on every rank, is said once per host (by local rank 0)."""
    from plait.checkpoint import CheckpointError
    from plait.cli import _OnRank, _report

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _report(_OnRank(CheckpointError("shard_1.safetensors is corrupt"))) == 4
    assert capsys.readouterr().err == "plait: error: shard_1.safetensors is corrupt (rank 1 of 2)\n"
    assert _report(plait.ConfigError("steps=-1 must be > 0")) == 2
    assert capsys.readouterr().err == ""
