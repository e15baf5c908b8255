"""Convergence at 1,000 compute nodes: moves, portolan's idle CPU, a restart storm (issue 17).

What runs (one trio loop in this process, portolan as a child process):

- ``portolan serve`` on SQLite, SVP on a fixed loopback port (so it can be restarted on the
  same address), ``--svp-max-connections 19000``; the starting state (N + 2 CNs, N + 1 VNICs of
  one vnet) imported beforehand with ``Directory.load`` (no log rows);
- N simulated compute nodes in ``workers`` child processes of this module (``python -m
  bench.convergence_scale worker ...``; one Python process cannot run 1,000 nodes' shootdown
  handling fast enough to stand for 1,000 machines): one `varpd.daemon.Varpd` each on the
  memory backend, one svp-searched device, one VNIC of the vnet each (every node is a
  recipient of every move). The workers are driven over stdin/stdout lines (arm a target,
  report when every node has it, report connection statistics); times are CLOCK_MONOTONIC
  (``time.perf_counter``), which all processes share. ``log_wait`` chooses the svp client's mode: True (the default since issue 17:
  HELLO, then LOG_WAIT held by the server) or False (LOG_REQ polled every 0.25 s, as before).

Phases, in order:

1. moves: ``PUT /vnics/{M}`` between two CNs with no simulated varpd; per move, the time until
   every node's kernel cache holds M's new underlay address (as `bench.convergence`);
2. idle: nothing changes for ``idle_s`` seconds; portolan's CPU seconds (utime + stime from
   /proc/PID/stat) per wall second, i.e. the share of one core. The nodes wait 25 s per
   LOG_WAIT here (``IDLE_WAIT``; the client's default is 55 s), so a 30 s window holds every
   node's renewal: a steady-state rate, on the high side;
3. extra idle connections (optional): ``extra_conns`` more SVP connections from this process,
   each doing what an idle extension client does (HELLO, then LOG_WAIT renewed whenever it is
   answered; first waits spread over 1-25 s), and portolan's idle CPU measured again with all
   of them connected;
4. restart storm: portolan is stopped (SIGTERM), one move is written to the store offline
   (so every node has a log entry waiting), and portolan is started again on the same port.
   Figures: from the new process's start to READY, to every node reconnected (a connection
   ACTIVE again), and to every node drained (its cache updated by the waiting entry); plus how
   many connections ran into a query or connect timeout during the storm (goal: none).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.common import ServerProcess, percentile, start_ready_process

REPO_ROOT = Path(__file__).resolve().parent.parent
UL_PORT = 4789
DEVICE = "overlay0"
MAX_CONNECTIONS = 19000
#: LOG_WAIT time of the simulated nodes and idle connections (shorter than the idle window)
IDLE_WAIT = 25.0
IDLE_WAIT_MS = int(IDLE_WAIT * 1000)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start_portolan(store: str, svp_port: int) -> ServerProcess:
    return start_ready_process(
        [
            sys.executable,
            "-m",
            "portolan.cli.main",
            "serve",
            "--store",
            store,
            "--svp-listen",
            f"127.0.0.1:{svp_port}",
            "--api-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--reload-interval",
            "0",
            "--svp-max-connections",
            str(MAX_CONNECTIONS),
        ],  # fmt: skip
        timeout=120,
    )


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _cpu_share(pid: int, seconds: float) -> float:
    before, t0 = _cpu_seconds(pid), time.monotonic()
    await trio.sleep(seconds)
    return (_cpu_seconds(pid) - before) / (time.monotonic() - t0)


def _remotes(varpd: Any) -> list[Any]:
    return [v for k, v in varpd.shared.items() if k.startswith("svp:remote:")]


def _connected(varpds: list[Any]) -> int:
    """Nodes with an ACTIVE connection whose extension probe (if any) was answered."""
    n = 0
    for v in varpds:
        for remote in _remotes(v):
            if any(c.usable and c.caps is not None for c in remote.conns.values()):
                n += 1
                break
    return n


def _timeouts(varpds: list[Any]) -> dict[str, int]:
    out = {"query_timeouts": 0, "connect_timeouts": 0, "resets": 0}
    for v in varpds:
        for remote in _remotes(v):
            for c in remote.conns.values():
                out["resets"] += c.resets
                err = c.last_error or ""
                if "no reply within" in err:
                    out["query_timeouts"] += 1
                if "connect timed out" in err:
                    out["connect_timeouts"] += 1
    return out


async def _idle_client(
    address: tuple[str, int], ip16: bytes, ready: list[int], first_wait_ms: int
) -> None:
    """One idle extension client on a raw socket: HELLO, then LOG_WAIT renewed forever (the
    first one ``first_wait_ms``, so that renewals are spread as in a steady state)."""
    from protocol.svp_ext import CAP_LOG_WAIT, Hello, LogWait

    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(Hello(1, CAP_LOG_WAIT).encode())
        buf = b""
        qid = 2
        await stream.send_all(LogWait(qid, 1024, ip16, first_wait_ms).encode())
        ready[0] += 1
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while len(buf) >= 16 and len(buf) >= 16 + int.from_bytes(buf[4:8], "big"):
                end = 16 + int.from_bytes(buf[4:8], "big")
                op = int.from_bytes(buf[2:4], "big")
                buf = buf[end:]
                if op == 0x0A:  # LOG_ACK: wait again
                    qid += 1
                    await stream.send_all(LogWait(qid, 1024, ip16, IDLE_WAIT_MS).encode())


# ------------------------------------------------------------------------------ worker side


async def _worker(
    svp_port: int, first: int, count: int, log_wait: bool, workdir: str, log_interval: float
) -> None:
    """Run nodes first..first+count-1 and obey the commands on stdin (see the docstring)."""
    import logging

    from bench.convergence import cn_ip, cn_uuid, make_recording_driver, vnic_mac
    from varpd.config import parse_config
    from varpd.daemon import Varpd
    from varpd.plugins.svp.remote import SvpOptions
    from varpd.shim.memory import MemoryUnderlay
    from varpd.shim.types import Point

    logging.getLogger("varpd").setLevel(logging.ERROR)
    out = trio.lowlevel.FdStream(os.dup(1))

    async def say(line: str) -> None:
        await out.send_all((line + "\n").encode())

    underlay = MemoryUnderlay()
    # waits of 25 s (the default is 55 s): the 30 s idle window then holds every node's
    # renewal, so the idle figure is a steady-state rate, not an empty window
    options = SvpOptions(log_wait=log_wait, log_interval=log_interval, log_wait_time=IDLE_WAIT)
    drivers, varpds = [], []
    async with trio.open_nursery() as nursery:
        for i in range(first, first + count):
            config = parse_config(
                {
                    "cn_uuid": cn_uuid(i),
                    "state_dir": os.path.join(workdir, f"cn{i}"),
                    "control_socket": "",
                    "metrics": "",
                    "lookup_workers": 1,
                }
            )
            driver = make_recording_driver(underlay.backend())
            varpd = Varpd(config, driver=driver)
            varpd.shared["svp:options"] = options
            await nursery.start(varpd.run)
            props = {
                "vxlan/listen_ip": cn_ip(i),
                "vxlan/listen_port": UL_PORT,
                "svp/host": "127.0.0.1",
                "svp/port": svp_port,
                "svp/underlay_ip": cn_ip(i),
                "svp/underlay_port": UL_PORT,
            }
            await varpd.create(DEVICE, 4242, "svp", props=props)
            await varpd.activate(DEVICE)
            drivers.append(driver)
            varpds.append(varpd)
        while _connected(varpds) < count:
            await trio.sleep(0.05)
        await say("READY")
        mac = bytes.fromhex(vnic_mac(10**6 - 1).replace(":", ""))
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode().split()
                if words[0] == "arm":
                    dest, mac = int(words[1]), bytes.fromhex(words[2])
                    target = Point.of(cn_ip(dest), UL_PORT)
                    left = [len(drivers)]

                    def one(left: list[int] = left) -> None:
                        left[0] -= 1
                        if left[0] == 0:
                            last = max(d.updated for d in drivers)
                            nursery.start_soon(say, f"DONE {last!r}")

                    for d in drivers:
                        d.arm(mac, target, one)
                    await say("ARMED")
                elif words[0] == "stats":
                    t = _timeouts(varpds)
                    await say(
                        f"STATS {_connected(varpds)} {t['query_timeouts']} "
                        f"{t['connect_timeouts']} {t['resets']} {time.process_time()!r}"
                    )
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ driver side


class _Worker:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.send, self.receive = trio.open_memory_channel[list[str]](100)

    async def pump(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while True:
            data = await self.proc.stdout.receive_some(65536)
            if not data:
                await self.send.send(["EOF"])
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                await self.send.send(line.decode().split())

    async def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all((line + "\n").encode())

    async def expect(self, word: str) -> list[str]:
        while True:
            words = await self.receive.receive()
            if words and words[0] == "EOF":
                raise RuntimeError("a convergence worker exited")
            if words and words[0] == word:
                return words


async def _stats(workers: list[_Worker]) -> dict[str, float]:
    total = {"connected": 0, "query_timeouts": 0, "connect_timeouts": 0, "resets": 0, "cpu": 0.0}
    for w in workers:
        await w.command("stats")
    for w in workers:
        _, c, q, k, r, cpu = await w.expect("STATS")
        total["connected"] += int(c)
        total["query_timeouts"] += int(q)
        total["connect_timeouts"] += int(k)
        total["resets"] += int(r)
        total["cpu"] += float(cpu)
    return total


async def measure_scale(
    nodes: int,
    moves: int,
    *,
    workers: int = 2,
    log_wait: bool = True,
    log_interval: float = 0.25,
    idle_s: float = 30.0,
    extra_conns: int = 0,
    restart: bool = True,
    seed: int = 1,
) -> dict[str, Any]:
    """The phases of the module docstring; a dict of figures (seconds, shares of one core)."""
    import httpx

    from bench.convergence import cn_ip, cn_uuid, vnic_ip, vnic_mac
    from portolan.service import Directory
    from protocol.addr import ip_to_wire

    rng = random.Random(seed)
    workdir = tempfile.mkdtemp(prefix="portolan-bench-scale-")
    store = f"sqlite:{os.path.join(workdir, 'portolan.db')}"
    ghosts = [nodes, nodes + 1]
    mover = nodes
    mac_hex = vnic_mac(mover).replace(":", "")
    document = {
        "cns": [{"uuid": cn_uuid(i), "ip": cn_ip(i), "port": UL_PORT} for i in range(nodes + 2)],
        "vnics": [
            {
                "mac": vnic_mac(i),
                "ip": vnic_ip(i),
                "vnet_id": 4242,
                "vlan": 0,
                "cn_uuid": cn_uuid(ghosts[0] if i == mover else i),
            }
            for i in range(nodes + 1)
        ],
    }
    directory = await Directory.open(store)
    try:
        await directory.load(document)
    finally:
        await directory.aclose()
    out: dict[str, Any] = {"nodes": nodes, "moves": moves, "log_wait": log_wait}
    out["workers"] = workers = max(1, min(workers, nodes))
    svp_port = _free_port()
    server: ServerProcess | None = None
    procs: list[trio.Process] = []
    try:
        server = await trio.to_thread.run_sync(_start_portolan, store, svp_port)
        api_host, api_port = server.address("api")
        async with trio.open_nursery() as nursery:
            t_setup = time.perf_counter()
            pool: list[_Worker] = []
            share = -(-nodes // workers)
            for w in range(workers):
                first, count = w * share, min(share, nodes - w * share)
                argv = [
                    sys.executable, "-m", "bench.convergence_scale", "worker", str(svp_port),
                    str(first), str(count), "1" if log_wait else "0", workdir, repr(log_interval),
                ]  # fmt: skip
                proc = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO_ROOT)
                )
                procs.append(proc)
                worker = _Worker(proc)
                nursery.start_soon(worker.pump)
                pool.append(worker)
            with trio.fail_after(300):
                for worker in pool:
                    await worker.expect("READY")
            out["setup_s"] = time.perf_counter() - t_setup
            await trio.sleep(1.0)

            async def converge(dest: int, start: Any) -> float:
                """Arm every node for M at ``dest``, run ``start()``; seconds until all have it."""
                for worker in pool:
                    await worker.command(f"arm {dest} {mac_hex}")
                for worker in pool:
                    await worker.expect("ARMED")
                t0 = time.perf_counter()
                await start()
                last = 0.0
                with trio.fail_after(60):
                    for worker in pool:
                        last = max(last, float((await worker.expect("DONE"))[1]))
                return last - t0

            # 1. moves
            updated: list[float] = []
            cpu0, client0 = _cpu_seconds(server.proc.pid), (await _stats(pool))["cpu"]
            async with httpx.AsyncClient(
                base_url=f"http://{api_host}:{api_port}", timeout=30.0
            ) as http:
                for k in range(moves):
                    dest = ghosts[(k + 1) % 2]

                    async def put(dest: int = dest) -> None:
                        r = await http.put(
                            f"/vnics/{vnic_mac(mover)}", json={"cn_uuid": cn_uuid(dest)}
                        )
                        if r.status_code != 200:
                            raise RuntimeError(f"move refused: {r.status_code} {r.text}")

                    updated.append(await converge(dest, put))
                    # land the next move at a random phase of the nodes' poll cycles
                    await trio.sleep(rng.uniform(0, 0.25 if log_wait else log_interval))
            out["moves_portolan_cpu_s"] = (_cpu_seconds(server.proc.pid) - cpu0) / moves
            out["moves_nodes_cpu_s"] = ((await _stats(pool))["cpu"] - client0) / moves
            out.update(
                updated_s=updated,
                p50_s=percentile(updated, 50),
                p99_s=percentile(updated, 99),
                max_s=max(updated),
            )
            where = ghosts[moves % 2]

            # 2. idle
            if idle_s > 0:
                await trio.sleep(1.0)
                client0 = (await _stats(pool))["cpu"]
                out["idle_s"] = idle_s
                out["idle_cpu"] = await _cpu_share(server.proc.pid, idle_s)
                out["nodes_idle_cpu"] = ((await _stats(pool))["cpu"] - client0) / idle_s

            # 3. extra idle connections
            if extra_conns:
                ready = [0]
                async with trio.open_nursery() as extra:
                    address = ("127.0.0.1", svp_port)
                    for j in range(extra_conns):
                        ip16 = ip_to_wire(cn_ip(j % nodes))
                        first = rng.randrange(1000, IDLE_WAIT_MS)
                        extra.start_soon(_idle_client, address, ip16, ready, first)
                        if j % 200 == 199:
                            await trio.sleep(0.05)
                    with trio.fail_after(180):
                        while ready[0] < extra_conns:
                            await trio.sleep(0.1)
                    await trio.sleep(2.0)
                    out["extra_conns"] = extra_conns
                    out["extra_idle_cpu"] = await _cpu_share(server.proc.pid, idle_s)
                    extra.cancel_scope.cancel()
                await trio.sleep(2.0)

            # 4. restart storm
            if restart:
                before = await _stats(pool)
                await trio.to_thread.run_sync(server.stop)
                dest = ghosts[0] if where == ghosts[1] else ghosts[1]
                directory = await Directory.open(store)
                try:
                    await directory.update_vnic(bytes.fromhex(mac_hex), cn_uuid=cn_uuid(dest))
                finally:
                    await directory.aclose()
                marks: dict[str, float] = {}

                async def restart_portolan() -> None:
                    nonlocal server
                    marks["start"] = time.perf_counter()
                    server = await trio.to_thread.run_sync(_start_portolan, store, svp_port)
                    marks["ready"] = time.perf_counter()

                drained = await converge(dest, restart_portolan)
                with trio.fail_after(60):
                    while (await _stats(pool))["connected"] < nodes:
                        await trio.sleep(0.05)
                after = await _stats(pool)
                t0 = marks["start"]
                out["restart"] = {
                    "ready_s": marks["ready"] - t0,
                    "drained_s": drained,
                    "reconnected_all": after["connected"] == nodes,
                    "query_timeouts": after["query_timeouts"] - before["query_timeouts"],
                    "connect_timeouts": after["connect_timeouts"] - before["connect_timeouts"],
                }
            for worker in pool:
                assert worker.proc.stdin is not None
                await worker.proc.stdin.aclose()
            nursery.cancel_scope.cancel()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 7 and argv[0] == "worker":
        port, first, count, log_wait, workdir, interval = argv[1:]
        trio.run(
            _worker, int(port), int(first), int(count), log_wait == "1", workdir, float(interval)
        )
        return 0
    print("usage: python -m bench.convergence_scale worker PORT FIRST COUNT LOG_WAIT DIR INTERVAL")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
