"""Write this rank's OMP_NUM_THREADS and torch thread count to DIR/threads<rank>.txt (for test_quiet_start)."""

import os
import sys
from pathlib import Path

import torch

Path(sys.argv[1], f"threads{os.environ['RANK']}.txt").write_text(
    f"{os.environ.get('OMP_NUM_THREADS')} {torch.get_num_threads()}\n"
)
