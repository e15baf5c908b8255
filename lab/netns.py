"""Network namespaces, veths and commands inside them: the kernel half of the lab.

Two layers:

- blocking helpers for tests and benchmarks (``run``, ``nsexec``, ``in_netns``, ``sysctl``,
  ``add_ns``, ``sweep``, ``ping``, ``udp_exchange``, `Namespaces`, ``wait_for_line``): a test
  builds namespaces with a per-run prefix on a `Namespaces` and ``close()`` (always reached
  through a fixture finalizer) kills the processes it started, then deletes the namespaces,
  which takes their veths, vxlans and TAPs with them; ``sweep`` deletes what a killed run
  of the same prefix left behind;
- `Shell` and `Underlay`, the trio side used by `lab.cluster.Cluster` for
  ``placement="netns"``: commands are run with ``trio.run_process`` and reported to the
  cluster's log as ``$ ip ...`` lines; `Underlay` builds the hub (a namespace with bridge
  ``br0``, 10.0.0.254/24 by default) and one namespace per node joined to it by a veth
  (``ul0`` in the node, ``ul-<suffix>`` on the bridge), and removes every namespace it made.

`in_netns(name)` switches the *calling thread* into a namespace for a ``with`` block
(``setns(2)`` through ctypes; Python 3.11 has no ``os.setns``): sockets and TAP devices
created inside the block belong to that namespace and keep working after the block. It is
varpd's (`varpd.firewall.kernel.nftables.in_netns`, which drives nftables in a namespace the
same way); varpd may not import lab, so lab uses varpd's. `sysctl` writes ``/proc/sys`` from
a thread inside the namespace, so no ``sysctl`` binary is needed: the kernel half of the lab
needs ``ip`` (iproute2) and nothing else outside what pip installs.

Addresses live only inside these namespaces; nothing is configured in the caller's namespace.
`unavailable()` says why the kernel refuses (not root, no /dev/net/tun, no ``ip``, netns or
veth creation fails), so callers skip with that reason instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from lab import probe
from lab.spec import LabError
from varpd.firewall.kernel.nftables import CLONE_NEWNET, in_netns

Log = Callable[[str, str], None]


def _no_log(source: str, text: str) -> None:
    return None


# ------------------------------------------------------------------------------ blocking


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a command; raise with its stderr when it fails (``check``)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def nsexec(ns: str, *argv: str) -> list[str]:
    """The argv running ``argv`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def unavailable() -> str | None:
    """None when namespaces, veths and TAPs can be used here, else the reason why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, TAP)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (TAP devices unavailable)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"ptprobe{os.getpid():x}"
    proc = run("ip", "netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    try:
        link = run(
            "ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb",
            check=False,
        )  # fmt: skip
        if link.returncode != 0:
            return f"cannot create a veth pair: {link.stderr.strip()}"
    finally:
        run("ip", "netns", "del", probe, check=False)
    return None


def sysctl(ns: str, key: str, value: str | int) -> None:
    """Set ``key`` (``net.ipv6.conf.all.disable_ipv6``) to ``value`` inside namespace ``ns``:
    written to ``/proc/sys`` by the calling thread from inside ``ns`` (no ``sysctl`` binary)."""
    with in_netns(ns), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(str(value))


def ipv6_off(ns: str) -> None:
    """IPv6 off in ``ns`` (``all`` and ``default``): no DAD, RS or MLD noise."""
    for key in ("all", "default"):
        sysctl(ns, f"net.ipv6.conf.{key}.disable_ipv6", 1)


def add_ns(name: str, *, ipv6: bool = False) -> str:
    """Create namespace ``name`` with lo up and, unless ``ipv6``, IPv6 off; a namespace of
    that name (a leftover of a killed run) is deleted first."""
    run("ip", "netns", "del", name, check=False)
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    if not ipv6:
        ipv6_off(name)
    return name


def sweep(prefix: str, owner: str | None = None) -> list[str]:
    """Delete the namespaces a killed run left behind; the names deleted.

    Without ``owner``: every namespace whose name starts with ``prefix``. With ``owner``, a
    regular expression matched against the rest of the name whose first group is the pid
    (hex) of the process that made it: only those whose process is gone (a run still going,
    another session's, is left alone); names it does not match are left alone too."""
    gone = []
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(prefix):
            continue
        if owner is not None:
            m = re.match(owner, name[len(prefix) :])
            if m is None or os.path.exists(f"/proc/{int(m.group(1), 16)}"):
                continue
        run("ip", "netns", "del", name, check=False)
        gone.append(name)
    return gone


def txcsum_off(ns: str, dev: str) -> None:
    """Turn TX checksum offload off on ``dev`` (ethtool, or the SIOCETHTOOL ioctl)."""
    if shutil.which("ethtool"):
        run(*nsexec(ns, "ethtool", "-K", dev, "tx", "off"))
        return
    code = (
        "import array,fcntl,socket,struct,sys\n"
        "buf=array.array('I',[0x17,0]);a,_=buf.buffer_info()\n"
        "fcntl.ioctl(socket.socket(),0x8946,struct.pack('16sP',sys.argv[1].encode(),a))\n"
    )
    run(*nsexec(ns, sys.executable, "-c", code, dev))


def ping(ns: str, dst: str, *, count: int = 3, deadline: float = 10.0) -> tuple[bool, str]:
    """Echo ``dst`` from ``ns`` until ``count`` replies or ``deadline`` s; (all ok, output).

    Uses `lab.probe` (a raw socket), so no ``ping`` binary is needed."""
    proc = run(*probe.argv(ns, dst, count, deadline), check=False, timeout=deadline + 20)
    return proc.returncode == 0, proc.stdout + proc.stderr


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"echo:" + data, peer)
"""

UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        data, _ = s.recvfrom(65535)
    except OSError:
        continue
    print(data.decode()); sys.exit(0)
sys.exit(1)
"""


def udp_exchange(ns: str, dst: str, port: int, text: str, timeout: float = 10.0) -> str | None:
    """Send ``text`` over UDP from ``ns`` to ``dst:port`` (retrying) and return the echo."""
    proc = run(
        *nsexec(ns, sys.executable, "-c", UDP_CLIENT, dst, str(port), text, str(timeout)),
        check=False,
        timeout=timeout + 10,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


class Namespaces:
    """Namespaces and processes of one test; ``close()`` removes all of them."""

    def __init__(self, tag: str = "", prefix: str = "pt") -> None:
        self.prefix = f"{prefix}{os.getpid() % 0xFFFF:x}{tag}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, name: str, *, ipv6: bool = False) -> str:
        """Create namespace ``<prefix><name>`` (see `add_ns`): lo up, IPv6 off unless ``ipv6``."""
        full = self.prefix + name
        self.namespaces.append(full)  # before it exists: close() deletes a half-made one too
        return add_ns(full, ipv6=ipv6)

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        run("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b)  # fmt: skip
        run("ip", "-n", ns_a, "link", "set", if_a, "up")
        run("ip", "-n", ns_b, "link", "set", if_b, "up")

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        run("ip", "-n", ns, "addr", "add", cidr, "dev", dev)

    def bridge(self, ns: str, cidr: str, dev: str = "br0") -> None:
        """A bridge ``dev`` in ``ns``, up, holding ``cidr`` (an underlay hub)."""
        run("ip", "-n", ns, "link", "add", dev, "type", "bridge")
        run("ip", "-n", ns, "link", "set", dev, "up")
        self.addr(ns, dev, cidr)

    def uplink(self, ns: str, cidr: str, hub: str, port: str, dev: str = "ul0") -> None:
        """``dev`` in ``ns`` holding ``cidr``, a veth whose other end ``port`` is on the
        bridge ``br0`` of namespace ``hub`` (see `bridge`)."""
        self.veth(ns, dev, hub, port)
        run("ip", "-n", hub, "link", "set", port, "master", "br0")
        self.addr(ns, dev, cidr)

    def popen(
        self,
        ns: str | None,
        argv: Sequence[str],
        *,
        stdout: int | None = subprocess.PIPE,
        stderr_path: Path | None = None,
        append: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen:
        """``argv`` in ``ns`` (None: here) in a session of its own, stopped by `close`;
        stderr to ``stderr_path`` (appended to with ``append``), else discarded."""
        full = nsexec(ns, *argv) if ns else list(argv)
        mode = "a" if append else "w"
        err = open(stderr_path, mode) if stderr_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                full,
                stdout=stdout,
                stderr=err,
                text=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if stderr_path:
                err.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> int:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 30.0) -> str:
    """Read ``proc``'s stdout until a line starting with ``prefix`` (blocking, bounded)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line from {proc.args} (exit {proc.poll()})")


# ------------------------------------------------------------------------------ trio side


def short(arg: str) -> str:
    """Command lines as shown: inline programs are abbreviated."""
    return "<program>" if "\n" in arg else arg


async def lines(stream: Any) -> AsyncIterator[str]:
    """The lines of a trio receive stream, decoded."""
    buf = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")


class Shell:
    """Commands run from trio, each shown on the log as ``$ argv`` (source ``shell``)."""

    def __init__(self, log: Log = _no_log) -> None:
        self.log = log

    async def sh(self, *argv: str, check: bool = True, show: bool = True) -> str:
        if show:
            self.log("shell", "$ " + " ".join(argv))
        proc = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
        out = (proc.stdout or b"").decode(errors="replace")
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip()
            raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {err or out}")
        return out

    async def in_ns(self, ns: str, *argv: str, check: bool = True) -> tuple[int, str]:
        """Run argv inside ``ns``; (exit status, stdout + stderr)."""
        self.log("shell", f"$ ip netns exec {ns} " + " ".join(short(a) for a in argv))
        proc = await trio.run_process(
            nsexec(ns, *argv), capture_stdout=True, capture_stderr=True, check=False
        )
        text = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(
            errors="replace"
        )
        if check and proc.returncode != 0:
            raise LabError(f"{' '.join(argv[:3])} in {ns} failed: {text.strip()}")
        return proc.returncode, text


class Underlay:
    """The hub namespace (bridge ``br0`` holding ``hub_ip``), one namespace per node with
    ``ul0`` on the bridge, and any extra namespaces asked for; `teardown` deletes them all."""

    def __init__(self, shell: Shell, prefix: str, hub_ip: str = "10.0.0.254") -> None:
        self.shell = shell
        self.prefix = prefix
        self.hub_ip = hub_ip
        self.hub = ""
        self.namespaces: list[str] = []

    async def add_ns(self, suffix: str) -> str:
        """Namespace ``<prefix><suffix>``: lo up, IPv6 off (no DAD/RS noise)."""
        sh = self.shell.sh
        name = self.prefix + suffix
        await sh("ip", "netns", "del", name, check=False, show=False)
        await sh("ip", "netns", "add", name, show=False)
        self.namespaces.append(name)
        await sh("ip", "-n", name, "link", "set", "lo", "up", show=False)
        ipv6_off(name)  # two writes to /proc/sys from this thread: too short to matter
        return name

    async def build_hub(self, prefixlen: int = 24) -> str:
        sh = self.shell.sh
        self.hub = hub = await self.add_ns("ul")
        await sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        await sh("ip", "-n", hub, "link", "set", "br0", "up")
        await sh("ip", "-n", hub, "addr", "add", f"{self.hub_ip}/{prefixlen}", "dev", "br0")
        return hub

    async def add_node(self, suffix: str, underlay_ip: str, prefixlen: int = 24) -> str:
        """A node namespace with ``ul0`` (``underlay_ip``) on the hub's bridge."""
        sh = self.shell.sh
        ns = await self.add_ns(suffix)
        peer = f"ul-{suffix}"
        await sh(
            "ip", "link", "add", "ul0", "netns", ns, "type", "veth",
            "peer", "name", peer, "netns", self.hub,
        )  # fmt: skip
        await sh("ip", "-n", self.hub, "link", "set", peer, "master", "br0", "up")
        await sh("ip", "-n", ns, "addr", "add", f"{underlay_ip}/{prefixlen}", "dev", "ul0")
        await sh("ip", "-n", ns, "link", "set", "ul0", "up")
        return ns

    async def teardown(self) -> None:
        with trio.CancelScope(shield=True):
            for ns in reversed(self.namespaces):
                await self.shell.sh("ip", "netns", "del", ns, check=False, show=False)
            self.namespaces.clear()


__all__ = [
    "CLONE_NEWNET",
    "UDP_CLIENT",
    "UDP_ECHO",
    "Namespaces",
    "Shell",
    "Underlay",
    "add_ns",
    "in_netns",
    "ipv6_off",
    "lines",
    "nsexec",
    "ping",
    "run",
    "short",
    "sweep",
    "sysctl",
    "txcsum_off",
    "udp_exchange",
    "unavailable",
    "wait_for_line",
]
