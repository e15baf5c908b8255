"""Firewall data-path benchmark: packets per second through one VNIC's ``check()`` (and through
the shim's local-switching delivery path) with 0, 10, 1,000 and 10,000 rules in the system.

Goal (the issue): the per-packet cost must not grow with the number of rules in the system:
pps(10,000 rules) >= pps(10 rules) / 1.2 on the new-flow workload, i.e. ratio >= 0.83.

The policy ("the system"): one compute node with 100 firewall-enabled VNICs. The measured VNIC
gets a realistic base set (up to 8 rules: ssh from an admin /24, http and https from anywhere,
ping, postgres from an app subnet, dns/udp from a resolver, an outbound smtp block, a
priority-1 block of a bad /16 on http). Of the remaining rules, 2% also land on the measured
VNIC (random ports 1024..65535, a fifth of them ranges, random /32 or /24 peers, priority 0..3,
either direction and action); the other 98% are spread over the other 99 VNICs. So with 10,000
rules in the system the measured VNIC has about 208 rules, the CN policy 10,000.

Workloads over one VNIC (frames pre-built, each workload a list of distinct frames):
- ``new``: every packet opens a new flow (distinct ports): 40% inbound SYNs to ssh/http/https
  from assorted sources (some allowed, some blocked), 20% inbound SYNs to random ports
  (blocked), 40% outbound SYNs to port 443 (default pass, tracked). Every packet consults the
  rules.
- ``mixed``: the same frames again on the now-warm firewall: tracked flows hit conntrack,
  blocked packets go through the rules again.
- ``shim``: the inbound half of ``new`` sent from a local VNIC to the measured one through the
  shim (``Vnic.transmit`` -> local switch -> ``Vnic.to_guest`` -> filter -> port); ``shim
  unfiltered`` is the same path with no filter, for scale.

Run: ``python -m bench.firewall [--quick]``; writes bench/results/firewall.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections.abc import Callable
from typing import Any

from protocol.fwpolicy import Policy, from_json

RULE_COUNTS = (0, 10, 1_000, 10_000)
VNICS = 100
SHARE = 0.02
GOAL_RATIO = 1 / 1.2

BENCH_MAC = "02:00:00:00:00:01"
PEER_MAC = "02:00:00:00:00:99"
ME = "10.0.0.1"

try:
    from bench.common import print_table, write_results
except ImportError:  # pragma: no cover - bench/common.py is another engineer's
    import json
    from pathlib import Path

    def print_table(headers: Any, rows: Any, *, file: Any = None) -> None:
        print("  ".join(headers))
        for row in rows:
            print("  ".join(str(v) for v in row))

    def write_results(name: str, data: dict[str, Any]) -> Path:
        path = Path(__file__).resolve().parent / "results" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": name, **data}, indent=2) + "\n")
        return path


# --------------------------------------------------------------------------- policy


def _rule(
    uuid: str,
    direction: str,
    action: str,
    protocol: str,
    *,
    ports: Any = None,
    types: Any = None,
    peers: Any = "any",
    priority: int = 0,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "uuid": uuid,
        "direction": direction,
        "action": action,
        "priority": priority,
        "protocol": protocol,
        "peers": peers,
    }
    if protocol in ("tcp", "udp"):
        r["ports"] = ports if ports is not None else "all"
    elif protocol in ("icmp", "icmp6"):
        r["types"] = types if types is not None else "all"
    return r


BASE_RULES = [
    _rule("base-ssh", "in", "allow", "tcp", ports=[[22, 22]], peers=["192.0.2.0/24"]),
    _rule("base-http", "in", "allow", "tcp", ports=[[80, 80], [443, 443]]),
    _rule("base-ping", "in", "allow", "icmp", types=[[8, 0]]),
    _rule("base-pg", "in", "allow", "tcp", ports=[[5432, 5432]], peers=["10.1.0.0/16"]),
    _rule("base-dns", "in", "allow", "udp", ports=[[53, 53]], peers=["10.0.0.53/32"]),
    _rule("base-smtp", "out", "block", "tcp", ports=[[25, 25]]),
    _rule("base-bad", "in", "block", "tcp", ports=[[80, 80]], peers=["203.0.0.0/16"], priority=1),
    _rule("base-v6", "in", "allow", "tcp", ports=[[443, 443]], peers=["2001:db8::/32"]),
]


def _random_rule(rng: random.Random, uuid: str) -> dict[str, Any]:
    protocol = rng.choice(("tcp", "tcp", "tcp", "udp"))
    lo = rng.randint(1024, 65000)
    ports = [[lo, lo + rng.randint(1, 500)]] if rng.random() < 0.2 else [[lo, lo]]
    if rng.random() < 0.5:
        peers = [f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}/32"]
    else:
        peers = [f"10.{rng.randint(2, 250)}.{rng.randint(0, 255)}.0/24"]
    return _rule(
        uuid,
        rng.choice(("in", "in", "out")),
        rng.choice(("allow", "allow", "block")),
        protocol,
        ports=ports,
        peers=peers,
        priority=rng.choice((0, 0, 0, 1, 2, 3)),
    )


def build_policy(total_rules: int, seed: int = 1) -> Policy:
    """A CN policy with ``total_rules`` rules over 100 VNICs (see the module docstring)."""
    rng = random.Random(seed)
    macs = [BENCH_MAC] + [f"02:00:00:00:01:{i:02x}" for i in range(1, VNICS)]
    rules: dict[str, list[dict[str, Any]]] = {m: [] for m in macs}
    base = min(total_rules, len(BASE_RULES))
    rules[BENCH_MAC].extend(BASE_RULES[:base])
    for i in range(total_rules - base):
        target = BENCH_MAC if rng.random() < SHARE else rng.choice(macs[1:])
        rules[target].append(_random_rule(rng, f"r-{i}"))
    doc = {
        "version": 1,
        "cn_uuid": "bench-cn",
        "generation": total_rules,
        "vnics": {
            m: {"ips": [ME if m == BENCH_MAC else f"10.0.1.{i}"], "vnet_id": 1, "rules": rules[m]}
            for i, m in enumerate(macs)
        },
    }
    return from_json(doc)


# --------------------------------------------------------------------------- frames


def _templates() -> dict[str, bytes]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    inbound = (
        Ether(src=PEER_MAC, dst=BENCH_MAC) / IP(src="192.0.2.10", dst=ME) / TCP(dport=22, flags="S")
    )
    outbound = (
        Ether(src=BENCH_MAC, dst=PEER_MAC)
        / IP(src=ME, dst="198.51.100.1")
        / TCP(dport=443, flags="S")
    )
    return {"in": bytes(inbound), "out": bytes(outbound)}


def _patch(template: bytes, src: str, dst: str, sport: int, dport: int) -> bytes:
    f = bytearray(template)
    f[26:30] = bytes(int(x) for x in src.split("."))
    f[30:34] = bytes(int(x) for x in dst.split("."))
    f[34:36] = sport.to_bytes(2, "big")
    f[36:38] = dport.to_bytes(2, "big")
    return bytes(f)


def build_frames(n: int, seed: int = 2) -> tuple[list[tuple[bytes, int]], list[bytes]]:
    """(the ``new`` workload as (frame, direction), its inbound frames for the shim path)."""
    rng = random.Random(seed)
    t = _templates()
    sources = ["192.0.2.10", "192.0.2.77", "203.0.113.5", "203.0.7.7", "10.1.2.3", "172.20.1.1"]
    frames: list[tuple[bytes, int]] = []
    inbound: list[bytes] = []
    for i in range(n):
        sport = 1024 + i % 60000
        r = rng.random()
        if r < 0.4:
            f = _patch(t["in"], rng.choice(sources), ME, sport, rng.choice((22, 80, 443)))
            frames.append((f, 1))
            inbound.append(f)
        elif r < 0.6:
            f = _patch(t["in"], rng.choice(sources), ME, sport, rng.randint(1024, 65535))
            frames.append((f, 1))
            inbound.append(f)
        else:
            remote = f"198.51.100.{1 + i % 250}"
            frames.append((_patch(t["out"], ME, remote, sport, 443), 2))
    return frames, inbound


# --------------------------------------------------------------------------- measuring


def _pps(run: Callable[[], int], repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        # Start every run from a collected heap: otherwise the first collections after a big
        # policy was built (tens of thousands of young objects) are charged to the data path.
        gc.collect()
        t0 = time.perf_counter()
        n = run()
        dt = time.perf_counter() - t0
        best = max(best, n / dt)
    return best


class _Setup:
    """One rule count: the applied policy and the measured VNIC's compiled rules."""

    def __init__(self, total: int, n_frames: int) -> None:
        from varpd.firewall import FirewallTable

        self.total = total
        self.policy = build_policy(total)
        table = FirewallTable()
        t0 = time.perf_counter()
        table.apply(self.policy)
        self.apply_ms = (time.perf_counter() - t0) * 1000
        fw = table.get(BENCH_MAC)
        assert fw is not None
        self.compiled = fw.compiled
        self.max_flows = n_frames + 10
        self.best = {"new_pps": 0.0, "mixed_pps": 0.0, "shim_pps": 0.0}
        self.verdicts: dict[str, int] = {}

    def fresh(self) -> Any:
        from varpd.firewall import VnicFirewall

        return VnicFirewall(BENCH_MAC, [ME], self.compiled, max_flows=self.max_flows)

    def measure_once(self, frames: list[tuple[bytes, int]], inbound: list[bytes]) -> None:
        holder: dict[str, Any] = {}

        def new_flows() -> int:
            fw = holder["fw"] = self.fresh()
            check = fw.check
            for frame, direction in frames:
                check(frame, direction)
            return len(frames)

        def mixed() -> int:
            check = holder["fw"].check
            for frame, direction in frames:
                check(frame, direction)
            return len(frames)

        b = self.best
        b["new_pps"] = max(b["new_pps"], _pps(new_flows, 1))
        b["mixed_pps"] = max(b["mixed_pps"], _pps(mixed, 1))
        self.verdicts = {k: v for k, v in holder["fw"].counters.items() if v}
        holder.clear()
        b["shim_pps"] = max(b["shim_pps"], _shim_pps(inbound, self.fresh, 1))

    def result(self) -> dict[str, Any]:
        return {
            "system_rules": sum(len(v.rules) for v in self.policy.vnics.values()),
            "vnic_rules": len(self.compiled.rules),
            "apply_ms": self.apply_ms,
            **self.best,
            "verdicts_per_pass": self.verdicts,
        }


def _shim_pps(inbound: list[bytes], make: Callable[[], Any] | None, repeat: int) -> float:
    """Local switching PEER -> BENCH through the shim with ``make()`` as BENCH's filter."""
    from protocol.addr import parse_mac
    from varpd.shim import MemoryUnderlay, OverlayDriver

    driver = OverlayDriver(MemoryUnderlay())
    driver.create_device("bench0", 1)
    peer = driver.add_vnic("bench0", parse_mac(PEER_MAC))
    target = driver.add_vnic("bench0", parse_mac(BENCH_MAC))
    send = peer.port.send_nowait
    drain = target.port.received

    def run() -> int:
        target.filter = make() if make is not None else None
        for i, frame in enumerate(inbound):
            send(frame)
            if i & 1023 == 1023:
                drain()
        drain()
        return len(inbound)

    return _pps(run, repeat)


def run(quick: bool = False) -> dict[str, Any]:
    n_frames = 5_000 if quick else 40_000
    repeat = 1 if quick else 5
    frames, inbound = build_frames(n_frames)
    setups = [_Setup(total, n_frames) for total in RULE_COUNTS]
    # Round-robin over the rule counts, best of `repeat`: a busy machine slows every count
    # alike instead of whichever happened to run during the disturbance.
    for _ in range(repeat):
        for setup in setups:
            setup.measure_once(frames, inbound)
    results: dict[str, Any] = {"frames": n_frames, "goal_ratio": GOAL_RATIO, "by_rules": {}}
    rows = []
    for setup in setups:
        m = results["by_rules"][str(setup.total)] = setup.result()
        rows.append(
            [
                setup.total,
                m["vnic_rules"],
                m["apply_ms"],
                m["new_pps"],
                m["mixed_pps"],
                m["shim_pps"],
            ]
        )
    results["shim_unfiltered_pps"] = _shim_pps(inbound, None, repeat)
    by = results["by_rules"]
    ratio = by["10000"]["new_pps"] / by["10"]["new_pps"]
    results["ratio_10k_over_10"] = ratio
    results["ratio_10k_over_10_mixed"] = by["10000"]["mixed_pps"] / by["10"]["mixed_pps"]
    results["ratio_10k_over_10_shim"] = by["10000"]["shim_pps"] / by["10"]["shim_pps"]
    results["goal_met"] = ratio >= GOAL_RATIO
    print_table(
        ["system rules", "vnic rules", "apply ms", "new flows pps", "mixed pps", "shim pps"], rows
    )
    print(f"shim path without a filter: {results['shim_unfiltered_pps']:,.0f} pps")
    print(
        f"pps(10k)/pps(10): new {ratio:.3f}, mixed {results['ratio_10k_over_10_mixed']:.3f}, "
        f"shim {results['ratio_10k_over_10_shim']:.3f} (goal >= {GOAL_RATIO:.3f}: "
        f"{'met' if results['goal_met'] else 'NOT met'})"
    )
    results["quick"] = quick
    path = write_results("firewall", results)
    print(f"\nresults written to {os.path.relpath(path)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that only shows it works")
    args = parser.parse_args(argv)
    run(quick=args.quick)


if __name__ == "__main__":
    main()
