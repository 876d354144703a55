"""Training data: the embedded stdlib corpus, synthetic streams, and sharded resumable batch sampling."""

from plait.data.corpus import VOCAB_SIZE, Corpus, is_val_file, load_corpus, stdlib_files, stdlib_root
from plait.data.sampler import BatchSampler, eval_batches, split_micro_batches
from plait.data.synthetic import synthetic_tokens

__all__ = [
    "VOCAB_SIZE",
    "BatchSampler",
    "Corpus",
    "eval_batches",
    "is_val_file",
    "load_corpus",
    "split_micro_batches",
    "stdlib_files",
    "stdlib_root",
    "synthetic_tokens",
]
