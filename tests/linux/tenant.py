"""Traffic helpers run *inside* a tenant namespace (``ip netns exec NS python3 tenant.py``).

No ping/iperf binaries: ICMP echo over a raw socket, TCP over sockets, ARP over AF_PACKET.

    tenant.py ping DST TIMEOUT            one echo reply within TIMEOUT s -> exit 0
    tenant.py ping6 DST TIMEOUT           the same over ICMPv6
    tenant.py tcp-server PORT             accept one connection, echo everything, exit
    tenant.py tcp-client DST PORT BYTES [PAUSE]   send BYTES (PAUSE s between 64 KiB
                                          blocks), expect them back; prints MB/s
    tenant.py arp-hammer IFNAME IP RATE SECONDS   ARP requests for IP at RATE per second
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(dst: str, timeout: float, v6: bool = False) -> int:
    ident = os.getpid() & 0xFFFF
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        kind, reply = 128, 129
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        kind, reply = 8, 0
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        payload = b"portolan-linux" + struct.pack("!d", time.time())
        header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
        csum = 0 if v6 else _checksum(header + payload)  # the kernel fills ICMPv6's
        sock.sendto(struct.pack("!BBHHH", kind, 0, csum, ident, seq) + payload, (dst, 0))
        until = min(deadline, time.monotonic() + 0.2)
        while time.monotonic() < until:
            sock.settimeout(max(0.001, until - time.monotonic()))
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                break
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            if len(icmp) >= 8 and icmp[0] == reply:
                _, _, _, rid, _ = struct.unpack("!BBHHH", icmp[:8])
                if rid == ident:
                    print(f"reply from {dst} after {seq} request(s)")
                    return 0
    print(f"no reply from {dst} within {timeout}s")
    return 1


def tcp_server(port: int) -> int:
    srv = socket.socket(socket.AF_INET6 if ":" in os.environ.get("BIND", "") else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((os.environ.get("BIND", "0.0.0.0"), port))
    srv.listen(1)
    print("listening", flush=True)
    srv.settimeout(60)
    conn, _ = srv.accept()
    conn.settimeout(60)
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.close()
    return 0


def tcp_client(dst: str, port: int, nbytes: int, pause: float = 0.0) -> int:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    deadline = time.monotonic() + 20
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect((dst, port))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    block = os.urandom(65536)
    sent = received = 0
    start = time.monotonic()
    sock.settimeout(20)
    import hashlib

    out_hash, in_hash = hashlib.sha256(), hashlib.sha256()
    while received < nbytes:
        if sent < nbytes:
            chunk = block[: min(len(block), nbytes - sent)]
            sock.sendall(chunk)
            out_hash.update(chunk)
            sent += len(chunk)
            if pause:
                time.sleep(pause)
        data = sock.recv(1 << 20)
        if not data:
            break
        in_hash.update(data)
        received += len(data)
    elapsed = time.monotonic() - start
    sock.close()
    ok = received == nbytes and out_hash.digest() == in_hash.digest()
    print(
        f"{'ok' if ok else 'MISMATCH'} {received} bytes echoed, {nbytes / elapsed / 1e6:.1f} MB/s"
    )
    return 0 if ok else 1


def arp_hammer(ifname: str, ip: str, rate: float, seconds: float) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((ifname, 0))
    mac = sock.getsockname()[4]
    with open(f"/sys/class/net/{ifname}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    frame = (
        b"\xff" * 6
        + mac
        + b"\x08\x06"
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
        + mac
        + socket.inet_aton("0.0.0.0")
        + b"\x00" * 6
        + socket.inet_aton(ip)
    )
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.send(frame)
        count += 1
        time.sleep(1.0 / rate)
    print(f"sent {count} ARP requests")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd in ("ping", "ping6"):
        return ping(argv[1], float(argv[2]), v6=cmd == "ping6")
    if cmd == "tcp-server":
        return tcp_server(int(argv[1]))
    if cmd == "tcp-client":
        pause = float(argv[4]) if len(argv) > 4 else 0.0
        return tcp_client(argv[1], int(argv[2]), int(argv[3]), pause)
    if cmd == "arp-hammer":
        return arp_hammer(argv[1], argv[2], float(argv[3]), float(argv[4]))
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
