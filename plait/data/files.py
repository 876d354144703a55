"""A user's own training data (``plait train --data PATH``), read by memory map, never loaded whole.

Three layouts:

* a text file: its bytes are the tokens (vocabulary 256, as the default corpus); the last
  ``val_fraction`` of it is the validation split;
* a directory of text files: every non-hidden file below it, in path order, joined with b"\\n" as the
  default corpus joins the standard library; files go to validation by a hash of their relative path
  (``is_val_file``, as the corpus), or, if that leaves a split empty, the last ``val_fraction`` of the
  joined bytes does;
* nanoGPT's pre-tokenized ``train.bin`` (and ``val.bin`` beside it): uint16 token ids, the
  vocabulary given by ``--vocab-size``; without ``val.bin`` the tail of ``train.bin`` validates.

The joined bytes of a directory are a :class:`Joined` view over one memory map per file: a window is
gathered from the pages it touches. The samplers (``BatchSampler``, ``eval_batches``) take these
arrays as they take the corpus, so sharding over ranks and resuming work exactly as for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from plait.data.corpus import is_val_file
from plait.errors import ConfigError

_SEPARATOR = np.frombuffer(b"\n", dtype=np.uint8)
_SCAN_CHUNK = 1 << 24
"""Tokens read at a time when checking a .bin file's ids against the vocabulary."""


class Joined:
    """Arrays end to end, indexable by integer arrays like one array (what the samplers need)."""

    def __init__(self, pieces: list[np.ndarray]) -> None:
        self.pieces = [p for p in pieces if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.pieces])
        self.dtype = self.pieces[0].dtype if self.pieces else np.dtype(np.uint8)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        which = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for piece in np.unique(which):
            mask = which == piece
            out[mask] = self.pieces[piece][index[mask] - self.starts[piece]]
        return out

    def split(self, at: int) -> tuple[Joined, Joined]:
        """The first ``at`` elements and the rest, as two views (no copy)."""
        k = int(np.searchsorted(self.starts, at, side="right") - 1)
        offset = at - int(self.starts[k]) if k < len(self.pieces) else 0
        head = self.pieces[:k] + ([self.pieces[k][:offset]] if k < len(self.pieces) else [])
        tail = ([self.pieces[k][offset:]] if k < len(self.pieces) else []) + self.pieces[k + 1 :]
        return Joined(head), Joined(tail)


def _memmap(path: Path, dtype: type) -> np.ndarray:
    """The file as a read-only memory map; ConfigError when it cannot be read or holds no whole token."""
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    width = np.dtype(dtype).itemsize
    if size < width:
        raise ConfigError(f"data file {str(path)!r} is empty; give a file with text (or tokens) in it")
    if size % width:
        raise ConfigError(
            f"{str(path)!r} has {size} bytes, not a whole number of {width}-byte tokens; is it nanoGPT's uint16 .bin?"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _text_files(root: Path) -> list[Path]:
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _joined(files: list[Path]) -> Joined:
    pieces: list[np.ndarray] = []
    for path in files:
        if path.stat().st_size == 0:
            continue  # an empty file adds nothing (not even a separator)
        if pieces:
            pieces.append(_SEPARATOR)
        pieces.append(_memmap(path, np.uint8))
    return Joined(pieces)


def _tail_split(tokens: Joined | np.ndarray, val_fraction: float) -> tuple:
    at = int(len(tokens) * (1 - val_fraction))
    if isinstance(tokens, Joined):
        return tokens.split(at)
    return tokens[:at], tokens[at:]


def _check_ids(tokens: np.ndarray, path: Path, vocab_size: int) -> None:
    """Every id below ``vocab_size``, read a chunk at a time (the file is never in memory whole)."""
    for lo in range(0, len(tokens), _SCAN_CHUNK):
        top = int(tokens[lo : lo + _SCAN_CHUNK].max())
        if top >= vocab_size:
            raise ConfigError(
                f"{str(path)!r} holds token id {top}, but vocab_size={vocab_size}; pass --vocab-size {top + 1} "
                "or more (GPT-2's tokenizer: 50257, padded 50304)"
            )


def _bin_files(path: Path) -> tuple[Path, Path | None]:
    train = path / "train.bin" if path.is_dir() else path
    val = train.with_name("val.bin")
    return train, (val if val.exists() and val != train else None)


def load_files(
    path: str | os.PathLike, val_fraction: float, vocab_size: int, block_size: int
) -> tuple[np.ndarray | Joined, np.ndarray | Joined]:
    """Train and validation tokens of ``path`` (see the module docstring), checked against the model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"data={str(path)!r} is neither 'stdlib', 'synthetic' nor an existing file or directory"
        )
    if path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").exists()):
        train_path, val_path = _bin_files(path)
        train = _memmap(train_path, np.uint16)
        val = _memmap(val_path, np.uint16) if val_path else None
        for tokens, source in ((train, train_path), (val, val_path)):
            if tokens is not None:
                _check_ids(tokens, source, vocab_size)
        if val is None:
            train, val = _tail_split(train, val_fraction)
        source = str(train_path)
    else:
        if vocab_size < 256:
            raise ConfigError(f"vocab_size={vocab_size} is too small for byte-level text; it needs 256")
        if path.is_file():
            train, val = _tail_split(_memmap(path, np.uint8), val_fraction)
        else:
            files = _text_files(path)
            if not files or all(f.stat().st_size == 0 for f in files):
                raise ConfigError(f"data directory {str(path)!r} has no non-empty files")
            is_val = [is_val_file(f.relative_to(path).as_posix(), val_fraction) for f in files]
            train = _joined([f for f, v in zip(files, is_val) if not v])
            val = _joined([f for f, v in zip(files, is_val) if v])
            if not len(train) or not len(val):
                train, val = _tail_split(_joined(files), val_fraction)
        source = str(path)
    for name, tokens in (("training", train), ("validation", val)):
        if len(tokens) < block_size + 1:
            raise ConfigError(
                f"{source!r} gives {len(tokens)} {name} tokens, too few for block_size={block_size} (a window "
                f"needs {block_size + 1}); give more data, a smaller --block-size or another --val-fraction"
            )
    return train, val
