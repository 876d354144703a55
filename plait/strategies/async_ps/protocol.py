"""The parameter server's messages (a process group of their own; receive from any source).

    push     worker -> server   [gradient shard | worker's version | lr of each group]   tag PUSH
    reply    server -> worker   [parameter shard | server's version]                     tag REPLY
    request  worker -> server   [byte count], then [JSON bytes]                          tag CONTROL

The version field also carries the end of a conversation: DONE (a worker leaves) and ABORT (a
server lost a worker; the shard's first element then names it), and CHECKPOINT: a request (a
dedicated server's part in a checkpoint save or load, ``{"kind", "directory", "step"}``) follows.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from plait.comm import Group

PUSH, REPLY, CONTROL = 11, 12, 13
DONE, ABORT, CHECKPOINT = -1.0, -2.0, -3.0


class InFlight:
    """Sends in flight, kept referenced until they complete (a worker and a server thread both send)."""

    def __init__(self) -> None:
        self.handles: list = []
        self.lock = threading.Lock()

    def track(self, handle) -> None:
        with self.lock:
            self.handles = [h for h in self.handles if not h.poll()]
            self.handles.append(handle)


def lost(reply: torch.Tensor) -> str:
    return f"worker rank {int(reply[0].item())} stopped"


def send_request(ps: Group, request: dict[str, Any], dst: int) -> None:
    """A JSON request to rank ``dst``: its byte count, then its bytes (two messages, tag CONTROL)."""
    data = json.dumps(request).encode()
    ps.send(torch.tensor([float(len(data))]), dst, tag=CONTROL)
    ps.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, tag=CONTROL)


def recv_request(ps: Group, src: int) -> dict[str, Any]:
    """The JSON request ``send_request`` sent from rank ``src``."""
    length = torch.zeros(1)
    ps.recv(length, src, tag=CONTROL)
    data = torch.zeros(int(length.item()), dtype=torch.uint8)
    ps.recv(data, src, tag=CONTROL)
    return json.loads(bytes(data.tolist()))
