"""Checkpoints under faults: which to keep, which to resume, saving that fails, manifests not trusted."""

import contextlib
import copy
import errno
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import plait
import plait.checkpoint.sharded as sharded
from plait import checkpoint
from plait.checkpoint import CheckpointError
from plait.train import Trainer
from plait.train.config import build
from tests.harness import RankFailure, run_ranks
from tests.reference import global_batches, make_model, optimizer_factory
from tests.test_checkpoint import token_loss

TINY = {
    "model": {"model": "gpt-tiny", "n_layer": 1, "n_embd": 32, "block_size": 16},
    "data": {"data": "synthetic", "synthetic_tokens": 5_000},
    "train": {"steps": 4, "batch_size": 4, "micro_batch": 2, "eval_every": 0, "progress": False},
}


def _trainer(run_dir: str, **train) -> Trainer:
    values = {k: dict(v) for k, v in TINY.items()}
    values["train"].update(run_dir=run_dir, save_every=2, **train)
    return Trainer(build(values))


def _save_steps(run_dir: str, steps: list[int], keep: int) -> list[str]:
    trainer = _trainer(run_dir, keep_checkpoints=keep)
    for step in steps:
        trainer._save(step)
    return sorted(p.name for p in Path(run_dir, "checkpoints").iterdir())


def test_keeping_the_last_k_orders_by_step_number_past_a_million(tmp_path):
    """From step 1,000,000 (7 digits) a text sort would delete each new checkpoint right after writing it."""
    names = run_ranks(_save_steps, 1, str(tmp_path), [999_998, 999_999, 1_000_000, 1_000_001], 2)[0]
    assert names == ["step_1000000", "step_1000001"]


def test_prune_counts_only_complete_checkpoints_and_reports_failures(tmp_path, monkeypatch, capsys):
    for name in [
        "step_000002",
        "step_000004",
        "step_000006.partial",
        "step_000004.old-1a2b3c4d",
        "step_000008",
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / "step_000010").mkdir()  # no manifest: not a checkpoint
    assert checkpoint.prune(tmp_path, 2) == [tmp_path / "step_000002"]
    assert (tmp_path / "step_000004").is_dir() and (tmp_path / "step_000008").is_dir()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    assert checkpoint.prune(tmp_path, 1) == []
    assert "could not delete the old checkpoint" in capsys.readouterr().err
    assert checkpoint.complete(tmp_path)[-1] == (8, tmp_path / "step_000008")


# -- resume picks a checkpoint that loads ---------------------------------------------------------


def _fit_and_report(run_dir: str, steps: int) -> dict:
    """Build a trainer on ``run_dir`` (resuming what it finds), train to ``steps``; what it resumed and said."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        trainer = _trainer(run_dir, steps=steps)
    resumed = (str(trainer.resumed_from), trainer.sampler.step)
    trainer.fit()
    return {"resumed": resumed, "stderr": err.getvalue()}


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    """Newest checkpoint corrupt, an older intact one beside it: resume from the older one and say so."""
    run_ranks(_fit_and_report, 2, str(tmp_path), 4)
    checkpoints = tmp_path / "checkpoints"
    shard = checkpoints / "step_000004" / "rank00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    result = run_ranks(_fit_and_report, 2, str(tmp_path), 6)
    assert result[0]["resumed"] == (str(checkpoints / "step_000002"), 2)
    assert "skipping damaged checkpoint" in result[0]["stderr"] and "rank00001" in result[0]["stderr"]
    assert checkpoint.latest(checkpoints) == checkpoints / "step_000006"  # step 4 was saved again, whole
    checkpoint.verify(checkpoints / "step_000004")


def _save_twice(directory: str) -> None:
    plait.init()
    model, opt = plait.setup(make_model(), "zero2", optimizer_factory("adamw"))
    plait.checkpoint.save(directory, model, opt, step=2, extra={"next_batch": 2})
    os.environ["PLAIT_FAULT"] = "rename:rank=0"  # rank 0 dies between the two renames of a replacement
    plait.checkpoint.save(directory, model, opt, step=2, extra={"next_batch": 2})


def _resume(root: str) -> tuple[str, int] | None:
    plait.init()
    model, opt = plait.setup(make_model(seed=5), "zero2", optimizer_factory("adamw"))
    found = checkpoint.resume(root, model, opt)
    return None if found is None else (found[0].name, found[1])


def test_replacing_a_checkpoint_never_leaves_it_unfindable(tmp_path):
    """Saving again into an existing directory: killed between its two renames, the old copy still resumes."""
    with pytest.raises(RankFailure, match="rank 0: died"):
        run_ranks(_save_twice, 2, str(tmp_path / "step_000002"), grace=5)
    assert not (tmp_path / "step_000002").exists()
    found = run_ranks(_resume, 2, str(tmp_path))[0]
    assert found is not None and found[0].startswith("step_000002.old-") and found[1] == 2


# -- saving under faults --------------------------------------------------------------------------


def _save_under_fault(root: str, fault: str) -> str:
    """Save step 2, then step 4 with ``fault`` injected; the CheckpointError message of step 4's save."""
    ctx = plait.init()
    model, opt = plait.setup(make_model(), "zero2", optimizer_factory("adamw"))
    plait.checkpoint.save(f"{root}/step_2", model, opt, step=2, extra={"next_batch": 2})
    extra = {"next_batch": 4}
    no_space = OSError(errno.ENOSPC, "No space left on device")
    if fault == "shard" and ctx.rank == 1:

        def full_disk(tensors, path, **kwargs):
            Path(path).write_bytes(b"\0" * 100)
            raise no_space

        sharded.save_file = full_disk
    if fault == "manifest" and ctx.rank == 0:

        def full_disk(obj, f, **kwargs):
            f.write('{"format": "plait-')
            raise no_space

        sharded.json.dump = full_disk
    if fault == "extra":
        extra = {"next_batch": object()}
    try:
        plait.checkpoint.save(f"{root}/step_4", model, opt, step=4, extra=extra)
    except CheckpointError as e:
        return str(e)
    raise AssertionError("the save should have failed")


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("shard", ["rank 1", "step_4.partial/rank00001.safetensors", "No space left on device"]),
        ("manifest", ["rank 0", "step_4.partial/manifest.json", "No space left on device"]),
        ("extra", ["rank 0", "(also ranks 1)", "extra is not JSON-serializable", "object"]),
    ],
)
def test_a_failed_save_is_one_clear_error_on_every_rank_and_keeps_the_previous(tmp_path, fault, expected):
    messages = run_ranks(_save_under_fault, 2, str(tmp_path), fault, timeout=60)
    for message in messages:
        assert "checkpoint save to" in message and "None" not in message, message
        for fragment in expected:
            assert fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]  # the .partial is gone
    assert checkpoint.verify(tmp_path / "step_2")["step"] == 2


def _save_on_node_local_disks(root: str, stale: bool) -> str:
    """Each rank in its own folder, so the same relative path names a different directory per "host"."""
    ctx = plait.init()
    os.chdir(Path(root, f"host{ctx.rank}"))
    if stale and ctx.rank == 1:  # a leftover of an earlier run on host 1: rank 1's writes succeed there
        Path("checkpoints/step_2.partial").mkdir(parents=True)
    model, opt = plait.setup(make_model(), "ddp", optimizer_factory("adamw"))
    try:
        plait.checkpoint.save("checkpoints/step_2", model, opt, step=2)
    except CheckpointError as e:
        return str(e)
    raise AssertionError("the save should have failed")


@pytest.mark.parametrize("stale", [False, True])
def test_node_local_run_dirs_are_named_at_the_first_save(tmp_path, stale):
    for rank in range(2):
        (tmp_path / f"host{rank}").mkdir()
    for message in run_ranks(_save_on_node_local_disks, 2, str(tmp_path), stale, timeout=60):
        assert "failed on rank" in message and "node-local disks" in message and "None" not in message, (
            message
        )
    assert not (tmp_path / "host0" / "checkpoints" / "step_2").exists()


# -- the manifest is not trusted ------------------------------------------------------------------


def _save_one_step(directory: str) -> None:
    plait.init()
    model, opt = plait.setup(make_model(), "ddp", optimizer_factory("adamw"))
    model.train_step(*next(iter(global_batches(1))), token_loss)
    opt.step()
    plait.checkpoint.save(directory, model, opt, step=1)


def _load_each_expecting_errors(directories: list[str]) -> list[str]:
    """Load every directory into one model; each must fail with the model left as it was."""
    plait.init()
    model, opt = plait.setup(make_model(seed=3), "ddp", optimizer_factory("adamw"))
    before = plait.full_state_dict(model)
    messages = []
    for directory in directories:
        try:
            plait.checkpoint.load(directory, model, opt)
        except CheckpointError as e:
            messages.append(str(e))
        else:
            messages.append(f"NO ERROR loading {directory}")
        after = plait.full_state_dict(model)
        assert all(torch.equal(before[k], after[k]) for k in before), f"loading {directory} changed the model"
    return messages


def _hostile_manifests(saved: Path, tmp: Path) -> dict[str, Path]:
    """Copies of ``saved`` whose manifest was edited as a damaged or hostile one could be."""
    original = json.loads((saved / "manifest.json").read_text())
    shard = saved / "rank00000.safetensors"
    outside = tmp / "outside"
    outside.mkdir()
    shutil.copy(shard, tmp / "rank00000.safetensors")  # a valid shard, outside the checkpoint
    shutil.copy(shard, outside / "rank00000.safetensors")
    model_key = next(k for k in original["tensors"] if k.startswith("model/"))
    halves = next(  # a tensor both ranks wrote part of (ddp: rows split between them)
        k for k, e in original["tensors"].items() if k.startswith("model/") and len(e["chunks"]) >= 2
    )

    def rename_file(manifest: dict, new: str, recorded: dict | None = None) -> dict:
        manifest["files"][new] = recorded or manifest["files"].pop("rank00000.safetensors")
        for entry in manifest["tensors"].values():
            for chunk in entry["chunks"]:
                if chunk["file"] == "rank00000.safetensors":
                    chunk["file"] = new
        return manifest

    def overlapping(manifest: dict) -> dict:
        """Both chunks name the larger part: together they hold as many elements as the tensor."""
        chunks = manifest["tensors"][halves]["chunks"]
        larger = max(chunks, key=lambda c: math.prod(c["lengths"]))
        manifest["tensors"][halves]["chunks"] = [larger, dict(larger)]
        return manifest

    def retyped(manifest: dict) -> dict:
        manifest["tensors"][model_key]["dtype"] = "float16"
        return manifest

    def without_tensors(manifest: dict) -> dict:
        del manifest["tensors"]
        return manifest

    def unknown_chunk(manifest: dict) -> dict:
        manifest["tensors"][model_key]["chunks"][0]["name"] = "c999"
        return manifest

    edits = {
        "dotdot": lambda m: rename_file(m, "../rank00000.safetensors"),
        "absolute": lambda m: rename_file(m, str(outside / "rank00000.safetensors")),
        "dev_zero": lambda m: rename_file(m, "/dev/zero", {"sha256": "0" * 64, "bytes": 0}),
        "overlap": overlapping,
        "dtype": retyped,
        "list": lambda m: [m],
        "no_tensors": without_tensors,
        "unknown_chunk": unknown_chunk,
    }
    cases = {}
    for name, edit in edits.items():
        shutil.copytree(saved, tmp / name)
        (tmp / name / "manifest.json").write_text(json.dumps(edit(copy.deepcopy(original))))
        cases[name] = tmp / name
    return cases


@pytest.mark.timeout(120)
def test_a_hostile_manifest_is_a_clear_error_and_loads_nothing(tmp_path):
    """Paths out of the checkpoint, a device, overlapping chunks, a wrong dtype, a wrong shape of JSON."""
    saved = tmp_path / "step_1"
    run_ranks(_save_one_step, 2, str(saved))
    cases = _hostile_manifests(saved, tmp_path)
    messages = run_ranks(_load_each_expecting_errors, 1, [str(d) for d in cases.values()], timeout=60)[0]
    expected = {
        "dotdot": "is not rank<NNNNN>.safetensors",
        "absolute": "is not rank<NNNNN>.safetensors",
        "dev_zero": "is not rank<NNNNN>.safetensors",
        "overlap": "overlapping chunks",
        "dtype": "the manifest says float16",
        "list": "a JSON list, not an object",
        "no_tensors": "'tensors' is missing",
        "unknown_chunk": "has no 'c999'",
    }
    for (name, directory), message in zip(cases.items(), messages):
        assert expected[name] in message, f"{name}: {message}"
        out = tmp_path / f"{name}.safetensors"
        with pytest.raises(CheckpointError, match=re.escape(expected[name])):
            checkpoint.export(directory, out)
        assert not out.exists()
