"""Several "machines" on one Linux box: network namespaces joined by a bridge, links shaped with ``tc``.

Each host is its own network namespace with one veth interface (``eth0``) and an address in
``10.231.0.0/24``; the other end of every veth sits in a separate *switch* namespace, on a bridge. Nothing
is created in the namespace the harness runs in, there is no default route and no NAT, so the traffic
of the ranks cannot leave these namespaces. A link is shaped in both directions: on the host's egress
(upload) and on the switch port's egress towards that host (download), with an HTB class for the rate
and, where the kernel has it, ``netem`` for the one-way delay (half on each side).

Ranks start with ``ip netns exec <host> python -m benchmarks.harness.netns --rank R --world W --master ADDR:PORT
--ifname eth0 --job module:function ...`` and rendezvous exactly as they would under ``torchrun`` on real
machines: ``init_method=tcp://<address of host 0>:<port>``, ``GLOO_SOCKET_IFNAME`` set to the veth, no
loopback shortcut (ranks of the *same* host reach each other through that host's own stack, as they
would on one machine). Each rank writes the job's JSON result to a file the parent collects.

Teardown is guaranteed: ``Cluster`` is a context manager (``try/finally``), registers an ``atexit``
hook, turns SIGTERM into ``SystemExit`` while it is open, kills its workers' process groups before
deleting namespaces (a namespace lives as long as a process inside it), and every run uses a unique
name prefix (``ringattn-<pid>-<n>-``). ``cleanup_stale()`` removes namespaces left by a run whose
process is gone. Needs root and iproute2; ``unavailable()`` says why not otherwise.

>>> with Cluster(ClusterSpec(hosts=2, link=Link(rate_mbit=200))) as c:
...     results = c.run("mypkg.jobs:measure", {"n": 1024}, ranks_per_host=1, timeout=120)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

BASE_PREFIX = "ringattn-"
SUBNET = "10.231.0"  # host i gets SUBNET.(i + 1); private to each run's switch namespace
HOST_IF = "eth0"
MASTER_PORT = 29500
_COUNTER = itertools.count()


class NetnsError(RuntimeError):
    """A harness command failed, or namespaces cannot be created here."""


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.access(p, os.X_OK)), None)


IP, TC = _tool("ip"), _tool("tc")


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def unavailable() -> str | None:
    """Why namespaces cannot be created here (``None`` when they can): platform, root, iproute2."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (euid is not 0)"
    if IP is None or TC is None:
        return "iproute2 (ip, tc) not found"
    probe = f"{BASE_PREFIX}{os.getpid()}-probe"  # matches cleanup_stale's pattern if we crash here
    p = _sh(IP, "netns", "add", probe, check=False)
    if p.returncode != 0:
        return f"'ip netns add' failed: {p.stderr.strip()}"
    _sh(IP, "netns", "del", probe, check=False)
    return None


_NETEM: bool | None = None


def has_netem() -> bool:
    """Whether this kernel has the ``netem`` qdisc (needed to add latency; rate shaping needs only HTB)."""
    global _NETEM
    if _NETEM is None:
        ns = f"{BASE_PREFIX}{os.getpid()}-probe-netem"
        _sh(IP, "netns", "add", ns)
        try:
            _NETEM = _sh(TC, "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                         check=False).returncode == 0
        finally:
            _sh(IP, "netns", "del", ns, check=False)
    return _NETEM


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    p = _sh(IP, "netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = BASE_PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix><pid>-...`` whose creating process no longer runs."""
    removed = []
    for ns in list_namespaces():
        m = re.match(re.escape(prefix) + r"(\d+)-", ns)
        if m and not _pid_alive(int(m.group(1))):
            _kill_inside(ns)
            _sh(IP, "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def _kill_inside(ns: str) -> None:
    """SIGKILL processes still inside a namespace we own (stray workers would keep it alive)."""
    p = _sh(IP, "netns", "pids", ns, check=False)
    for pid in p.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@dataclass(frozen=True)
class Link:
    """Shaping of every host's link to the switch, applied in each direction.

    ``rate_mbit=None`` leaves the link unshaped (veth speed); ``delay_ms`` is the one-way host-to-host
    latency added by ``netem`` (half on each side of the switch); it needs ``has_netem()``.
    """

    rate_mbit: float | None = None
    delay_ms: float = 0.0

    def __post_init__(self):
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0 or None, got {self.rate_mbit}")
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")

    def describe(self) -> str:
        """E.g. ``"400 Mbit/s"`` or ``"unshaped"``."""
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return rate + (f", {self.delay_ms:g} ms one-way" if self.delay_ms else "")


@dataclass(frozen=True)
class ClusterSpec:
    hosts: int
    link: Link = field(default_factory=Link)
    mtu: int = 1500
    # Per-namespace sysctls. Cluster nodes commonly turn off TCP's slow start after idle: without that,
    # every ring step's message (sent after a compute step of idleness) restarts from a small window.
    sysctls: tuple[tuple[str, str], ...] = (("net.ipv4.tcp_slow_start_after_idle", "0"),)

    def __post_init__(self):
        if not 1 <= self.hosts <= 250:
            raise ValueError(f"hosts must be in [1, 250], got {self.hosts}")


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    address: str
    ifname: str = HOST_IF


_LIVE: set = set()


def _atexit_teardown() -> None:
    for c in list(_LIVE):
        c.close()


atexit.register(_atexit_teardown)


class Cluster:
    """Hosts as network namespaces on a shaped bridge; a context manager that always tears down."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.prefix = f"{BASE_PREFIX}{os.getpid()}-{next(_COUNTER)}-"
        self.switch = self.prefix + "sw"
        self.hosts = [Host(i, f"{self.prefix}h{i}", f"{SUBNET}.{i + 1}") for i in range(spec.hosts)]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._old_sigterm = None
        self.link = spec.link

    # -- lifetime ---------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        why = unavailable()
        if why:
            raise NetnsError(why)
        _LIVE.add(self)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _sigterm_to_exit)
        try:
            cleanup_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill workers, delete every namespace of this cluster (idempotent)."""
        for p in self._procs:
            _kill_group(p)
        self._procs.clear()
        for ns in reversed(self._made):
            _kill_inside(ns)
            _sh(IP, "netns", "del", ns, check=False)
        self._made.clear()
        _LIVE.discard(self)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def namespaces(self) -> list[str]:
        """The namespaces this cluster holds now (switch first); empty once closed."""
        return list(self._made)

    # -- topology ---------------------------------------------------------------------------------
    def _netns(self, name: str) -> None:
        _sh(IP, "netns", "add", name)
        self._made.append(name)
        _sh(IP, "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._netns(self.switch)
        _sh(IP, "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh(IP, "-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            self._netns(h.netns)
            port = f"p{h.index}"
            # Both ends are created directly inside their namespaces: nothing touches ours.
            _sh(IP, "link", "add", "name", h.ifname, "netns", h.netns, "mtu", str(self.spec.mtu), "type",
                "veth", "peer", "name", port, "netns", self.switch, "mtu", str(self.spec.mtu))
            _sh(IP, "-n", self.switch, "link", "set", port, "master", "br0")
            _sh(IP, "-n", self.switch, "link", "set", port, "up")
            _sh(IP, "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.ifname)
            _sh(IP, "-n", h.netns, "link", "set", h.ifname, "up")
            for key, value in self.spec.sysctls:
                _sh(IP, "netns", "exec", h.netns, "sysctl", "-q", "-w", f"{key}={value}")
        self.shape(self.spec.link)

    def shape(self, link: Link) -> None:
        """(Re)apply ``link`` to every host link, both directions; workers may be restarted after."""
        if link.delay_ms and not has_netem():
            raise NetnsError("delay_ms needs the netem qdisc, which this kernel lacks "
                             "(CONFIG_NET_SCH_NETEM is not set); only rate shaping is possible here")
        for h in self.hosts:
            for ns, dev in ((h.netns, h.ifname), (self.switch, f"p{h.index}")):
                _sh(TC, "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                if link.rate_mbit is None and not link.delay_ms:
                    continue
                rate = f"{link.rate_mbit:g}mbit" if link.rate_mbit is not None else "100gbit"
                # quantum 60000: one full-size GSO segment per round, no "quantum is big" warnings.
                _sh(TC, "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
                _sh(TC, "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                    "rate", rate, "ceil", rate, "quantum", "60000")
                if link.delay_ms:
                    _sh(TC, "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                        "delay", f"{link.delay_ms / 2:g}ms", "limit", "100000")
        self.link = link

    def qdiscs(self) -> str:
        """``tc qdisc show`` and ``tc class show`` of every link, both sides, for the record."""
        out = []
        for h in self.hosts:
            for ns, dev in ((h.netns, h.ifname), (self.switch, f"p{h.index}")):
                for what in ("qdisc", "class"):
                    out.append(f"{ns} {dev} {what}: " + _sh(TC, "-n", ns, what, "show", "dev", dev).stdout.strip())
        return "\n".join(out)

    # -- running ranks ----------------------------------------------------------------------------
    def exec_argv(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (for tools other than ``run``'s workers)."""
        return [IP, "netns", "exec", host.netns, *argv]

    def run(self, job: str, args: dict | None = None, *, ranks_per_host: int = 1, timeout: float = 300,
            threads: int = 1, env: dict | None = None) -> list[dict]:
        """Run ``job`` (``"module:function"``, called as ``function(**args)`` after the process group
        is up) on ``hosts * ranks_per_host`` ranks; rank ``r`` lives on host ``r // ranks_per_host``.

        Returns each rank's JSON result, in rank order. Raises ``NetnsError`` with every failing rank's
        stderr tail on a failure or after ``timeout`` seconds; all workers are killed either way.
        """
        world = len(self.hosts) * ranks_per_host
        master = f"{self.hosts[0].address}:{MASTER_PORT}"
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=self.prefix))
        procs, logs = [], []
        try:
            for r in range(world):
                host = self.hosts[r // ranks_per_host]
                out, log = tmp / f"rank{r}.json", tmp / f"rank{r}.log"
                argv = [sys.executable, "-m", "benchmarks.harness.netns", "--rank", str(r), "--world", str(world),
                        "--local-rank", str(r % ranks_per_host), "--master", master, "--ifname", host.ifname,
                        "--job", job, "--args", json.dumps(args or {}), "--out", str(out),
                        "--threads", str(threads)]
                logs.append(log)
                with open(log, "w") as fh:
                    p = subprocess.Popen(self.exec_argv(host, argv), stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})},
                                         start_new_session=True)
                procs.append(p)
                self._procs.append(p)
            deadline = time.monotonic() + timeout
            failed = None
            while any(p.poll() is None for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                if failed is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if failed is None and any(p.poll() is None for p in procs):
                raise NetnsError(f"{job} timed out after {timeout:g}s on {world} ranks\n" + _tails(logs, procs))
            if failed is not None or any(p.returncode != 0 for p in procs):
                time.sleep(0.5)  # let the others report their side before they are killed
                raise NetnsError(f"{job} failed on rank {failed}\n" + _tails(logs, procs))
            return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
        finally:
            for p in procs:
                _kill_group(p)
                if p in self._procs:
                    self._procs.remove(p)
            shutil.rmtree(tmp, ignore_errors=True)


def _pythonpath() -> str:
    """The workers' import path: the checkout holding ``benchmarks/`` (and ``tests/``) first, so jobs
    named ``benchmarks.…`` or ``tests.…`` import whatever the current directory."""
    root = str(pathlib.Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def _tails(logs: list[pathlib.Path], procs: list[subprocess.Popen], n: int = 2000) -> str:
    parts = []
    for r, (log, p) in enumerate(zip(logs, procs)):
        text = log.read_text(errors="replace") if log.exists() else ""
        parts.append(f"--- rank {r} (exit {p.poll()}) ---\n{text[-n:]}")
    return "\n".join(parts)


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the worker's own session: ip netns exec + python
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=5)


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


# -- the worker: runs inside a host namespace -------------------------------------------------------
def _worker(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness.netns", description="one rank of a Cluster job")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--local-rank", type=int, default=0)
    p.add_argument("--master", required=True, help="ADDR:PORT of rank 0's host")
    p.add_argument("--ifname", required=True, help="interface gloo binds to (GLOO_SOCKET_IFNAME)")
    p.add_argument("--job", required=True, help="module:function, called with **args")
    p.add_argument("--args", default="{}")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)

    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    addr, port = a.master.rsplit(":", 1)
    # The variables torchrun sets, so code reading them (init_from_env, LOCAL_RANK) sees a real launch.
    os.environ.update(GLOO_SOCKET_IFNAME=a.ifname, RANK=str(a.rank), WORLD_SIZE=str(a.world),
                      LOCAL_RANK=str(a.local_rank), MASTER_ADDR=addr, MASTER_PORT=port)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=a.timeout))
    try:
        mod, fn = a.job.split(":")
        result = getattr(importlib.import_module(mod), fn)(**json.loads(a.args))
        pathlib.Path(a.out).write_text(json.dumps(result, default=float))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
