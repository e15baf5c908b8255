"""``varpdadm``: the command line of the varpd control socket.

    varpdadm [--socket PATH] [--json] COMMAND ...
      list | show NAME | create NAME --vnetid N --search PLUGIN [--mtu M] [-p prop=value]...
      set NAME prop=value... | activate NAME | delete NAME | plugins | ping
      cache list NAME | cache get NAME MAC | cache set NAME MAC (IP:PORT|[IPv6]:PORT|drop)
      cache rm NAME MAC | cache flush NAME
      vnic add NAME MAC [--vlan N] [--tap TAP] | vnic rm NAME MAC | vnic list NAME
      firewall                  policy fetcher state, policy generation, per-VNIC rule counts

The socket is ``--socket``, else ``$VARPD_SOCKET``, else /var/run/varpd/varpd.sock. Output is
a readable table, or JSON with ``--json``. Errors go to stderr as ``varpdadm: MESSAGE`` with
exit status 1 (2 for usage errors). Plain blocking sockets: no event loop is needed here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
from typing import Any

from protocol.control import ControlProtocolError, Decoder, Reply, Request, encode_request
from varpd.config import DEFAULT_CONTROL_SOCKET

_ids = itertools.count(1)


class AdmError(Exception):
    pass


def call(path: str, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Send one request to varpd at ``path``; return its result or raise `AdmError`."""
    req = Request(next(_ids), op, args or {})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(encode_request(req))
            dec = Decoder()
            while True:
                data = sock.recv(65536)
                if not data:
                    raise AdmError(f"varpd at {path} closed the connection without answering")
                dec.receive_data(data)
                msg = dec.next_message()
                if msg is not None:
                    break
    except OSError as exc:
        raise AdmError(f"cannot talk to varpd at {path}: {exc.strerror or exc}") from None
    except ControlProtocolError as exc:
        raise AdmError(f"bad answer from varpd: {exc}") from None
    if not isinstance(msg, Reply) or msg.id != req.id:
        raise AdmError("varpd answered something else than our request")
    if not msg.ok:
        assert msg.error is not None
        raise AdmError(msg.error.message)
    return msg.result


# ---------------------------------------------------------------------- output


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return "\n".join(lines)


def _status(d: dict[str, Any]) -> str:
    return "DEGRADED" if d.get("degraded") else "ONLINE"


def _fw_cell(info: dict[str, Any] | None) -> str:
    if not info:
        return "off"
    return f"{info['rules_in']} in / {info['rules_out']} out, {info['flows']} flows"


def _render_firewall(result: dict[str, Any]) -> str:
    gen = result.get("generation")
    lines = [
        f"state:       {result.get('state')}",
        f"generation:  {'-' if gen is None else gen}",
        f"applied:     {result.get('applied', 0)}",
        f"last error:  {result.get('last_error') or '-'}",
    ]
    fetcher = result.get("fetcher")
    if fetcher:
        lines.insert(1, f"policy url:  {fetcher.get('url')}")
        lines.append(
            f"requests:    {fetcher.get('requests', 0)} ({fetcher.get('applied', 0)} applied, "
            f"{fetcher.get('not_modified', 0)} not modified, {fetcher.get('errors', 0)} errors)"
        )
    rows = [
        [
            v["mac"],
            v["device"],
            "yes" if v["filtered"] else "no",
            v["rules_in"],
            v["rules_out"],
            v["flows"],
            v["blocked_in"],
            v["blocked_out"],
        ]
        for v in result.get("vnics") or []
    ]
    lines += [
        "",
        table(
            [
                "VNIC",
                "DEVICE",
                "FILTERED",
                "RULES IN",
                "RULES OUT",
                "FLOWS",
                "BLOCKED IN",
                "BLOCKED OUT",
            ],
            rows,
        ),
    ]
    others = result.get("policy_only") or []
    if others:
        lines += ["", "in the policy but not on this node: " + ", ".join(others)]
    if result.get("kernel"):
        lines += ["", _render_kernel_firewall(result["kernel"])]
    return "\n".join(lines)


def _render_kernel_firewall(k: dict[str, Any]) -> str:
    """backend linux: the nftables side (varpd/firewall/kernel)."""
    kernel = k.get("kernel") or {}
    secs = k.get("last_transaction_seconds")
    lines = [
        f"kernel:      {kernel.get('table', 'bridge ' + str(k.get('table')))} "
        f"(+ {kernel.get('glue_table', '-')}), via {k.get('backend')}",
        f"  generation {'-' if kernel.get('generation') is None else kernel['generation']}"
        f" in the kernel, {k.get('transactions', 0)} transactions "
        f"({k.get('full_rebuilds', 0)} full, {k.get('refused', 0)} refused), last "
        f"{'-' if secs is None else f'{secs * 1000:.1f} ms'}, {k.get('flows_cut', 0)} flows cut",
        f"  last error: {k.get('last_error') or k.get('service_last_error') or '-'}",
    ]
    if kernel.get("present") is False:
        lines.append("  (no table in the kernel)")
    rows = []
    for mac, v in sorted((kernel.get("vnics") or {}).items()):
        c = v.get("counters") or {}
        rules = v.get("rules") or {}
        rows.append(
            [
                mac,
                v.get("port") or "-",
                " ".join(f"{name}:{n}" for name, n in rules.items()),
                f"{v.get('sets', 0)}/{v.get('set_elements', 0)}",
                c.get("in_drop_rule", 0) + c.get("in_drop_default", 0),
                c.get("out_drop_rule", 0),
                c.get("in_pass_rule", 0),
            ]
        )
    if rows:
        lines += [
            "",
            table(
                ["VNIC", "PORT", "CHAINS:RULES", "SETS/ELEMS", "DROP IN", "DROP OUT", "ALLOW IN"],
                rows,
            ),
        ]
    return "\n".join(lines)


def render(command: str, result: Any) -> str:
    if command == "list":
        return table(
            ["NAME", "ID", "VNETID", "SEARCH", "MODE", "STATE", "STATUS", "VNICS"],
            [
                [
                    d["name"],
                    d["id"],
                    d["vnetid"],
                    d["search"],
                    d["mode"],
                    d["state"],
                    _status(d),
                    d["vnics"],
                ]
                for d in result
            ],
        )
    if command in ("show", "create", "set", "activate"):
        lines = [
            f"name:    {result['name']}",
            f"id:      {result['id']}",
            f"vnetid:  {result['vnetid']}",
            f"search:  {result['search']} ({result['mode']})",
            *([f"backend: {result['backend']}"] if result.get("backend") else []),
            f"state:   {result['state']}",
            f"status:  {_status(result)}"
            + (f" ({result['reason']})" if result.get("reason") else ""),
            f"mtu:     {result['mtu']}",
            "",
            table(
                ["PROPERTY", "PERM", "VALUE", "DEFAULT"],
                [[p["name"], p["perm"], p["value"], p["default"]] for p in result["props"]],
            ),
        ]
        dprops = result.get("device_props") or {}
        if dprops:
            lines += ["", table(["DEVICE PROPERTY", "VALUE"], [[k, v] for k, v in dprops.items()])]
        vnics = result.get("vnic_list") or []
        fw = result.get("firewall") or {}
        if vnics:
            per_vnic = fw.get("vnics") or {}
            lines += [
                "",
                table(
                    ["VNIC", "VLAN", "TAP", "FIREWALL"],
                    [
                        [v["mac"], v["vlan_id"], v["tap"], _fw_cell(per_vnic.get(v["mac"]))]
                        for v in vnics
                    ],
                ),
            ]
        if fw:
            gen = fw.get("generation")
            lines.append(
                f"firewall: {fw.get('state')}"
                + (f", policy generation {gen}" if gen is not None else ", no policy yet")
            )
        return "\n".join(lines)
    if command == "firewall":
        return _render_firewall(result)
    if command == "cache list":
        return table(
            ["MAC", "FLAGS", "DESTINATION"],
            [[e["mac"], ",".join(e["flags"]) or "-", e["dest"]] for e in result],
        )
    if command in ("cache get", "cache set"):
        return table(
            ["MAC", "FLAGS", "DESTINATION"],
            [[result["mac"], ",".join(result["flags"]) or "-", result["dest"]]],
        )
    if command == "vnic list":
        return table(["VNIC", "VLAN", "TAP"], [[v["mac"], v["vlan_id"], v["tap"]] for v in result])
    if command == "vnic add":
        text = f"added VNIC {result['mac']} (vlan {result['vlan_id']})"
        if result.get("ifname"):  # the link to move into the tenant (veth end or TAP)
            text += f"; tenant link {result['ifname']}"
        return text
    if command == "plugins":
        rows = []
        for name, info in result.items():
            for p in info["props"] or [
                {"name": "-", "type": "-", "required": False, "default": None, "live": False}
            ]:
                rows.append(
                    [
                        name,
                        info["mode"],
                        p["name"],
                        p["type"],
                        "yes" if p["required"] else "no",
                        p["default"],
                        "yes" if p["live"] else "no",
                    ]
                )
        return table(["PLUGIN", "MODE", "PROPERTY", "TYPE", "REQUIRED", "DEFAULT", "LIVE"], rows)
    if command == "ping":
        return render_info(result)
    return ""


def format_duration(seconds: float) -> str:
    """``11.8 s``, ``3 min 7 s``, ``2 h 05 min``, ``3 d 4 h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _plain(value: Any) -> str:
    """A value as an operator reads it: lists joined, None as '-', no Python reprs."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "-"
    return str(value)


def render_info(info: dict[str, Any]) -> str:
    """``varpdadm ping``: one ``key: value`` line per field, units spelled out."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if key == "uptime" and isinstance(value, int | float):
            rows.append(("uptime", format_duration(float(value))))
        elif key == "moved_aside":
            files = value or []
            rows.append(("moved aside", f"{len(files)} state file(s)" if files else "none"))
        else:
            rows.append((key.replace("_", " "), _plain(value)))
    width = max((len(k) for k, _ in rows), default=0) + 1
    lines = [f"{(k + ':').ljust(width)} {v}" for k, v in rows]
    for item in info.get("moved_aside") or []:
        if isinstance(item, dict):
            lines.append(f"  {item.get('file')}: {item.get('reason')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- parsing


def _prop_pairs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AdmError(f"expected prop=value, got {item!r}")
        out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON"
    )
    p = argparse.ArgumentParser(
        prog="varpdadm", description="administer a running varpd", parents=[json_flag]
    )
    p.add_argument(
        "--socket", help=f"control socket (default $VARPD_SOCKET or {DEFAULT_CONTROL_SOCKET})"
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[json_flag], help="list instances")
    sub.add_parser("ping", parents=[json_flag], help="daemon information")
    sub.add_parser("plugins", parents=[json_flag], help="search plugins and their properties")
    sub.add_parser(
        "firewall", parents=[json_flag], help="firewall policy state and per-VNIC rule counts"
    )
    s = sub.add_parser("show", parents=[json_flag], help="properties and status of an instance")
    s.add_argument("name")
    s = sub.add_parser("create", parents=[json_flag], help="create an overlay device + instance")
    s.add_argument("name")
    s.add_argument("--vnetid", "-v", required=True)
    s.add_argument("--search", "-s", required=True)
    s.add_argument("--mtu")
    s.add_argument("-p", "--prop", action="append", default=[], metavar="PROP=VALUE")
    s = sub.add_parser("set", parents=[json_flag], help="set properties")
    s.add_argument("name")
    s.add_argument("props", nargs="+", metavar="PROP=VALUE")
    for cmd, hlp in (("activate", "activate an instance"), ("delete", "delete an instance")):
        sub.add_parser(cmd, parents=[json_flag], help=hlp).add_argument("name")
    cache = sub.add_parser("cache", help="target cache administration")
    csub = cache.add_subparsers(dest="subcommand", required=True)
    csub.add_parser("list", parents=[json_flag]).add_argument("name")
    c = csub.add_parser("get", parents=[json_flag])
    c.add_argument("name")
    c.add_argument("mac")
    c = csub.add_parser("set", parents=[json_flag])
    c.add_argument("name")
    c.add_argument("mac")
    c.add_argument("dest", metavar="IP:PORT|[IPv6]:PORT|drop")
    c = csub.add_parser("rm", parents=[json_flag])
    c.add_argument("name")
    c.add_argument("mac")
    csub.add_parser("flush", parents=[json_flag]).add_argument("name")
    vnic = sub.add_parser("vnic", help="VNICs of an overlay device")
    vsub = vnic.add_subparsers(dest="subcommand", required=True)
    v = vsub.add_parser("add", parents=[json_flag])
    v.add_argument("name")
    v.add_argument("mac")
    v.add_argument("--vlan", default="0")
    v.add_argument("--tap")
    v = vsub.add_parser("rm", parents=[json_flag])
    v.add_argument("name")
    v.add_argument("mac")
    vsub.add_parser("list", parents=[json_flag]).add_argument("name")
    return p


def request_for(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(display command, op, args) for parsed arguments."""
    cmd = args.command
    if cmd in ("list", "ping", "plugins", "firewall"):
        return cmd, cmd, {}
    if cmd in ("show", "activate", "delete"):
        return cmd, cmd, {"name": args.name}
    if cmd == "create":
        a: dict[str, Any] = {
            "name": args.name,
            "vnetid": args.vnetid,
            "search": args.search,
            "props": _prop_pairs(args.prop),
        }
        if args.mtu is not None:
            a["mtu"] = args.mtu
        return cmd, "create", a
    if cmd == "set":
        return cmd, "set", {"name": args.name, "props": _prop_pairs(args.props)}
    sc = args.subcommand
    display = f"{cmd} {sc}"
    if cmd == "cache":
        a = {"name": args.name}
        if sc in ("get", "set", "rm"):
            a["mac"] = args.mac
        if sc == "set":
            a["dest"] = args.dest
        return display, f"cache_{sc}", a
    a = {"name": args.name}
    if sc in ("add", "rm"):
        a["mac"] = args.mac
    if sc == "add":
        a["vlan"] = args.vlan
        if args.tap:
            a["tap"] = args.tap
    return display, f"vnic_{sc}", a


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.socket or os.environ.get("VARPD_SOCKET") or DEFAULT_CONTROL_SOCKET
    as_json = getattr(args, "json", False)
    try:
        display, op, req_args = request_for(args)
        result = call(path, op, req_args)
    except AdmError as exc:
        print(f"varpdadm: {exc}", file=sys.stderr)
        return 1
    try:
        if as_json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            text = render(display, result)
            if text:
                print(text)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
    except BrokenPipeError:
        return closed_pipe_exit()
    return 0


def closed_pipe_exit() -> int:
    """stdout's reader went away (``varpdadm ... | head``): exit quietly, as a tool killed by
    SIGPIPE would (status 141), without a traceback or a flush error at interpreter exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
