"""The communication layer: process groups, counted collectives, the op log.

Everything in plait that talks to another rank goes through a :class:`Group`.
"""

from plait.comm.context import Context, current, init, shutdown
from plait.comm.group import Group, Handle
from plait.comm.mesh import Mesh
from plait.comm.stats import CommStats, OpRecord, OpTotals, bus_bytes, delta

__all__ = [
    "CommStats",
    "Context",
    "Group",
    "Handle",
    "Mesh",
    "OpRecord",
    "OpTotals",
    "bus_bytes",
    "current",
    "delta",
    "init",
    "shutdown",
]
