"""``plait launch``: start N ranks of a script through torchrun's elastic agent.

plait has no process manager of its own: this builds the argument list of ``torch.distributed.run``
(torchrun) and calls it in this process. Single node by default (``--standalone``: a rendezvous on a
free local port); the multi-node flags pass straight through.
"""

from __future__ import annotations

import dataclasses

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from plait.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    nproc: int = 1
    """Ranks to start on this node."""
    nnodes: str = "1"
    """Number of nodes, or a range MIN:MAX for elastic jobs (torchrun --nnodes)."""
    node_rank: int | None = None
    """This node's rank among the nodes (static rendezvous; torchrun --node-rank)."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous; leave unset on one node."""
    rdzv_backend: str = "c10d"
    """torchrun rendezvous backend."""
    rdzv_id: str | None = None
    """Job id shared by all nodes of one run."""
    max_restarts: int = 0
    """Times torchrun restarts all ranks after one fails (elastic restart)."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"nproc={self.nproc} must be >= 1")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts={self.max_restarts} must be >= 0")


def torchrun_argv(config: LaunchConfig, target: str, args: list[str], module: bool = False) -> list[str]:
    """The torchrun command line (without the program name) that starts ``target`` as ``config`` says."""
    argv = [
        f"--nproc-per-node={config.nproc}",
        f"--nnodes={config.nnodes}",
        f"--max-restarts={config.max_restarts}",
    ]
    if config.rdzv_endpoint is None and config.nnodes == "1":
        argv.append("--standalone")
    else:
        if config.rdzv_endpoint is None:
            raise ConfigError(f"nnodes={config.nnodes} needs --rdzv-endpoint host:port shared by every node")
        argv += [f"--rdzv-endpoint={config.rdzv_endpoint}", f"--rdzv-backend={config.rdzv_backend}"]
        if config.rdzv_id is not None:
            argv.append(f"--rdzv-id={config.rdzv_id}")
    if config.node_rank is not None:
        argv.append(f"--node-rank={config.node_rank}")
    if module:
        argv.append("--module")
    return [*argv, target, *args]


def launch(config: LaunchConfig, target: str, args: list[str], module: bool = False) -> int:
    """Run ``target`` (a script path, or a module with ``module=True``) on ``config.nproc`` local ranks.

    Returns 0 when every rank succeeded, else the exit status of the earliest rank that exited with
    one (1 if signals killed them all), so a status a rank chose (3: over the memory cap) reaches the
    shell even when a peer was aborted as it went; torchrun prints which rank failed and why.
    """
    try:
        torchrun_main(torchrun_argv(config, target, args, module))
    except ChildFailedError as e:
        exited = sorted((f.timestamp, f.exitcode) for f in e.failures.values() if f.exitcode > 0)
        return exited[0][1] if exited else 1
    return 0
