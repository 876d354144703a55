"""The default training corpus: the Python standard library's own source, read as bytes.

Every Python installation carries it, so examples and tests train on real text with no download, and
the bytes are the same on every rank that runs the same Python. Tokens are bytes (vocabulary 256).
"""

import functools
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.errors import ConfigError

VOCAB_SIZE = 256
"""Byte-level tokens: every byte value is a token id."""

_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
)


@dataclass(frozen=True, eq=False)
class Corpus:
    """Byte tokens split by file into training and validation arrays (read-only, shared by the cache)."""

    train: np.ndarray
    """uint8 tokens of the training files, joined with b"\\n"."""
    val: np.ndarray
    """uint8 tokens of the validation files, joined with b"\\n"."""
    files: int
    """Number of source files read, both splits together."""


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library, without tests and third-party packages.

    Sorted by path relative to the library root, so every process sees the same order.
    """
    root = stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
        and not path.name.startswith("test_")
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def is_val_file(relative_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split.

    Decided by a hash of the file's own path, so adding or removing other files never moves it from
    one split to the other, and no file's text appears in both.
    """
    return zlib.crc32(relative_path.encode()) % 1000 < val_fraction * 1000


@functools.cache
def load_corpus(val_fraction: float = 0.05) -> Corpus:
    """Read the standard library into train and validation token arrays, once per process.

    The arrays are read-only: they are shared by every caller through the cache.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in (0, 1); the default is 0.05")
    root = stdlib_root()
    train: list[bytes] = []
    val: list[bytes] = []
    files = stdlib_files()
    for path in files:
        split = val if is_val_file(path.relative_to(root).as_posix(), val_fraction) else train
        split.append(path.read_bytes())
    if not train or not val:
        raise ConfigError(
            f"val_fraction={val_fraction} put {len(train)} files in train and {len(val)} in validation "
            f"out of {len(files)} under {root}; both need at least one, so use a value nearer 0.05"
        )
    return Corpus(
        train=np.frombuffer(b"\n".join(train), dtype=np.uint8),
        val=np.frombuffer(b"\n".join(val), dtype=np.uint8),
        files=len(files),
    )
