"""The differential runner: the same policies and packets through the Python engine and the
kernel (a bridge in a namespace with the compiled tables), verdicts compared.

Per policy: apply it to a fresh ``FirewallTable`` and to the ``KernelFirewall`` (incremental
on top of the previous policy: that path is exercised too), flush the namespace's conntrack,
then two phases, each sent as one batch and collected at the receivers:

1. the flows' first datagrams (all fragments of a datagram sent back to back);
2. the replies (for every flow with a remote end, and for local flows whose first datagram
   passed; see ``gen.py`` for why).

Engine verdict of a datagram: every fragment goes through the sender's firewall (OUT) and,
if it passes, the receiver's (IN); a VNIC not in the policy is not filtered. It is "pass"
when all fragments pass, "drop" when none does, "partial" otherwise (always a mismatch: the
kernel reassembles and judges a datagram once). Kernel verdict: its tag arrived at the
receiver's port or not.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from protocol.addr import parse_mac
from protocol.fwpolicy import Policy
from varpd.firewall.engine import IN, OUT, FirewallTable
from varpd.firewall.kernel import KernelFirewall

from .gen import Flow, new_frames, random_flow, random_policy, reply_flow, reply_frames
from .lab import Lab


@dataclass
class Mismatch:
    policy: Policy
    flow: Flow
    phase: str
    engine: str
    kernel: str

    def __str__(self) -> str:
        return (
            f"{self.phase} {self.flow.describe()}: engine {self.engine}, kernel {self.kernel}\n"
            f"policy: {json.dumps(self.policy.to_json(), indent=1)}"
        )


def engine_verdict(table: FirewallTable, flow: Flow, frames: list[bytes]) -> str:
    sender = table.get(parse_mac(flow.src_mac))
    receiver = table.get(parse_mac(flow.dst_mac))
    passed = 0
    for frame in frames:
        ok = sender is None or sender.check(frame, OUT)
        ok = ok and (receiver is None or receiver.check(frame, IN))
        passed += ok
    return "pass" if passed == len(frames) else "drop" if passed == 0 else "partial"


def run_policy(
    lab: Lab,
    kfw: KernelFirewall,
    policy: Policy,
    rng: random.Random,
    packets: int,
    tag0: int,
    tally: dict[str, int] | None = None,
) -> tuple[list[Mismatch], int]:
    """One policy, ``packets`` flows; returns the mismatches and how many datagrams."""
    table = FirewallTable()
    table.apply(policy)
    kfw.apply(policy)
    lab.conntrack_flush()
    lab.drain()
    flows = [
        random_flow(rng, lab.n, lab.macs, tag0 + i, 20000 + (tag0 + i) % 40000)
        for i in range(packets)
    ]
    mismatches: list[Mismatch] = []
    judged = 0

    def phase(name: str, batch: list[tuple[Flow, list[bytes]]]) -> dict[int, str]:
        nonlocal judged
        expected = {}
        for flow, frames in batch:
            expected[flow.tag] = engine_verdict(table, flow, frames)
            for frame in frames:
                lab.send(flow.src_port, frame)
        got = lab.collect()
        for flow, _ in batch:
            arrived = (flow.family, flow.tag) in got[flow.dst_port]
            kernel = "pass" if arrived else "drop"
            judged += 1
            if tally is not None:
                key = f"{name}_{kernel}{'_frag' if flow.frag else ''}"
                tally[key] = tally.get(key, 0) + 1
            if expected[flow.tag] != kernel:
                mismatches.append(Mismatch(policy, flow, name, expected[flow.tag], kernel))
        return expected

    first = phase("new", [(f, new_frames(f)) for f in flows])
    replies = []
    for i, f in enumerate(flows):
        local = f.src_port != "up0" and f.dst_port != "up0"
        if local and first[f.tag] != "pass":
            continue
        r = reply_flow(f, tag0 + packets + i)
        if r is not None:
            replies.append((r, reply_frames(r)))
    phase("reply", replies)
    return mismatches, judged


def run(
    lab: Lab, seed: int, policies: int, packets: int, table: str = "kfwdiff"
) -> tuple[list[Mismatch], int, dict[str, Any]]:
    """``policies`` random policies of ``packets`` flows each; (mismatches, datagrams, stats)."""
    rng = random.Random(seed)
    kfw = KernelFirewall(table=table, netns=lab.nsb)
    mismatches: list[Mismatch] = []
    total = 0
    tally: dict[str, int] = {}
    try:
        for n in range(policies):
            policy = random_policy(rng, lab.n, lab.macs, n + 1)
            if n == 0:
                kfw.set_ports(dict(zip(lab.macs, lab.ports, strict=True)))
            tag0 = 1 + (n * 3 * packets) % 60000
            found, judged = run_policy(lab, kfw, policy, rng, packets, tag0, tally)
            mismatches += found
            total += judged
    finally:
        stats = {**kfw.status(), "verdicts": tally}
        kfw.remove()
    return mismatches, total, stats
