"""``plait train --data PATH``: a text file, a directory of text files, nanoGPT's train.bin/val.bin."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from torch.testing import assert_close

import plait
from plait.data import BatchSampler, is_val_file, synthetic_tokens
from plait.data.files import Joined, load_files
from plait.metrics import read_metrics
from plait.train import Trainer
from plait.train.config import build
from tests.harness import run_ranks

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "keyword.py"]


def _text_dir(root: Path) -> Path:
    root.mkdir()
    for i, name in enumerate(TEXTS):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / name).write_bytes((STDLIB / name).read_bytes())
    (root / ".hidden").write_text("never read")
    (root / "empty.txt").write_text("")
    return root


def test_joined_views_index_and_split_like_one_array():
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5, 1, 17, 9)]
    whole = np.concatenate(pieces)
    joined = Joined(pieces)
    index = rng.integers(0, len(whole), (7, 5))
    assert len(joined) == len(whole)
    np.testing.assert_array_equal(joined[index], whole[index])
    for at in (0, 5, 6, 20, len(whole)):
        head, tail = joined.split(at)
        assert len(head) == at and len(tail) == len(whole) - at
        if 0 < at < len(whole):
            np.testing.assert_array_equal(tail[np.arange(len(tail))], whole[at:])


def test_a_directory_reads_like_its_files_joined_and_samples_the_same_batches(tmp_path):
    root = _text_dir(tmp_path / "texts")
    train, val = load_files(root, 0.3, 256, 32)
    files = sorted((p for p in root.rglob("*.py")), key=lambda p: p.relative_to(root).as_posix())
    splits = {True: [], False: []}
    for path in files:  # the corpus's own rule: a hash of the relative path picks the split
        splits[is_val_file(path.relative_to(root).as_posix(), 0.3)].append(path.read_bytes())
    assert splits[True] and splits[False]
    for tokens, parts in ((train, splits[False]), (val, splits[True])):
        assert tokens[np.arange(len(tokens))].tobytes() == b"\n".join(parts)
    # the sampler draws the same windows from the mapped view as from the same bytes in memory
    loaded = np.frombuffer(b"\n".join(splits[False]), dtype=np.uint8)
    for rank in range(2):
        a, b = BatchSampler(train, 32, 8, rank, 2, seed=3), BatchSampler(loaded, 32, 8, rank, 2, seed=3)
        for _ in range(3):
            assert_close(a.next_batch(), b.next_batch())


def test_text_file_and_bin_files_are_memory_maps(tmp_path):
    text = tmp_path / "some.txt"
    text.write_bytes((STDLIB / "textwrap.py").read_bytes())
    train, val = load_files(text, 0.1, 256, 16)
    assert isinstance(train, np.memmap) and len(train) + len(val) == text.stat().st_size
    tokens = synthetic_tokens(5_000, 300, seed=1).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    tokens[:1000].tofile(tmp_path / "val.bin")
    train, val = load_files(tmp_path / "train.bin", 0.1, 300, 16)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    np.testing.assert_array_equal(train, tokens)
    np.testing.assert_array_equal(val, tokens[:1000])


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("e.txt", b"", "is empty"),
        ("s.txt", b"abc", "too few for block_size=16"),
        ("x.bin", b"abc", "not a whole number of 2-byte"),
        (
            "train.bin",
            np.full(100, 500, np.uint16).tobytes(),
            "token id 500, but vocab_size=256; pass --vocab-size 501",
        ),
        ("dir", None, "has no non-empty files"),
        ("missing", "absent", "neither 'stdlib', 'synthetic' nor an existing"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, name, content, fragment):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(plait.ConfigError, match=fragment):
        load_files(path, 0.1, 256, 16)


def _fit(data: str, run_dir: str, vocab_size: int | None) -> list[float]:
    values = {
        "model": {
            "model": "gpt-tiny",
            "n_layer": 2,
            "n_embd": 64,
            "block_size": 32,
            "vocab_size": vocab_size,
        },
        "data": {"data": data, "val_fraction": 0.2},
        "optim": {"warmup_steps": 2, "lr": 1e-2},
        "train": {"steps": 12, "batch_size": 8, "micro_batch": 2, "eval_every": 0, "progress": False},
    }
    values["model"] = {k: v for k, v in values["model"].items() if v is not None}
    values["train"]["run_dir"] = run_dir
    Trainer(build(values)).fit()
    return [r["loss"] for r in read_metrics(run_dir, "step") if r["rank"] == plait.current().rank]


def test_plait_train_on_a_text_file_a_directory_and_train_bin(tmp_path):
    text = tmp_path / "some.txt"
    text.write_bytes(b"\n".join((STDLIB / name).read_bytes() for name in TEXTS))
    root = _text_dir(tmp_path / "texts")
    # nanoGPT's shakespeare_char layout: one uint16 id per character, here the bytes of real text
    np.frombuffer(text.read_bytes(), dtype=np.uint8).astype(np.uint16).tofile(tmp_path / "train.bin")
    for data, vocab in ((text, None), (root, None), (tmp_path / "train.bin", 300)):
        one = run_ranks(_fit, 1, str(data), str(tmp_path / f"one-{data.name}"), vocab)[0]
        two = run_ranks(_fit, 2, str(data), str(tmp_path / f"two-{data.name}"), vocab)
        for losses in two:  # sharded over the ranks: the same global batches as one process
            assert_close(losses, one, rtol=1e-5, atol=1e-6)
        assert np.mean(one[-3:]) < one[0] - 0.3, (data.name, one)  # the loss falls
