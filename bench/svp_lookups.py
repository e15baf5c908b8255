"""SVP lookup throughput and latency of ``portolan serve``, against a trivial trio server.

What runs, all as separate processes on this machine:

- ``portolan serve`` on a SQLite store holding N VNICs (10k and 1M; ``--quick``: 1k and 10k),
  spread over 100 compute nodes. The store is built once by inserting through the store API
  in one transaction (``portolan load`` validates every field of every entry, which is right
  for operators and too slow for a million rows) and kept in a cache folder for later runs.
- the ceiling: a trio server that reads each frame (16-byte header + body) and writes a fixed
  VL2_ACK for it, batching the replies of one receive into one write as portolan does. It is
  what a Python trio server can do here with no lookup, no CRC check, no encoding.
- the client: ``--connections`` processes, one TCP connection each, ``--window`` requests in
  flight each (bench.common.run_pipelined). Every request hits an existing mapping.

Printed: VL2 and VL3 lookups/s for each size, the ratio to the ceiling's rate, the latency
(p50/p99) with one request in flight, and the goals: VL2 at least 25% of the ceiling; the 1M
rate within 10% of the 10k rate. Results go to bench/results/svp_lookups.json.

    python -m bench.svp_lookups [--quick] [--connections 2] [--window 64] [--duration 4]
    python -m bench.svp_lookups --micro [--quick]   # the lookup lane alone, in-process
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LoadSpec,
    ServerProcess,
    exchange_one,
    latency_one_in_flight,
    print_table,
    run_pipelined,
    start_ready_process,
    write_results,
)

CACHE_DIR = Path(tempfile.gettempdir()) / "portolan-bench"
CN_COUNT = 100
VNET_BASE = 5000
VNICS_PER_VNET = 50_000  # a /16 worth of addresses per vnet
FRAMES_PER_KIND = 4096
VL2_ACK_SIZE = 16 + 20
VL3_ACK_SIZE = 16 + 28


# --------------------------------------------------------------------------------------------
# The data set: VNIC i has MAC 02:00:<i>, IP 10.<hi>.<lo> in vnet VNET_BASE + i // 50000


def vnic_mac(i: int) -> bytes:
    return (0x020000000000 | i).to_bytes(6, "big")


def vnic_ip(i: int) -> str:
    j = i % VNICS_PER_VNET + 1
    return f"10.{j >> 16}.{(j >> 8) & 255}.{j & 255}"


def vnic_vnet(i: int) -> int:
    return VNET_BASE + i // VNICS_PER_VNET


def cn_uuid(c: int) -> str:
    return f"00000000-0000-4000-8000-{c:012x}"


def cn_ip(c: int) -> str:
    return f"192.168.{c // 250}.{c % 250 + 1}"


def build_store(n: int) -> str:
    """A SQLite store with n VNICs (cached); returns its URL."""
    from portolan.model import ComputeNode, Vnic
    from portolan.store import SCHEMA_VERSION, open_store

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"svp-lookups-{n}-schema{SCHEMA_VERSION}.db"
    url = f"sqlite:{path}"
    if path.exists():
        return url
    partial = path.with_suffix(".partial")
    for leftover in CACHE_DIR.glob(partial.name + "*"):
        leftover.unlink()
    started = time.perf_counter()
    print(f"building a store with {n:,} VNICs (cached in {CACHE_DIR}) ...", flush=True)
    store = open_store(f"sqlite:{partial}")
    try:
        with store.transaction() as tx:
            version = tx.next_version()
            for c in range(CN_COUNT):
                tx.insert_cn(ComputeNode(cn_uuid(c), cn_ip(c), 4789, version))
            tx.insert_vnics(
                Vnic(
                    mac=vnic_mac(i),
                    ip=vnic_ip(i),
                    vnet_id=vnic_vnet(i),
                    vlan_id=0,
                    cn_uuid=cn_uuid(i % CN_COUNT),
                    version=version,
                )
                for i in range(n)
            )
    finally:
        store.close()
    partial.rename(path)
    print(f"  built in {time.perf_counter() - started:.1f}s", flush=True)
    return url


def request_frames(n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """VL2 and VL3 request frames for random existing VNICs (ids as varpd writes them)."""
    from protocol.addr import ip_to_wire
    from protocol.svp import VL2Request, VL3Request, VL3Type

    rng = random.Random(seed)
    picks = [rng.randrange(n) for _ in range(FRAMES_PER_KIND)]
    vl2 = [
        VL2Request(
            ((k + 1) & 0xFFFFFFFF).to_bytes(4, "little")[0] << 24 | k, vnic_mac(i), vnic_vnet(i)
        ).encode()
        for k, i in enumerate(picks)
    ]
    vl3 = [
        VL3Request(k + 1, ip_to_wire(vnic_ip(i)), VL3Type.IP, vnic_vnet(i)).encode()
        for k, i in enumerate(picks)
    ]
    return vl2, vl3


# --------------------------------------------------------------------------------------------
# The ceiling server


async def _ceiling_connection(stream: Any, reply: bytes) -> None:
    import trio

    buf = b""
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            off = 0
            n = 0
            have = len(buf)
            while have - off >= 16:
                end = off + 16 + int.from_bytes(buf[off + 4 : off + 8], "big")
                if end > have:
                    break
                off = end
                n += 1
            buf = buf[off:]
            if n:
                await stream.send_all(reply * n)
    except trio.BrokenResourceError:
        return


def ceiling_server_main() -> None:
    import trio

    from protocol.addr import ip_to_wire
    from protocol.svp import VL2Ack

    reply = VL2Ack(1, 0, 4789, ip_to_wire("192.168.0.1")).encode()

    async def main() -> None:
        async def handler(stream: Any) -> None:
            await _ceiling_connection(stream, reply)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            port = listeners[0].socket.getsockname()[1]
            print(f"READY svp=127.0.0.1:{port}", flush=True)

    trio.run(main)


# --------------------------------------------------------------------------------------------
# Runs


def _start_portolan(store_url: str) -> ServerProcess:
    return start_ready_process(
        [
            sys.executable,
            "-m",
            "portolan.cli.main",
            "serve",
            "--store",
            store_url,
            "--svp-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--reload-interval",
            "0",
        ],
        timeout=900,
    )


def _measure(address: tuple[str, int], frames: list[bytes], reply_size: int, args: Any) -> float:
    spec = LoadSpec(
        frames=frames,
        reply_size=reply_size,
        connections=args.connections,
        window=args.window,
        warmup=args.warmup,
        duration=args.duration,
    )
    # Best of `repeat`: other load on the machine only ever makes a run slower.
    return max(run_pipelined(address, spec)["rate"] for _ in range(args.repeat))


def _check_found(address: tuple[str, int], vl2: bytes, vl3: bytes) -> None:
    from protocol.svp import Status, decode_frame

    for frame in (vl2, vl3):
        reply = decode_frame(exchange_one(address, frame))
        if reply.status != Status.OK:
            raise RuntimeError(f"benchmark request not found by the server: {reply!r}")


# --------------------------------------------------------------------------------------------
# Micro-benchmark: the server's lookup lane in-process, no sockets (``--micro``)


def micro(sizes: list[int], rounds: int = 25) -> dict[str, Any]:
    """ns per request of ``SvpServer._lookup_lane`` (header + CRC check, lookup, reply) over
    batches of 64 VL2 / VL3 frames, for random existing VNICs: the bench's 4096 cycled
    requests and 200k distinct ones. Best of ``rounds`` passes (4096 frames) or of 3 passes
    (200k): the machine's other load only ever adds."""
    import gc

    from portolan.index import LookupIndex
    from portolan.model import ComputeNode
    from portolan.store import Snapshot
    from portolan.svp_server import SvpServer

    class _Dir:
        index: Any = None

    out: dict[str, Any] = {}
    for n in sizes:
        snap = Snapshot(
            version=1,
            cns=[ComputeNode(cn_uuid(c), cn_ip(c), 4789, 1) for c in range(CN_COUNT)],
            vnics=[
                (
                    int.from_bytes(vnic_mac(i), "big"),
                    vnic_ip(i),
                    vnic_vnet(i),
                    cn_uuid(i % CN_COUNT),
                )
                for i in range(n)
            ],
        )
        directory = _Dir()
        directory.index = LookupIndex()
        started = time.perf_counter()
        directory.index.load(snap)
        row: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 2)}
        del snap
        gc.collect()
        lane = SvpServer(directory)._lookup_lane
        for label, count, passes in (("4096", FRAMES_PER_KIND, rounds), ("200k", 200_000, 3)):
            saved, globals()["FRAMES_PER_KIND"] = FRAMES_PER_KIND, count
            try:
                vl2, vl3 = request_frames(n, seed=n)
            finally:
                globals()["FRAMES_PER_KIND"] = saved
            for kind, frames in (("vl2", vl2), ("vl3", vl3)):
                batches = [b"".join(frames[i : i + 64]) for i in range(0, count, 64)]
                best = float("inf")
                for _ in range(passes):
                    t0 = time.perf_counter()
                    for data in batches:
                        lane(data, 0, [])
                    best = min(best, (time.perf_counter() - t0) / count)
                row[f"{kind}_{label}_ns"] = round(best * 1e9)
        out[str(n)] = row
        del directory
        gc.collect()
    return out


def run(quick: bool, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Run the benchmark; return (and write) the results document."""
    if args is None:
        args = parse_args(["--quick"] if quick else [])
    sizes = [1_000, 10_000] if quick else [10_000, 1_000_000]
    samples = 500 if quick else 5000
    results: dict[str, Any] = {
        "quick": quick,
        "connections": args.connections,
        "window": args.window,
        "duration_s": args.duration,
        "repeat": args.repeat,
        "sizes": {},
    }
    vl2_frames, vl3_frames = request_frames(min(sizes), seed=1)

    ceiling = start_ready_process([sys.executable, "-m", "bench.svp_lookups", "--ceiling-server"])
    try:
        addr = ceiling.address("svp")
        ceiling_rate = _measure(addr, vl2_frames, VL2_ACK_SIZE, args)
        ceiling_lat = latency_one_in_flight(addr, vl2_frames, VL2_ACK_SIZE, samples)
    finally:
        ceiling.stop()
    results["ceiling"] = {"rate": ceiling_rate, **ceiling_lat}

    for n in sizes:
        url = build_store(n)
        vl2_frames, vl3_frames = request_frames(n, seed=n)
        started = time.perf_counter()
        server = _start_portolan(url)
        startup = time.perf_counter() - started
        try:
            addr = server.address("svp")
            _check_found(addr, vl2_frames[0], vl3_frames[0])
            vl2_rate = _measure(addr, vl2_frames, VL2_ACK_SIZE, args)
            vl3_rate = _measure(addr, vl3_frames, VL3_ACK_SIZE, args)
            lat = latency_one_in_flight(addr, vl2_frames, VL2_ACK_SIZE, samples)
        finally:
            server.stop()
        results["sizes"][str(n)] = {
            "vnics": n,
            "startup_s": startup,
            "vl2_rate": vl2_rate,
            "vl3_rate": vl3_rate,
            "vl2_ratio": vl2_rate / ceiling_rate,
            "vl3_ratio": vl3_rate / ceiling_rate,
            **{f"vl2_{k}": v for k, v in lat.items()},
        }

    small, large = (results["sizes"][str(n)] for n in sizes)
    results["goals"] = {
        "vl2_ratio_min": 0.25,
        "vl2_ratio_met": all(s["vl2_ratio"] >= 0.25 for s in results["sizes"].values()),
        "large_vs_small": large["vl2_rate"] / small["vl2_rate"],
        "large_within_10pct_met": large["vl2_rate"] >= 0.9 * small["vl2_rate"],
    }
    _print(results, sizes)
    path = write_results("svp_lookups", results)
    print(f"\nresults written to {os.path.relpath(path)}")
    return results


def _print(results: dict[str, Any], sizes: list[int]) -> None:
    c = results["ceiling"]
    print(
        f"\nSVP lookups: {results['connections']} connections x window {results['window']}, "
        f"{results['duration_s']:g}s per run"
    )
    rows: list[list[Any]] = [
        ["ceiling (fixed reply)", "-", c["rate"], "-", "1.00", "-", c["p50_us"], c["p99_us"]]
    ]
    for n in sizes:
        s = results["sizes"][str(n)]
        rows.append(
            [
                f"portolan {n:,} VNICs",
                f"{s['startup_s']:.1f}",
                s["vl2_rate"],
                s["vl3_rate"],
                f"{s['vl2_ratio']:.2f}",
                f"{s['vl3_ratio']:.2f}",
                s["vl2_p50_us"],
                s["vl2_p99_us"],
            ]
        )
    print_table(
        ["server", "start s", "VL2/s", "VL3/s", "VL2/ceil", "VL3/ceil", "p50 us", "p99 us"], rows
    )
    g = results["goals"]
    print(
        f"\ngoal VL2 >= 25% of ceiling: {'met' if g['vl2_ratio_met'] else 'NOT met'}; "
        f"{sizes[1]:,} vs {sizes[0]:,} VNICs VL2 rate ratio {g['large_vs_small']:.2f} "
        f"(goal >= 0.90: {'met' if g['large_within_10pct_met'] else 'NOT met'})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.svp_lookups",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small data and short runs (< 30 s)")
    p.add_argument("--connections", type=int, default=2, help="client connections (processes)")
    p.add_argument("--window", type=int, default=64, help="requests in flight per connection")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per measurement, the best counts (default 3, quick 1)",
    )
    p.add_argument(
        "--micro",
        action="store_true",
        help="only the in-process lookup lane micro-benchmark (ns per request, 10k vs 1M)",
    )
    p.add_argument("--ceiling-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 1.5 if args.quick else 4.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ceiling_server:
        ceiling_server_main()
        return 0
    if args.micro:
        sizes = [1_000, 10_000] if args.quick else [10_000, 1_000_000]
        rows = micro(sizes)
        print_table(
            ["VNICs", *next(iter(rows.values()))],
            [[f"{int(n):,}", *row.values()] for n, row in rows.items()],
        )
        return 0
    run(args.quick, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
