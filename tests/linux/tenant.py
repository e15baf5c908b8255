"""Traffic helpers run *inside* a tenant namespace (``ip netns exec NS python3 tenant.py``).

No iperf binary: TCP over sockets, ARP over AF_PACKET (ICMP echo is `lab.probe`'s, run by
`lab.netns.ping`).

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
