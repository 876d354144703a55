"""Why a rank that finished can die of SIGABRT at interpreter exit, and what plait.shutdown does about it.

Each run is ``torchrun --nproc-per-node 2`` of a script that trains three DDP steps of a tiny model over
gloo and ends; other processes keep cores busy throughout (``--spinners``, default 1). Variants, run in turn:

* ``teardown``: ends with ``destroy_process_group()`` and a normal interpreter exit.
* ``no-context``: the same, but torch's ``_stash_obj_in_tls`` is made a no-op first, so the works that
  backward launches capture no Python object in their thread-local state.
* ``plait``: ``plait.init`` / ``plait.setup(model, "ddp", ...)`` / ``plait.shutdown()`` (the README's way).

The cause, read from a core dump of a ``teardown`` abort (``gdb -batch -ex 'thread apply all bt'``): the
main thread is in ``Py_FinalizeEx`` -> ``PyGC_Collect``, and a gloo worker thread
(``ProcessGroupGloo::runLoop``) drops its last reference to a finished ``AsyncAllreduceWork``. The
work's ``at::ThreadLocalState`` holds a ``SafePyObject``: the ``contextvars.Context`` that torch 2.13's
``_engine_run_backward`` stashes in thread-local storage for every ``backward()``, captured when the
allreduce was launched from a gradient hook. Its destructor takes the GIL
(``gil_scoped_acquire`` -> ``PyEval_AcquireThread``); during finalization CPython 3.11 ends such a thread
with ``pthread_exit``, whose forced unwind reaches the noexcept ``~AsyncWork`` -> ``std::terminate``
("terminate called without an active exception"). A busy core widens the window between the worker
completing the work (the main thread goes on to exit) and dropping it. Upstream: pytorch/pytorch#117762,
#190489 (the decref guard checks ``Py_IsInitialized``, true during finalization).

Run: ``python benchmarks/teardown_abort.py [--runs 30] [--spinners 1] [--variants teardown,no-context,plait]``.
Prints, per variant, the runs whose job exited non-zero and how each failed rank ended.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("teardown", "no-context", "plait")


def worker(variant: str) -> None:
    import torch
    import torch.distributed as dist

    if variant == "no-context":
        torch._C._stash_obj_in_tls = lambda *args: None
        torch._C._remove_obj_from_tls = lambda *args: None
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    if variant == "plait":
        import plait

        plait.init()
        model, optimizer = plait.setup(net, "ddp", lambda params: plait.optim.AdamW(params, lr=1e-2))
    else:
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(net)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    if variant == "plait":
        plait.shutdown()
    else:
        dist.destroy_process_group()


def one_run(variant: str, port: int) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         __file__, "--worker", variant],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    how = [line.split(":", 1)[1].strip() for line in done.stderr.splitlines()
           if line.strip().startswith("exitcode")]
    return done.returncode, "; ".join(how)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--spinners", type=int, default=1, help="processes keeping a core busy")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    variants = args.variants.split(",")
    failed: dict[str, list[str]] = {v: [] for v in variants}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.spinners)]
    try:
        for i in range(args.runs):
            for k, variant in enumerate(variants):
                code, how = one_run(variant, 29400 + (i * len(variants) + k) % 500)
                if code != 0:
                    failed[variant].append(f"run {i + 1}: exit {code} ({how})")
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    for variant in variants:
        print(f"{variant:>10}: {len(failed[variant])} of {args.runs} runs failed")
        for line in failed[variant]:
            print(f"{'':>12}{line}")


if __name__ == "__main__":
    main()
