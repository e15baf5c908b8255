"""Replacing a VNIC's policy 100 times under traffic never opens it, even for a moment.

Two policies alternate. Each rewrites the VNIC's inbound chain (different port ranges) and
a peer set (a /24 against a /16): every transaction flushes and refills a chain and a set.
Three kinds of packet stream in from the uplink meanwhile, each a new UDP flow (no state):

- allowed by both policies: must always arrive (a half-built chain would drop it);
- allowed by one: may or may not arrive;
- allowed by neither: must never arrive (a flushed, not yet refilled chain or set would
  let it through if the update were not atomic).
"""

from __future__ import annotations

import threading
import time

import pytest

from protocol.fwpolicy import from_json
from varpd.firewall.kernel import KernelFirewall

from .gen import Flow, new_frames
from .lab import UPLINK_MAC

pytestmark = pytest.mark.linux

ME = "10.9.0.1"


def _ip_checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def make_policy(mac: str, generation: int, ports: list[list[int]], peers: list[str]):
    return from_json(
        {
            "version": 1,
            "cn_uuid": "cn",
            "generation": generation,
            "vnics": {
                mac: {
                    "ips": [ME],
                    "vnet_id": 1,
                    "rules": [
                        {
                            "uuid": "ports",
                            "direction": "in",
                            "action": "allow",
                            "priority": 0,
                            "protocol": "udp",
                            "ports": ports,
                            "peers": peers,
                        },
                        {
                            "uuid": "block",
                            "direction": "in",
                            "action": "block",
                            "priority": 1,
                            "protocol": "udp",
                            "ports": [[1300, 1399]],
                            "peers": "any",
                        },
                    ],
                }
            },
        }
    )


def test_policy_replaced_100_times_under_traffic(kernel_lab):
    lab = kernel_lab
    mac = lab.macs[0]
    a = ([[1000, 1999]], ["10.8.1.0/24"])
    b = ([[1500, 2500]], ["10.8.0.0/16"])
    kinds = {
        # (source, port): "both" | "one" | "none"
        ("10.8.1.5", 1700): "both",
        ("10.8.1.5", 1200): "one",  # a only
        ("10.8.2.5", 1700): "one",  # b only (peer set)
        ("10.8.1.5", 3000): "none",
        ("10.8.2.5", 1200): "none",
        ("10.8.1.5", 1350): "none",  # the priority-1 block in both
        ("10.8.9.5", 2400): "one",  # b only
        ("10.9.9.9", 1700): "none",  # in no peer set
    }
    # flow cuts are not what this test is about (and each would judge thousands of flows)
    kfw = KernelFirewall(table="kfwatom", netns=lab.nsb, cut_flows=False)
    kfw.set_ports({mac: "v0"})
    kfw.apply(make_policy(mac, 1, *a))
    sent: dict[int, str] = {}
    stop = threading.Event()

    combos = list(kinds.items())
    templates = []
    for (src, port), kind in combos:
        flow = Flow("up0", "v0", UPLINK_MAC, mac, 4, "udp", src, ME, 1, port, tag=1)
        frame = bytearray(new_frames(flow)[0])
        frame[40:42] = b"\0\0"  # no UDP checksum (IPv4): the source port can be patched
        templates.append((frame, kind))

    def sender() -> None:
        tag = 1
        while not stop.is_set() and tag < 60000:
            frame, kind = templates[tag % len(templates)]
            frame[18:20] = tag.to_bytes(2, "big")  # IPv4 id: the tag
            frame[34:36] = (10000 + tag).to_bytes(2, "big")  # a new flow each time
            frame[24:26] = b"\0\0"
            frame[24:26] = _ip_checksum(bytes(frame[14:34])).to_bytes(2, "big")
            lab.send("up0", bytes(frame))
            sent[tag] = kind
            tag += 1
            if tag % 8 == 0:
                time.sleep(0.001)

    arrived: set[int] = set()

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        for i in range(100):
            ports, peers = b if i % 2 == 0 else a
            kfw.apply(make_policy(mac, i + 2, ports, peers))
            arrived |= {t for _, t in lab.collect(settle=0.0, quiet=0.001, limit=0.01)["v0"]}
    finally:
        stop.set()
        thread.join()
        time.sleep(0.05)
        arrived |= {tag for fam, tag in lab.collect()["v0"]}
        kfw.remove()
    assert kfw.counters["transactions"] >= 101 and kfw.counters["refused"] == 0
    forbidden = sorted(t for t in arrived if sent.get(t) == "none")
    assert not forbidden, f"{len(forbidden)} packets no policy allows arrived: {forbidden[:10]}"
    both = [t for t, k in sent.items() if k == "both"]
    missing = [t for t in both if t not in arrived]
    assert len(both) > 200, len(both)
    assert not missing, f"{len(missing)} of {len(both)} always-allowed packets were dropped"
