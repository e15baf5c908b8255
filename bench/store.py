"""Store backends side by side: SQLite and PostgreSQL under ``portolan serve``.

What runs, all as separate processes on this machine:

- a private PostgreSQL cluster (``tests.support.pgcluster.PgCluster``: initdb in a temporary
  folder, a free loopback port; skipped with a note when the server binaries are missing),
  with fsync and synchronous_commit turned back on (SQLite commits with synchronous=FULL);
- ``portolan serve --store sqlite:...`` and ``portolan serve --store postgresql://...``, each
  with its API and SVP listeners on 127.0.0.1, one after the other;
- the clients: ``--writers`` threads, each with its own keep-alive HTTP connection, creating
  VNICs with ``POST /vnics`` (MAC and IP allocated by portolan); then the pipelined SVP load
  generator of ``bench.common`` asking VL2 lookups for the VNICs just created.

Printed: VNIC creates/s and VL2 lookups/s (best of ``--repeat`` runs) per backend and the ratio PostgreSQL / SQLite for
both. Lookups are answered from memory, so their ratio should be close to 1; creates pay for
a network round trip per statement on PostgreSQL.

Coherence (PostgreSQL only): a second ``portolan serve`` on the same database. Each sample
moves a VNIC to another compute node through instance A's API, then asks instance B over SVP
(one connection, back-to-back VL2 requests) until B answers with the new underlay address.
Reported: p50/p99 of the delay from A's API response (the commit) to B's first new answer,
and from the start of the request; the goal is 100 ms.

varpd restore (``varpd_restore``, a separate measurement of the compute-node store: varpd's
state folder): a state folder with N instance files (direct plugin, one VNIC each) is restored
by an in-process `Varpd` (memory backend) and the time until it is ready is taken, for N =
100 and 1,400 (best of 3). Reported: seconds to ready, milliseconds per instance, and the ratio
of the per-instance cost at 1,400 to that at 100; the goal is a ratio of at most 1.5 (restore
is linear in the instance count: it was quadratic, 7.7 s for 1,400 instances).

Results go to bench/results/store.json.

    python -m bench.store [--quick] [--writers 4] [--creates 2000] [--duration 3]
    python -m bench.store --restore-only
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    LoadSpec,
    ServerProcess,
    percentile,
    print_table,
    run_pipelined,
    start_ready_process,
    write_results,
)

VNET = 4242
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
CN_COUNT = 8
VL2_ACK_SIZE = 16 + 20
COHERENCE_GOAL_MS = 100.0
# B is asked again every 0.5 ms: fine-grained enough for the delay, and not a flood that would
# measure B's GIL contention instead of coherence
PROBE_INTERVAL = 0.0005


def cn_uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def cn_ip(i: int) -> str:
    return f"192.168.50.{i + 1}"


def _serve(url: str) -> ServerProcess:
    return start_ready_process(
        [
            sys.executable,
            "-m",
            "portolan.cli.main",
            "serve",
            "--store",
            url,
            "--svp-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        env={"PYTHONUNBUFFERED": "1"},
    )


def _api(server: ServerProcess) -> str:
    host, port = server.address("api")
    return f"http://{host}:{port}"


def _setup(base: str) -> str:
    """CNs and one /16 network; returns the network uuid."""
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(CN_COUNT):
            r = client.put(f"/cns/{cn_uuid(i)}", json={"ip": cn_ip(i)})
            r.raise_for_status()
        r = client.post(
            "/networks",
            json={
                "name": "bench",
                "owner_uuid": OWNER,
                "vnet_id": VNET,
                "vlan_id": 0,
                "subnet": "10.20.0.0/16",
            },
        )
        r.raise_for_status()
        return str(r.json()["uuid"])


def measure_creates(base: str, network: str, total: int, writers: int) -> dict[str, Any]:
    """``total`` POST /vnics from ``writers`` threads; returns rate and the MACs made."""
    macs: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    per = [total // writers + (1 if i < total % writers else 0) for i in range(writers)]
    start = threading.Barrier(writers + 1)

    def writer(i: int, n: int) -> None:
        mine: list[str] = []
        with httpx.Client(base_url=base, timeout=60) as client:
            start.wait()
            for k in range(n):
                r = client.post(
                    "/vnics",
                    json={"network_uuid": network, "cn_uuid": cn_uuid((i + k) % CN_COUNT)},
                )
                if r.status_code != 201:
                    with lock:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                mine.append(r.json()["mac"])
        with lock:
            macs.extend(mine)

    threads = [threading.Thread(target=writer, args=(i, n)) for i, n in enumerate(per)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} creates failed, e.g. {errors[0]}")
    return {"creates": len(macs), "seconds": elapsed, "rate": len(macs) / elapsed, "macs": macs}


def vl2_frame(mac_text: str, req_id: int) -> bytes:
    from protocol.addr import parse_mac
    from protocol.svp import VL2Request

    return VL2Request(id=req_id, mac=parse_mac(mac_text), vnet_id=VNET).encode()


def measure_lookups(
    server: ServerProcess,
    macs: list[str],
    duration: float,
    connections: int,
    window: int,
    repeat: int = 2,
) -> dict[str, Any]:
    """VL2 lookups/s for the given MACs: the best of ``repeat`` runs (this machine is noisy)."""
    frames = [vl2_frame(m, i) for i, m in enumerate(macs[:4096])]
    spec = LoadSpec(
        frames=frames,
        reply_size=VL2_ACK_SIZE,
        connections=connections,
        window=window,
        warmup=0.5,
        duration=duration,
    )
    runs = [run_pipelined(server.address("svp"), spec) for _ in range(repeat)]
    best = max(runs, key=lambda r: r["rate"])
    return {**best, "runs": [r["rate"] for r in runs]}


class SvpProbe:
    """Back-to-back VL2 requests on one connection: what does B answer for this MAC now?"""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def underlay(self, frame: bytes) -> bytes:
        self.sock.sendall(frame)
        buf = b""
        while len(buf) < VL2_ACK_SIZE:
            data = self.sock.recv(4096)
            if not data:
                raise RuntimeError("SVP server closed the connection")
            buf += data
        return buf[16 + 4 : 16 + 4 + 16]  # body: status u16, port u16, addr 16 bytes

    def close(self) -> None:
        self.sock.close()


def measure_coherence(url: str, macs: list[str], samples: int, a: ServerProcess) -> dict[str, Any]:
    """Move VNICs through A's API; time until B's SVP answer shows the new CN."""
    from protocol.addr import ip_to_wire

    b = _serve(url)
    try:
        probe = SvpProbe(b.address("svp"))
        after_commit: list[float] = []
        from_request: list[float] = []
        timeouts = 0
        with httpx.Client(base_url=_api(a), timeout=30) as client:
            for i in range(samples):
                mac = macs[i % len(macs)]
                target = (i * 3 + 1) % CN_COUNT
                want = ip_to_wire(cn_ip(target))
                frame = vl2_frame(mac, i)
                t_req = time.perf_counter()
                r = client.put(f"/vnics/{mac}", json={"cn_uuid": cn_uuid(target)})
                t_commit = time.perf_counter()
                if r.status_code != 200:
                    raise RuntimeError(f"move failed: {r.status_code} {r.text[:200]}")
                deadline = t_commit + 5.0
                while probe.underlay(frame) != want:
                    if time.perf_counter() > deadline:
                        timeouts += 1
                        break
                    time.sleep(PROBE_INTERVAL)
                else:
                    t_seen = time.perf_counter()
                    after_commit.append((t_seen - t_commit) * 1000)
                    from_request.append((t_seen - t_req) * 1000)
                time.sleep(0.01)
        probe.close()
    finally:
        b.stop()
    return {
        "samples": len(after_commit),
        "timeouts": timeouts,
        "after_commit_p50_ms": percentile(after_commit, 50),
        "after_commit_p99_ms": percentile(after_commit, 99),
        "after_commit_max_ms": max(after_commit) if after_commit else float("nan"),
        "from_request_p50_ms": percentile(from_request, 50),
        "from_request_p99_ms": percentile(from_request, 99),
        "goal_ms": COHERENCE_GOAL_MS,
        "goal_met": bool(after_commit)
        and timeouts == 0
        and percentile(after_commit, 99) <= COHERENCE_GOAL_MS,
    }


def make_durable(url: str) -> None:
    """The test cluster runs with fsync off; SQLite here commits with synchronous=FULL. Turn
    PostgreSQL's durability back on so the two are compared on equal terms."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for setting in ("fsync = on", "synchronous_commit = on", "full_page_writes = on"):
            conn.execute(f"ALTER SYSTEM SET {setting}")
        conn.execute("SELECT pg_reload_conf()")


def bench_backend(
    name: str, url: str, args: argparse.Namespace, coherence_samples: int
) -> dict[str, Any]:
    started = time.perf_counter()
    server = _serve(url)
    startup = time.perf_counter() - started
    try:
        network = _setup(_api(server))
        creates = measure_creates(_api(server), network, args.creates, args.writers)
        macs = creates.pop("macs")
        lookups = measure_lookups(
            server, macs, args.duration, args.connections, args.window, args.repeat
        )
        out: dict[str, Any] = {
            "backend": name,
            "startup_s": startup,
            "creates": creates,
            "lookups": lookups,
        }
        if coherence_samples:
            out["coherence"] = measure_coherence(url, macs, coherence_samples, server)
        return out
    finally:
        server.stop()


RESTORE_COUNTS = (100, 1400)
RESTORE_GOAL_RATIO = 1.5


def _write_state(folder: str, count: int) -> None:
    """``count`` instance files, written directly (no fsync: setup, not what is measured)."""
    from varpd.persist import InstanceRecord, StateDir, encode_record

    state = StateDir(folder)
    state.ensure()
    for i in range(1, count + 1):
        rec = InstanceRecord(
            id=i,
            name=f"ovl{i}",
            vnetid=i,
            mtu=1400,
            plugin="direct",
            mode=1,  # TargetMode.POINT
            props={"direct/dest_ip": "10.0.0.2", "direct/dest_port": 4789},
            device_props={"vxlan/listen_ip": "10.0.0.1", "vxlan/listen_port": 4789},
            vnics=[{"mac": f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", "vlan_id": 0, "tap": None}],
        )
        state.file_for(rec.name).write_bytes(encode_record(rec))


def _time_restore(folder: str, expected: int) -> float:
    import trio

    from varpd.config import parse_config
    from varpd.daemon import Varpd

    async def once() -> float:
        config = parse_config(
            {"state_dir": folder, "control_socket": "", "metrics": "", "lookup_workers": 1}
        )
        varpd = Varpd(config)
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await nursery.start(varpd.run)
            elapsed = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        if len(varpd.restored) != expected:
            raise RuntimeError(f"restored {len(varpd.restored)} of {expected} instances")
        return elapsed

    return trio.run(once)


def measure_varpd_restore(
    counts: tuple[int, ...] = RESTORE_COUNTS, repeat: int = 3
) -> dict[str, Any]:
    """Seconds from `Varpd.run` to ready with N instances to restore, per N (best of repeat)."""
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="varpd-bench-restore-") as tmp:
            _write_state(tmp, count)
            best = min(_time_restore(tmp, count) for _ in range(repeat))
        rows.append({"instances": count, "ready_s": best, "ms_per_instance": best / count * 1e3})
    first, last = rows[0], rows[-1]
    ratio = last["ms_per_instance"] / first["ms_per_instance"]
    return {
        "runs": rows,
        "per_instance_ratio": ratio,
        "ratio_of": f"{last['instances']} / {first['instances']} instances",
        "goal_ratio": RESTORE_GOAL_RATIO,
        "goal_met": ratio <= RESTORE_GOAL_RATIO,
    }


def _print_restore(r: dict[str, Any]) -> None:
    print("\nvarpd restore (state folder -> ready, memory backend, best of 3):")
    print_table(
        ["instances", "ready s", "ms / instance"],
        [[x["instances"], x["ready_s"], x["ms_per_instance"]] for x in r["runs"]],
    )
    print(
        f"per-instance cost ratio {r['ratio_of']}: {r['per_instance_ratio']:.2f} "
        f"(goal <= {r['goal_ratio']:g}: {'met' if r['goal_met'] else 'NOT met'})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (< 40 s)")
    p.add_argument("--writers", type=int, default=4, help="concurrent API clients creating VNICs")
    p.add_argument("--creates", type=int, default=None, help="VNICs created per backend")
    p.add_argument("--duration", type=float, default=None, help="seconds per lookup run")
    p.add_argument("--connections", type=int, default=2, help="SVP client processes")
    p.add_argument("--window", type=int, default=64, help="SVP requests in flight per connection")
    p.add_argument("--samples", type=int, default=None, help="coherence samples")
    p.add_argument("--repeat", type=int, default=2, help="lookup runs per backend (best kept)")
    p.add_argument("--restore-only", action="store_true", help="only the varpd_restore measurement")
    args = p.parse_args(argv)
    if args.creates is None:
        args.creates = 200 if args.quick else 2000
    if args.duration is None:
        args.duration = 1.0 if args.quick else 4.0
    if args.samples is None:
        args.samples = 30 if args.quick else 300
    return args


def run(quick: bool, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Run the benchmark; return (and write) the results document."""
    if args is None:
        args = parse_args(["--quick"] if quick else [])
    if getattr(args, "restore_only", False):
        restore = measure_varpd_restore()
        _print_restore(restore)
        return {"varpd_restore": restore}
    results: dict[str, Any] = {
        "quick": quick,
        "writers": args.writers,
        "creates_per_backend": args.creates,
        "connections": args.connections,
        "window": args.window,
        "duration_s": args.duration,
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="portolan-bench-store-") as tmp:
        sqlite_url = f"sqlite:{Path(tmp) / 'portolan.db'}"
        results["backends"]["sqlite"] = bench_backend("sqlite", sqlite_url, args, 0)

    pg_note = ""
    try:
        from tests.support.pgcluster import PgCluster, find_pg_bin
    except ImportError:  # run from somewhere without the tests package
        PgCluster = None  # type: ignore[assignment,misc]  # noqa: N806
        find_pg_bin = None  # type: ignore[assignment]
    if PgCluster is None or find_pg_bin is None or find_pg_bin() is None:
        pg_note = "PostgreSQL server binaries not found: PostgreSQL part skipped"
    else:
        with PgCluster() as cluster:
            make_durable(cluster.url)
            results["backends"]["postgresql"] = bench_backend(
                "postgresql", cluster.url, args, args.samples
            )
    if pg_note:
        results["note"] = pg_note

    sq = results["backends"]["sqlite"]
    pg = results["backends"].get("postgresql")
    if pg is not None:
        results["ratios"] = {
            "creates_pg_over_sqlite": pg["creates"]["rate"] / sq["creates"]["rate"],
            "lookups_pg_over_sqlite": pg["lookups"]["rate"] / sq["lookups"]["rate"],
        }
        results["goals"] = {
            "lookups_not_slower_on_pg": results["ratios"]["lookups_pg_over_sqlite"] >= 0.9,
            "coherence_p99_within_100ms": pg["coherence"]["goal_met"],
        }
    results["varpd_restore"] = measure_varpd_restore()
    _print(results)
    _print_restore(results["varpd_restore"])
    path = write_results("store", results)
    print(f"\nresults written to {os.path.relpath(path)}")
    return results


def _print(results: dict[str, Any]) -> None:
    print(
        f"\nStore backends: {results['creates_per_backend']} VNIC creates by "
        f"{results['writers']} API clients; VL2 lookups by {results['connections']} "
        f"connections x window {results['window']} for {results['duration_s']:g}s"
    )
    rows = []
    for name, b in results["backends"].items():
        rows.append([name, b["creates"]["rate"], b["lookups"]["rate"], b["startup_s"]])
    if "ratios" in results:
        r = results["ratios"]
        rows.append(["PG / SQLite", r["creates_pg_over_sqlite"], r["lookups_pg_over_sqlite"], ""])
    print_table(["backend", "creates/s", "VL2 lookups/s", "startup s"], rows)
    pg = results["backends"].get("postgresql")
    if pg is not None:
        c = pg["coherence"]
        print(
            f"\ncross-instance coherence (move via A's API -> B's SVP VL2 answer), "
            f"{c['samples']} samples, {c['timeouts']} timeouts:"
        )
        print_table(
            ["measured from", "p50 ms", "p99 ms"],
            [
                ["A's API response (commit)", c["after_commit_p50_ms"], c["after_commit_p99_ms"]],
                ["start of A's request", c["from_request_p50_ms"], c["from_request_p99_ms"]],
            ],
        )
        g = results["goals"]
        print(
            f"\ngoals: lookups on PostgreSQL not slower than SQLite (ratio >= 0.9): "
            f"{'met' if g['lookups_not_slower_on_pg'] else 'NOT met'}; coherence p99 <= "
            f"{COHERENCE_GOAL_MS:g} ms: {'met' if g['coherence_p99_within_100ms'] else 'NOT met'}"
        )
    if "note" in results:
        print(f"\nnote: {results['note']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run(args.quick, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "run"]
