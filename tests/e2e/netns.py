"""Network-namespace helpers for the packet tests: namespaces, veths, commands inside them.

Everything a test builds is named with a per-run prefix (``pt<pid-hex>...``) and registered on
a `Lab`; ``Lab.close()`` (always reached through a fixture finalizer) kills the processes the
lab started, then deletes its namespaces, which takes their veths, vxlans and TAPs with them.
Addresses used by the tests (10.x underlays, 192.168.x tenants) live only inside these
namespaces; nothing is configured in the caller's namespace.

`in_netns(name)` switches the *calling thread* into a namespace for a ``with`` block
(``setns(2)`` through ctypes; Python 3.11 has no ``os.setns``): sockets and TAP devices
created inside the block belong to that namespace and keep working after the block, which is
how an in-process driver gets its underlay socket and TAP inside a test namespace.

`unavailable()` says why the kernel refuses (not root, no /dev/net/tun, no ``ip``, netns
creation fails), so tests skip with that reason instead of failing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


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
            "ip",
            "-n",
            probe,
            "link",
            "add",
            "pa",
            "type",
            "veth",
            "peer",
            "name",
            "pb",
            check=False,
        )
        if link.returncode != 0:
            return f"cannot create a veth pair: {link.stderr.strip()}"
    finally:
        run("ip", "netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block with the calling thread inside namespace ``ns``; always switches back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


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
    """Ping ``dst`` from ``ns`` until ``count`` replies or ``deadline`` s; (all ok, output)."""
    if shutil.which("ping") is None:
        raise RuntimeError("no ping binary (apt-get install iputils-ping)")
    proc = run(
        *nsexec(ns, "ping", "-n", "-c", str(count), "-i", "0.2", "-w", str(int(deadline)), dst),
        check=False,
        timeout=deadline + 10,
    )
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


class Lab:
    """Namespaces and processes of one test; ``close()`` removes all of them."""

    def __init__(self, tag: str = "") -> None:
        self.prefix = f"pt{os.getpid() % 0xFFFF:x}{tag}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, name: str) -> str:
        """Create namespace ``<prefix><name>`` with lo up and IPv6 off (no DAD/RS noise)."""
        full = self.prefix + name
        run("ip", "netns", "del", full, check=False)  # a leftover of a killed run
        run("ip", "netns", "add", full)
        self.namespaces.append(full)
        run("ip", "-n", full, "link", "set", "lo", "up")
        for key in ("all", "default"):
            run(*nsexec(full, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"))
        return full

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        run("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b)  # fmt: skip
        run("ip", "-n", ns_a, "link", "set", if_a, "up")
        run("ip", "-n", ns_b, "link", "set", if_b, "up")

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        run("ip", "-n", ns, "addr", "add", cidr, "dev", dev)

    def popen(
        self,
        ns: str | None,
        argv: Sequence[str],
        *,
        stdout: int | None = subprocess.PIPE,
        stderr_path: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen:
        full = nsexec(ns, *argv) if ns else list(argv)
        err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
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
