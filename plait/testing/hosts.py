"""Several hosts on one machine: network namespaces on a bridge, each link shaped to a rate.

Tests and benchmarks use it to run a multi-node job for real, with its rendezvous by hostname and
its gradients crossing a slow link, on one machine::

    with Hosts(2, rate="1gbit") as hosts:
        endpoint = hosts.endpoint(29500)                       # "hosta:29500"
        b = hosts.popen(1, ["plait", "train", "--nnodes", "2", "--rdzv-endpoint", endpoint, ...])
        a = hosts[0].run(["plait", "train", "--nnodes", "2", "--rdzv-endpoint", endpoint, ...])

The layout (N hosts, a star)::

    host ns "hosta" ---- eth0 (10.77.0.1/24, egress: tbf RATE) ==veth== port0 -+
    host ns "hostb" ---- eth0 (10.77.0.2/24, egress: tbf RATE) ==veth== port1 -+- br0 (bridge ns)
    ...

* Each host is a network namespace of its own (its own stack, loopback and ports: every
  instance may use port 29500) plus a UTS namespace per command, so ``hostname`` prints the host's
  name. torchrun's c10d rendezvous decides which node hosts the store by matching the endpoint's
  host to the machine's own names (shared/FACTS.md), so the endpoint is given as ``hosta:PORT``.
* ``/etc/netns/<namespace>/hosts`` names every host; ``ip netns exec`` mounts it over
  ``/etc/hosts`` for the commands it runs, so gloo's default interface is the veth one.
* Egress of every host is shaped with ``tc qdisc ... tbf`` (this kernel has no netem: no added
  delay or loss). Traffic between ranks of one host stays inside its namespace, unshaped.
* Addresses exist only inside the namespaces created here; nothing in the machine's own
  namespace changes. Names carry this process's pid and a random token, so parallel instances
  never collide, and namespaces a dead process left behind are removed at the next start.
* Everything runs on one filesystem: a run dir is shared between the hosts unless a test gives
  each its own.

Needs root, ``ip`` (iproute2 with netns support), ``tc`` and ``unshare``; :func:`unavailable`
says why not, for a pytest skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
from collections.abc import Sequence

from plait.train.rundir import pid_alive

_PREFIX = "plait"
_NETNS_ETC = "/etc/netns"
_LEFTOVER = re.compile(rf"^{_PREFIX}-(\d+)-[0-9a-f]+-")


class HostsError(RuntimeError):
    """A namespace, link or shaping command failed; the message carries the command and its stderr."""


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise HostsError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@functools.cache
def unavailable() -> str | None:
    """None when emulated hosts can be made here, else why not (for ``pytest.mark.skipif``)."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"emulated hosts need `{tool}` on PATH"
    probe = f"{_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "name", "br0", "type", "bridge"])
        _run(["ip", "-n", probe, "link", "add", "name", "probe0", "type", "veth", "peer", "name", "probe1"])
        _run(["tc", "-n", probe, "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1gbit",
              "burst", "1mb", "latency", "50ms"])  # fmt: skip
    except HostsError as e:
        return f"emulated hosts are not possible here: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _remove_leftovers() -> None:
    """Delete namespaces (and their /etc/netns files) that a process now dead left behind."""
    for line in _run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _LEFTOVER.match(name)
        if match and not pid_alive(int(match.group(1))):
            _kill_all(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(os.path.join(_NETNS_ETC, name), ignore_errors=True)


def _pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def _kill_all(netns: str, sig: int = signal.SIGKILL) -> list[int]:
    pids = _pids(netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


class Host:
    """One emulated host: a network namespace, a hostname and an address on the bridge."""

    def __init__(self, name: str, netns: str, address: str) -> None:
        self.name = name
        """The hostname its commands see (``hostname``) and every host's /etc/hosts resolves."""
        self.netns = netns
        """The network namespace (``ip netns exec NETNS ...``)."""
        self.address = address
        """Its IPv4 address on the bridge (inside the namespaces only)."""
        self._procs: list[subprocess.Popen] = []

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run on this host: its network namespace and its own hostname."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]  # fmt: skip

    def popen(self, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on this host (``subprocess.Popen`` keywords pass through); it is killed at stop."""
        proc = subprocess.Popen(self.command(argv), env=env, **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` on this host to the end (``subprocess.run`` keywords pass through)."""
        return subprocess.run(self.command(argv), env=env, timeout=timeout, **kwargs)

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process on this host (a lost machine); returns their pids.

        torchrun starts each worker in a session of its own, so killing the launcher's process
        group would miss them: this takes every process in the host's network namespace.
        """
        return _kill_all(self.netns, sig)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"


class Hosts:
    """``n`` emulated hosts on a bridge, each host's egress shaped to ``rate`` (a tc rate, e.g. "1gbit").

    ``rate=None`` leaves the links unshaped. ``burst`` and ``latency`` are tbf's: the bucket size,
    and how long a packet may queue before it is dropped. A context manager: the namespaces exist
    between ``__enter__`` and ``__exit__`` (also when the body raises), and every process started
    on a host is killed at exit.
    """

    def __init__(
        self,
        n: int,
        rate: str | None = None,
        burst: str = "1mb",
        latency: str = "50ms",
        subnet: str = "10.77.0",
    ) -> None:
        if not 1 <= n <= len(string.ascii_lowercase):
            raise ValueError(f"n={n} hosts: use 1 to {len(string.ascii_lowercase)}")
        token = f"{_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.rate, self.burst, self.latency = rate, burst, latency
        self.bridge = f"{token}-bridge"
        """The namespace that holds the bridge every host's link plugs into."""
        self.hosts = [
            Host(f"host{letter}", f"{token}-host{letter}", f"{subnet}.{i + 1}")
            for i, letter in enumerate(string.ascii_lowercase[:n])
        ]
        self._started = False

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    def endpoint(self, port: int, host: int = 0) -> str:
        """``hostname:port`` of a rendezvous on host ``host``, as every node's torchrun must be given it."""
        return f"{self.hosts[host].name}:{port}"

    def popen(
        self, i: int, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` (see :meth:`Host.popen`)."""
        return self.hosts[i].popen(argv, env, **kwargs)

    def start(self) -> Hosts:
        reason = unavailable()
        if reason is not None:
            raise HostsError(reason)
        _remove_leftovers()
        self._started = True
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.bridge])
        _run(["ip", "-n", self.bridge, "link", "add", "name", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
        hosts_file = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{h.address} {h.name}\n" for h in self.hosts
        )
        for i, host in enumerate(self.hosts):
            _run(["ip", "netns", "add", host.netns])
            port = f"port{i}"
            _run(["ip", "-n", host.netns, "link", "add", "name", "eth0", "type", "veth",
                  "peer", "name", port, "netns", self.bridge])  # fmt: skip
            _run(["ip", "-n", self.bridge, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
            if self.rate is not None:
                _run(["tc", "-n", host.netns, "qdisc", "add", "dev", "eth0", "root", "tbf",
                      "rate", self.rate, "burst", self.burst, "latency", self.latency])  # fmt: skip
            etc = os.path.join(_NETNS_ETC, host.netns)
            os.makedirs(etc, exist_ok=True)
            with open(os.path.join(etc, "hosts"), "w") as f:
                f.write(hosts_file)

    def stop(self) -> None:
        """Kill every process on the hosts, then delete the namespaces and their /etc/netns files."""
        if not self._started:
            return
        self._started = False
        for host in self.hosts:
            host.kill()
        for host in self.hosts:
            for proc in host._procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            host._procs.clear()
        for name in [h.netns for h in self.hosts] + [self.bridge]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(os.path.join(_NETNS_ETC, name), ignore_errors=True)

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
