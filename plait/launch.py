"""``plait launch``: start N ranks of a script through torchrun's elastic agent.

plait has no process manager of its own: this builds the argument list of ``torch.distributed.run``
(torchrun) and calls it in this process. Single node by default (``--standalone``: a rendezvous on a
free local port); the multi-node flags pass straight through, with two guards of the control plane
(see the README's security model): a multi-node job needs an ``--rdzv-id`` nobody can guess, and
gloo binds to one interface (``--iface``, by default the one that routes to the rendezvous endpoint).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import secrets
import socket
import struct
import sys

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
    rdzv_conf: str | None = None
    """Rendezvous options key=value,... (torchrun --rdzv-conf), e.g. last_call_timeout=5: how long an
    elastic job waits for more nodes once it has --nnodes MIN (torch's default: 30 s)."""
    rdzv_id: str | None = None
    """Job id shared by all nodes of one run; multi-node jobs need one nobody can guess (16+ characters
    of letters, digits, '-', '_', '.'): the rendezvous keeps its state in the store under this id."""
    iface: str | None = None
    """Network interface gloo binds to on a multi-node job (GLOO_SOCKET_IFNAME); default: the
    interface with the route to the rendezvous endpoint."""
    max_restarts: int = 0
    """Times torchrun restarts all ranks after one fails (elastic restart)."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"nproc={self.nproc} must be >= 1")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts={self.max_restarts} must be >= 0")
        if self.rdzv_id is not None and not _RDZV_ID.fullmatch(self.rdzv_id):
            raise ConfigError(
                f"rdzv_id={self.rdzv_id!r} is guessable or malformed: use 16 or more letters, digits, "
                f"'-', '_' or '.', the same on every node, e.g. --rdzv-id {secrets.token_hex(16)}"
            )


_RDZV_ID = re.compile(r"[A-Za-z0-9_.\-]{16,}")
_SIOCGIFADDR = 0x8915


def _ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_towards(endpoint: str) -> str | None:
    """The local interface whose address this machine uses to reach ``endpoint`` (host:port).

    None when the host does not resolve, is reached over loopback, or is IPv6 only. Found the way
    the kernel picks a source address: a UDP socket "connected" to the endpoint (no packet is sent).
    """
    host, _, port = endpoint.rpartition(":")
    try:
        address = socket.getaddrinfo(host, int(port or 0), socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(address)
            local = s.getsockname()[0]
    except (OSError, ValueError):
        return None
    if local.startswith("127."):
        return None
    return next((name for _, name in socket.if_nameindex() if _ipv4_of(name) == local), None)


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
        if config.rdzv_id is None:
            raise ConfigError(
                f"nnodes={config.nnodes} needs --rdzv-id, the same on every node and hard to guess (the "
                f"rendezvous keeps its state under it), e.g. --rdzv-id {secrets.token_hex(16)}"
            )
        argv += [
            f"--rdzv-endpoint={config.rdzv_endpoint}",
            f"--rdzv-backend={config.rdzv_backend}",
            f"--rdzv-id={config.rdzv_id}",
        ]
        if config.rdzv_conf is not None:
            argv.append(f"--rdzv-conf={config.rdzv_conf}")
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

    Each rank gets one thread (``OMP_NUM_THREADS=1``) unless the user set it: ranks share the cores,
    and torchrun, finding it unset, would set the same and print a banner saying so.

    On a multi-node job the workers' store is not torchrun's agent store
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` unless set), so a node can join a re-formed job; and
    gloo is bound to ``config.iface`` (else GLOO_SOCKET_IFNAME as set, else the
    interface that routes to the rendezvous endpoint), so its unauthenticated data connections
    listen on that network only; one line on stderr says where the rendezvous is and which interface.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = torchrun_argv(config, target, args, module)
    if "--standalone" not in argv:
        names = [name for _, name in socket.if_nameindex()]
        if config.iface is not None and config.iface not in names:
            raise ConfigError(
                f"iface={config.iface!r} is not an interface of this machine; use one of {names}"
            )
        iface = (
            config.iface or os.environ.get("GLOO_SOCKET_IFNAME") or interface_towards(config.rdzv_endpoint)
        )
        if iface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
        # torch 2.13's c10d rendezvous caches the workers' store address from a node's first round
        # (TCPStore sharing): a node that stays rank 0 never publishes MASTER_ADDR again, so a node
        # joining a later round (a lost host back) waits on `torch.rendezvous.<id>.<round>/MASTER_ADDR`
        # for 60 s and the re-formed job fails. Without sharing, rank 0 publishes it every round.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        print(
            f"plait launch: rendezvous {config.rdzv_endpoint} id {config.rdzv_id}; "
            f"gloo on interface {iface or '(hostname address)'}",
            file=sys.stderr,
        )
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        exited = sorted((f.timestamp, f.exitcode) for f in e.failures.values() if f.exitcode > 0)
        return exited[0][1] if exited else 1
    return 0
