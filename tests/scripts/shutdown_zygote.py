"""Forks 2-rank runs of a script from one interpreter that imported torch once (tests/test_shutdown.py).

For each line "PORT RUN_ID" on stdin it forks two ranks; each runs the script as ``__main__`` and
then ends the ordinary way, off the end of this file and through interpreter teardown, as
``python script.py`` would: only the import of torch is shared. It prints the two exit codes.
"""

import os
import runpy
import sys

import torch._dynamo  # noqa: F401 - imported once, before the forks (the optimizer's constructor imports it)

import plait  # noqa: F401

script = sys.argv[1]
rank = None
for line in sys.stdin:
    port, run_id = line.split()
    sys.stdout.flush()
    pids = []
    for r in range(2):
        pid = os.fork()
        if pid == 0:
            rank = r
            break
        pids.append(pid)
    if rank is not None:
        break
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(*codes, flush=True)

if rank is not None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID=run_id, OMP_NUM_THREADS="1",
    )  # fmt: skip
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")
