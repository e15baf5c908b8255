"""``portolan lookup vl2|vl3``, ``portolan ping``, ``portolan log``: a small SVP client.

Blocking sockets, one connection per command, one request, one reply (checked: same id, the
matching ack op). For operators and scripts: answers print readably, or as JSON with
``--json``. Exit codes: 0 answered OK, 1 NOTFOUND / FATAL / no answer, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from portolan.cli import format_hostport, parse_hostport
from protocol.addr import V4_MAPPED_PREFIX, format_mac, ip_text, ip_to_wire, parse_mac
from protocol.svp import (
    Decoder,
    LogAck,
    LogRequest,
    LogVL2Entry,
    LogVL3Entry,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    VL3Type,
)

DEFAULT_SERVER = "127.0.0.1:1296"


class LookupFailed(Exception):
    """The exchange did not happen: connection refused, timeout, bad reply."""


def exchange(server: tuple[str, int], request: Any, *, timeout: float = 5.0) -> Message:
    """Send one request, return its reply (same id). Raises LookupFailed."""
    decoder = Decoder()
    try:
        with socket.create_connection(server, timeout=timeout) as sock:
            sock.sendall(request.encode())
            while True:
                data = sock.recv(65536)
                if not data:
                    raise LookupFailed("the server closed the connection without answering")
                decoder.receive_data(data)
                reply = decoder.next_message()
                if reply is not None:
                    break
    except ProtocolError as exc:
        raise LookupFailed(f"the server sent a malformed reply: {exc}") from None
    except TimeoutError:
        raise LookupFailed(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise LookupFailed(
            f"cannot talk to {format_hostport(*server)}: {exc.strerror or exc}"
        ) from None
    if reply.id != request.id:
        raise LookupFailed(f"reply id {reply.id:#x} does not match request id {request.id:#x}")
    return reply


def _status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return str(status)


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("PORTOLAN_SVP", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"SVP server (default {DEFAULT_SERVER})",
    )
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up after this long (default 5)",
    )
    p.add_argument(
        "--svp-version",
        type=int,
        choices=(1, 2),
        default=1,
        help="SVP version of the request (default 1)",
    )


def _bounded_int(text: str, hi: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= hi:
        raise argparse.ArgumentTypeError(f"{what} must be between 0 and {hi}, not {value}")
    return value


def _vnet_id(text: str) -> int:
    """A vnet id as SVP carries it (24 bits); out of range is a usage error (exit 2)."""
    return _bounded_int(text, (1 << 24) - 1, "a vnet id")


def _u32(text: str) -> int:
    return _bounded_int(text, (1 << 32) - 1, "the count")


def register(subparsers: Any) -> None:
    lookup = subparsers.add_parser(
        "lookup",
        help="ask an SVP server where a MAC or an IP lives",
        description="Ask an SVP server (portolan) a VL2 (MAC) or VL3 (IP) question.",
    )
    kinds = lookup.add_subparsers(dest="lookup_kind", metavar="KIND")
    vl2 = kinds.add_parser("vl2", help="which underlay host holds this MAC in this vnet?")
    vl2.add_argument("--mac", required=True, help="overlay MAC, e.g. 00:0a:95:9d:68:16")
    vl2.add_argument("--vnet", type=_vnet_id, required=True, help="virtual network id")
    _server_arg(vl2)
    vl2.set_defaults(func=run_vl2)
    vl3 = kinds.add_parser("vl3", help="which MAC and underlay host hold this IP in this vnet?")
    vl3.add_argument("--ip", required=True, help="overlay IP, e.g. 10.0.0.1")
    vl3.add_argument("--vnet", type=_vnet_id, required=True, help="virtual network id")
    _server_arg(vl3)
    vl3.set_defaults(func=run_vl3)
    lookup.set_defaults(func=lambda args: _usage(lookup))

    ping = subparsers.add_parser("ping", help="SVP PING an SVP server and time the PONG")
    _server_arg(ping)
    ping.set_defaults(func=run_ping)

    logp = subparsers.add_parser(
        "log",
        help="fetch a compute node's shootdown log over SVP (LOG_REQ; debugging)",
        description="Send LOG_REQ as the compute node with this underlay IP would and print "
        "the entries. Nothing is removed (no LOG_RM).",
    )
    logp.add_argument("--cn-ip", required=True, help="underlay IP of the compute node")
    logp.add_argument(
        "--count",
        type=_u32,
        default=1024,
        help="most bytes of log the client accepts (default 1024, as varpd)",
    )
    _server_arg(logp)
    logp.set_defaults(func=run_log)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _server(args: argparse.Namespace) -> tuple[str, int]:
    return parse_hostport(args.server, default_port=1296)


def _request_id() -> int:
    return int.from_bytes(os.urandom(4), "big")


def _fail(message: str) -> int:
    print(f"portolan: {message}", file=sys.stderr)
    return 1


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc) if args.json else text)


def _ask(args: argparse.Namespace, server: tuple[str, int], request: Any, ack: type) -> Any:
    """Send one request and return its reply of type ``ack``, or the exit code on failure."""
    try:
        reply = exchange(server, request, timeout=args.timeout)
    except LookupFailed as exc:
        return _fail(str(exc))
    if not isinstance(reply, ack):
        return _fail(f"expected {ack.OP.name}, got {reply.OP.name}")
    return reply


def run_vl2(args: argparse.Namespace) -> int:
    try:
        mac = parse_mac(args.mac)
        server = _server(args)
    except ValueError as exc:
        return _fail(str(exc)) + 1
    reply = _ask(args, server, VL2Request(_request_id(), mac, args.vnet, args.svp_version), VL2Ack)
    if isinstance(reply, int):
        return reply
    doc = {"mac": format_mac(mac), "vnet_id": args.vnet, "status": _status_name(reply.status)}
    if reply.status != Status.OK:
        if args.json:
            print(json.dumps(doc))
        return _fail(f"{format_mac(mac)} in vnet {args.vnet}: {_status_name(reply.status)}")
    doc.update(underlay_ip=ip_text(reply.addr), underlay_port=reply.port)
    _print(
        args,
        doc,
        f"{format_mac(mac)} vnet {args.vnet} -> {format_hostport(ip_text(reply.addr), reply.port)}",
    )
    return 0


def run_vl3(args: argparse.Namespace) -> int:
    try:
        ip16 = ip_to_wire(args.ip)
        server = _server(args)
    except ValueError as exc:
        return _fail(str(exc)) + 1
    ip_type = VL3Type.IP if ip16[:12] == V4_MAPPED_PREFIX else VL3Type.IPV6
    request = VL3Request(_request_id(), ip16, ip_type, args.vnet, args.svp_version)
    reply = _ask(args, server, request, VL3Ack)
    if isinstance(reply, int):
        return reply
    doc = {"ip": ip_text(ip16), "vnet_id": args.vnet, "status": _status_name(reply.status)}
    if reply.status != Status.OK:
        if args.json:
            print(json.dumps(doc))
        return _fail(f"{ip_text(ip16)} in vnet {args.vnet}: {_status_name(reply.status)}")
    doc.update(mac=format_mac(reply.mac), underlay_ip=ip_text(reply.addr), underlay_port=reply.port)
    _print(
        args,
        doc,
        f"{ip_text(ip16)} vnet {args.vnet} -> {format_mac(reply.mac)} at "
        f"{format_hostport(ip_text(reply.addr), reply.port)}",
    )
    return 0


def run_ping(args: argparse.Namespace) -> int:
    try:
        server = _server(args)
    except ValueError as exc:
        return _fail(str(exc)) + 1
    started = time.perf_counter()
    try:
        reply = exchange(server, Ping(_request_id(), args.svp_version), timeout=args.timeout)
    except LookupFailed as exc:
        return _fail(str(exc))
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not isinstance(reply, Pong):
        return _fail(f"expected PONG, got {reply.OP.name}")
    where = format_hostport(*server)
    _print(
        args,
        {"server": where, "version": reply.version, "ms": round(elapsed_ms, 3)},
        f"PONG from {where} (SVP v{reply.version}) in {elapsed_ms:.2f} ms",
    )
    return 0


def _entry_doc(entry: Any) -> dict[str, Any]:
    if isinstance(entry, LogVL2Entry):
        return {
            "type": "vl2",
            "id": entry.entry_id.hex(),
            "mac": format_mac(entry.mac),
            "vnet_id": entry.vnet_id,
        }
    if isinstance(entry, LogVL3Entry):
        return {
            "type": "vl3",
            "id": entry.entry_id.hex(),
            "ip": ip_text(entry.ip),
            "vlan": entry.vlan,
            "vnet_id": entry.vnet_id,
        }
    return {
        "type": "route",
        "id": entry.entry_id.hex(),
        "src_vnet_id": entry.src_vnet_id,
        "dst_vnet_id": entry.dst_vnet_id,
        "dc_id": entry.dc_id,
        "src_ip": ip_text(entry.src_ip),
        "dst_ip": ip_text(entry.dst_ip),
        "src_vlan": entry.src_vlan,
        "dst_vlan": entry.dst_vlan,
        "src_prefixlen": entry.src_prefixlen,
        "dst_prefixlen": entry.dst_prefixlen,
    }


def _why_log_failed(
    args: argparse.Namespace, server: tuple[str, int], ip16: bytes, status: int
) -> str:
    """Explain a non-OK LOG_ACK. SVP has one FATAL for both causes (the IP is not that of
    exactly one compute node; the server could not read its store), so ask again with a
    ``count`` of 4, too small for any entry: portolan answers that from its index alone, without
    reading the store, so OK means the IP was fine and the store is what failed."""
    what = f"LOG_REQ for {args.cn_ip}: {_status_name(status)}"
    if status != Status.FATAL:
        return what
    try:
        probe = exchange(
            server, LogRequest(_request_id(), 4, ip16, args.svp_version), timeout=args.timeout
        )
    except LookupFailed:
        probe = None
    if isinstance(probe, LogAck) and probe.status == Status.OK:
        return (
            f"{what}: the server could not read its store (the compute node is known; see "
            "the server's log)"
        )
    if isinstance(probe, LogAck) and probe.status == Status.FATAL:
        return f"{what}: {args.cn_ip} is not the underlay IP of exactly one compute node"
    return f"{what} (is that the underlay IP of exactly one compute node?)"


def run_log(args: argparse.Namespace) -> int:
    try:
        ip16 = ip_to_wire(args.cn_ip)
        server = _server(args)
    except ValueError as exc:
        return _fail(str(exc)) + 1
    try:
        reply = exchange(
            server,
            LogRequest(_request_id(), args.count, ip16, args.svp_version),
            timeout=args.timeout,
        )
    except LookupFailed as exc:
        return _fail(str(exc))
    if not isinstance(reply, LogAck):
        return _fail(f"expected LOG_ACK, got {reply.OP.name}")
    if reply.status != Status.OK:
        return _fail(_why_log_failed(args, server, ip16, reply.status))
    entries = [_entry_doc(e) for e in reply.entries]
    if args.json:
        print(json.dumps({"cn_ip": args.cn_ip, "entries": entries}))
    elif not entries:
        print(f"log of {args.cn_ip} is empty")
    else:
        for e in entries:
            rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("type", "id"))
            print(f"{e['type']:5} {e['id']} {rest}")
    return 0
