"""``python -m plait.plan MODEL MICRO_BATCH OUT``: what every rank of ``plait plan --profile`` runs."""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, which reads it

from plait.plan.measure import measure

measure(sys.argv[1], int(sys.argv[2]), sys.argv[3])
