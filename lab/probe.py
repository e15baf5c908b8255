"""An ICMP echo probe that needs no ``ping`` binary (a fresh machine has no iputils-ping).

`PROBE` is a small script run inside a namespace with this interpreter
(``ip netns exec NS python -c PROBE DST COUNT DEADLINE``): a raw ICMP or ICMPv6 socket sends
an echo request every 0.2 s, each with its own sequence number, until ``COUNT`` matching
replies are back or ``DEADLINE`` seconds have passed. It prints one summary line
(``N packets transmitted, M received (rtt min/max A/B ms)``) and exits 0 when enough replies
came, like ``ping -c COUNT -w DEADLINE``. `command` and `argv` build that command line; `lab.netns.ping`
(blocking) and the demo's `Shell` (trio) run it. Raw sockets need root, as namespaces do.
"""

from __future__ import annotations

import sys

PROBE = r"""
import os, socket, struct, sys, time
dst, count, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
v6 = ":" in dst
if v6:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    kind, answer = 128, 129
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    kind, answer = 8, 0

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

ident = os.getpid() & 0xFFFF
sent, seen, rtts = {}, set(), []
end = time.monotonic() + deadline
seq = 0
while len(seen) < count and time.monotonic() < end:
    seq += 1
    payload = b"portolan-probe" + bytes(42)
    head = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    csum = 0 if v6 else checksum(head + payload)  # the kernel fills in ICMPv6's
    try:
        sock.sendto(struct.pack("!BBHHH", kind, 0, csum, ident, seq) + payload, (dst, 0))
        sent[seq] = time.monotonic()
    except OSError as exc:  # no route yet, ...: like ping, keep trying until the deadline
        print("send failed: %s" % exc)
    until = min(end, time.monotonic() + 0.2)
    while len(seen) < count and time.monotonic() < until:
        sock.settimeout(max(0.001, until - time.monotonic()))
        try:
            data = sock.recv(2048)
        except (TimeoutError, socket.timeout):
            break
        icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
        if len(icmp) < 8 or icmp[0] != answer:
            continue
        _, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
        if rid == ident and rseq in sent and rseq not in seen:
            seen.add(rseq)
            rtts.append((time.monotonic() - sent[rseq]) * 1e3)
print("%d packets transmitted, %d received (%s)" % (
    len(sent), len(seen),
    "rtt min/max %.3f/%.3f ms" % (min(rtts), max(rtts)) if rtts else "no reply"))
sys.exit(0 if len(seen) >= count else 1)
"""


def command(dst: str, count: int, deadline: float) -> list[str]:
    """The command line that runs `PROBE` (prefix it with ``ip netns exec NS``)."""
    return [sys.executable, "-c", PROBE, dst, str(count), str(deadline)]


def argv(ns: str, dst: str, count: int, deadline: float) -> list[str]:
    """The command line that runs `PROBE` in namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *command(dst, count, deadline)]
