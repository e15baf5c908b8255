"""``portolan cn|network|vnic ...``: the admin command line, a client of the management API.

Every command is one or two HTTP requests to the API (``--api URL``, default
``http://127.0.0.1:1280`` or ``$PORTOLAN_API``), with ``Authorization: Bearer <token>`` when a
token is given (``--api-token`` or ``$PORTOLAN_API_TOKEN``). Output is a readable table (lists)
or ``key: value`` lines (one object) by default, and the API's JSON with ``--json``.

Exit codes: 0 success; 1 the API refused the request (its message and every field error go
to stderr) or could not be reached; 2 the command line itself was wrong (argparse).

    portolan cn set UUID --ip IP [--port P] | list | show UUID | rm UUID
    portolan network create --name N --owner-uuid U --vnet-id V --vlan-id L --subnet CIDR
                            [--gateway G] [--provision-start A --provision-end B]
    portolan network list | show UUID | rm UUID
    portolan vnic create --network UUID --cn UUID [--mac M] [--ip A] [--owner-uuid U]
                         [--belongs-to U] [--tag k=v ...] [--firewall]
    portolan vnic list [--vnet-id V] [--cn UUID] [--network UUID] [--owner-uuid U]
    portolan vnic show MAC | move MAC --cn UUID | rm MAC
    portolan vnic update MAC [--ip A] [--cn UUID] [--tag k=v ... | --clear-tags]
                             [--firewall | --no-firewall] [--owner-uuid U] [--belongs-to U]
    portolan rule add 'RULE TEXT' (--owner-uuid U | --global) [--enabled] [--description D]
                      [--log] [--uuid U]
    portolan rule list [--owner-uuid U] [--vnic MAC] [--tag NAME[=VALUE] ...]
                       [--enabled | --disabled] [--global | --owned]
    portolan rule show UUID | rm UUID | vnics UUID
    portolan rule update UUID [--rule TEXT] [--enable | --disable] [--log | --no-log]
                              [--description D] [--owner-uuid U | --global]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import httpx

DEFAULT_API = "http://127.0.0.1:1280"
TIMEOUT = 30.0


class ApiError(Exception):
    """The API answered with an error status; ``body`` is its JSON (or a stand-in)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", f"HTTP {status}"))
        self.status = status
        self.body = body


class ApiUnreachable(Exception):
    pass


class ApiClient:
    """A small synchronous client of the management API."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.ConnectError as exc:
            raise ApiUnreachable(
                f"cannot reach the management API at {self.base_url} ({exc}); is `portolan "
                "serve` running there? Point --api (or PORTOLAN_API) at it"
            ) from None
        except httpx.TimeoutException:
            raise ApiUnreachable(
                f"the management API at {self.base_url} did not answer within {TIMEOUT:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiUnreachable(f"talking to {self.base_url} failed: {exc}") from None
        if response.status_code == 204:
            return None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.is_error:
            if not isinstance(payload, dict):
                payload = {
                    "code": f"HTTP{response.status_code}",
                    "message": response.text.strip() or response.reason_phrase,
                }
            raise ApiError(response.status_code, payload)
        return payload


# -- output --------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in sorted(value.items())) or "-"
    return str(value)


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Left-aligned columns separated by two spaces; ``columns`` is (header, key) pairs."""
    cells = [[header for header, _ in columns]]
    cells += [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    return "\n".join(lines)


def render_object(obj: dict[str, Any]) -> str:
    width = max((len(k) for k in obj), default=0)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}" for key, value in obj.items())


CN_COLUMNS = [("UUID", "uuid"), ("IP", "ip"), ("PORT", "port"), ("VERSION", "version")]
NETWORK_COLUMNS = [
    ("UUID", "uuid"),
    ("NAME", "name"),
    ("VNET_ID", "vnet_id"),
    ("VLAN_ID", "vlan_id"),
    ("SUBNET", "subnet"),
    ("GATEWAY", "gateway"),
    ("PROVISION_START", "provision_start"),
    ("PROVISION_END", "provision_end"),
]
VNIC_COLUMNS = [
    ("MAC", "mac"),
    ("IP", "ip"),
    ("VNET_ID", "vnet_id"),
    ("VLAN_ID", "vlan_id"),
    ("CN_UUID", "cn_uuid"),
    ("NETWORK_UUID", "network_uuid"),
    ("FIREWALL", "firewall_enabled"),
    ("TAGS", "tags"),
]

RULE_COLUMNS = [
    ("UUID", "uuid"),
    ("ENABLED", "enabled"),
    ("OWNER", "owner_uuid"),
    ("VERSION", "version"),
    ("RULE", "rule"),
]


def _emit(args: argparse.Namespace, result: Any, columns: Sequence[tuple[str, str]]) -> None:
    out: TextIO = sys.stdout
    if args.json:
        json.dump(result, out, indent=2, sort_keys=False)
        out.write("\n")
    elif isinstance(result, list):
        out.write(render_table(result, columns) + "\n")
    elif isinstance(result, dict):
        out.write(render_object(result) + "\n")


TOKEN_OPTIONS = "--api-token TOKEN or the PORTOLAN_API_TOKEN environment variable"


def report_error(exc: ApiError, err: TextIO, *, token_given: bool = False) -> None:
    """One line for the error, then one per field error that says something new. A 401 says
    how a command-line user gives the token (the API's own text speaks HTTP headers)."""
    body = exc.body
    code = body.get("code", "Error")
    message = str(body.get("message", "request failed"))
    if exc.status == 401:
        if token_given:
            message = f"the API refused the token given with {TOKEN_OPTIONS} ({message})"
        else:
            message = f"this API needs a token for writes: give it with {TOKEN_OPTIONS}"
    err.write(f"portolan: error: {message} ({exc.status} {code})\n")
    for field_error in body.get("errors") or ():
        if not isinstance(field_error, dict):
            continue
        field = str(field_error.get("field", "?"))
        text = str(field_error.get("message", ""))
        if text and (text in message or f"{field}: {text}" in message):
            continue  # the headline already said it
        err.write(f"  {field}: {text} ({field_error.get('code', '')})\n")


# -- commands ------------------------------------------------------------------------------


def _path_part(text: str) -> str:
    return quote(text, safe=":-")


def _parse_tags(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--tag wants KEY=VALUE, got {item!r}")
        tags[key] = value
    return tags


def _set_if(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        body[key] = value


def cmd_cn_set(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"ip": args.ip}
    _set_if(body, "port", args.port)
    return api.request("PUT", f"/cns/{_path_part(args.uuid)}", body=body)


def cmd_cn_list(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", "/cns")


def cmd_cn_show(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", f"/cns/{_path_part(args.uuid)}")


def cmd_cn_rm(api: ApiClient, args: argparse.Namespace) -> Any:
    api.request("DELETE", f"/cns/{_path_part(args.uuid)}")
    return f"removed compute node {args.uuid}"


def cmd_network_create(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {
        "name": args.name,
        "owner_uuid": args.owner_uuid,
        "vnet_id": args.vnet_id,
        "vlan_id": args.vlan_id,
        "subnet": args.subnet,
    }
    _set_if(body, "gateway", args.gateway)
    _set_if(body, "provision_start", args.provision_start)
    _set_if(body, "provision_end", args.provision_end)
    return api.request("POST", "/networks", body=body)


def cmd_network_list(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", "/networks")


def cmd_network_show(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", f"/networks/{_path_part(args.uuid)}")


def cmd_network_rm(api: ApiClient, args: argparse.Namespace) -> Any:
    api.request("DELETE", f"/networks/{_path_part(args.uuid)}")
    return f"removed network {args.uuid}"


def cmd_vnic_create(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"network_uuid": args.network, "cn_uuid": args.cn}
    _set_if(body, "mac", args.mac)
    _set_if(body, "ip", args.ip)
    _set_if(body, "owner_uuid", args.owner_uuid)
    _set_if(body, "belongs_to_uuid", args.belongs_to)
    _set_if(body, "tags", _parse_tags(args.tag))
    if args.firewall:
        body["firewall_enabled"] = True
    return api.request("POST", "/vnics", body=body)


def cmd_vnic_list(api: ApiClient, args: argparse.Namespace) -> Any:
    params: dict[str, Any] = {}
    _set_if(params, "vnet_id", args.vnet_id)
    _set_if(params, "cn_uuid", args.cn)
    _set_if(params, "network_uuid", args.network)
    _set_if(params, "owner_uuid", args.owner_uuid)
    return api.request("GET", "/vnics", params=params)


def cmd_vnic_show(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", f"/vnics/{_path_part(args.mac)}")


def cmd_vnic_move(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("PUT", f"/vnics/{_path_part(args.mac)}", body={"cn_uuid": args.cn})


def cmd_vnic_update(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    _set_if(body, "ip", args.ip)
    _set_if(body, "cn_uuid", args.cn)
    _set_if(body, "owner_uuid", args.owner_uuid)
    _set_if(body, "belongs_to_uuid", args.belongs_to)
    _set_if(body, "firewall_enabled", args.firewall)
    if args.clear_tags:
        body["tags"] = {}
    else:
        _set_if(body, "tags", _parse_tags(args.tag))
    if not body:
        raise argparse.ArgumentTypeError(
            "nothing to change: give --ip, --cn, --tag, --clear-tags, --firewall, "
            "--no-firewall, --owner-uuid or --belongs-to"
        )
    return api.request("PUT", f"/vnics/{_path_part(args.mac)}", body=body)


def cmd_vnic_rm(api: ApiClient, args: argparse.Namespace) -> Any:
    api.request("DELETE", f"/vnics/{_path_part(args.mac)}")
    return f"removed vnic {args.mac}"


def cmd_rule_add(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"rule": args.rule, "enabled": args.enabled, "log": args.log}
    _set_if(body, "owner_uuid", args.owner_uuid)
    if args.is_global:
        body["global"] = True
    _set_if(body, "description", args.description)
    _set_if(body, "uuid", args.uuid)
    try:
        return api.request("POST", "/rules", body=body)
    except ApiError as exc:
        fields = {e.get("field") for e in exc.body.get("errors") or () if isinstance(e, dict)}
        if not args.owner_uuid and not args.is_global and "owner_uuid" in fields:
            exc.body = {
                **exc.body,
                "message": f"{exc.body.get('message', 'owner_uuid required')}: give "
                "--owner-uuid UUID (the rule applies to that owner's VNICs), or --global for "
                "an operator rule that applies to every owner's VNICs",
            }
        raise


def cmd_rule_list(api: ApiClient, args: argparse.Namespace) -> Any:
    params: dict[str, Any] = {}
    _set_if(params, "owner_uuid", args.owner_uuid)
    _set_if(params, "vnic", args.vnic)
    if args.tag:
        params["tag"] = list(args.tag)
    if args.enabled is not None:
        params["enabled"] = "true" if args.enabled else "false"
    if args.is_global is not None:
        params["global"] = "true" if args.is_global else "false"
    return api.request("GET", "/rules", params=params)


def cmd_rule_show(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", f"/rules/{_path_part(args.uuid)}")


def cmd_rule_update(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    _set_if(body, "rule", args.rule)
    _set_if(body, "enabled", args.enabled)
    _set_if(body, "log", args.log)
    _set_if(body, "description", args.description)
    _set_if(body, "owner_uuid", args.owner_uuid)
    if args.is_global:
        body["global"] = True
    if not body:
        raise argparse.ArgumentTypeError(
            "nothing to change: give --rule, --enable, --disable, --log, --no-log, "
            "--description, --owner-uuid or --global"
        )
    return api.request("PUT", f"/rules/{_path_part(args.uuid)}", body=body)


def cmd_rule_rm(api: ApiClient, args: argparse.Namespace) -> Any:
    api.request("DELETE", f"/rules/{_path_part(args.uuid)}")
    return f"removed rule {args.uuid}"


def cmd_rule_vnics(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.request("GET", f"/rules/{_path_part(args.uuid)}/vnics")


# -- wiring --------------------------------------------------------------------------------

Command = Callable[[ApiClient, argparse.Namespace], Any]


def _runner(command: Command, columns: Sequence[tuple[str, str]]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        token = args.api_token or os.environ.get("PORTOLAN_API_TOKEN") or None
        api = ApiClient(args.api, token)
        try:
            result = command(api, args)
        except argparse.ArgumentTypeError as exc:
            sys.stderr.write(f"portolan: error: {exc}\n")
            return 2
        except ApiError as exc:
            if args.json:
                json.dump(exc.body, sys.stdout, indent=2)
                sys.stdout.write("\n")
            report_error(exc, sys.stderr, token_given=bool(token))
            return 1
        except ApiUnreachable as exc:
            sys.stderr.write(f"portolan: error: {exc}\n")
            return 1
        finally:
            api.close()
        if isinstance(result, str):  # a delete: nothing to show but a confirmation
            if not args.json:
                sys.stdout.write(result + "\n")
        else:
            _emit(args, result, columns)
        return 0

    return run


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        default=os.environ.get("PORTOLAN_API", DEFAULT_API),
        metavar="URL",
        help=f"management API base URL (default $PORTOLAN_API or {DEFAULT_API})",
    )
    common.add_argument(
        "--api-token",
        default=None,
        metavar="TOKEN",
        help="bearer token for writes (default $PORTOLAN_API_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    return common


def _vnet_id(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def register(subparsers: Any) -> None:
    """Add the ``cn``, ``network``, ``vnic`` and ``rule`` commands to ``portolan``'s parser."""
    common = _common_options()

    def leaf(group: Any, name: str, help: str, command: Command, columns: Any) -> Any:
        p = group.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=_runner(command, columns))
        return p

    # cn ------------------------------------------------------------------------------------
    cn = subparsers.add_parser(
        "cn", help="compute nodes: underlay addresses (management API client)"
    )
    cn_sub = cn.add_subparsers(dest="cn_command", metavar="ACTION", required=True)
    p = leaf(cn_sub, "set", "create or update a compute node", cmd_cn_set, CN_COLUMNS)
    p.add_argument("uuid", metavar="UUID")
    p.add_argument("--ip", required=True, help="underlay IP its varpd listens on")
    p.add_argument("--port", type=int, default=None, help="underlay VXLAN port (default 4789)")
    leaf(cn_sub, "list", "list compute nodes", cmd_cn_list, CN_COLUMNS)
    p = leaf(cn_sub, "show", "show one compute node", cmd_cn_show, CN_COLUMNS)
    p.add_argument("uuid", metavar="UUID")
    p = leaf(
        cn_sub,
        "rm",
        "remove a compute node (refused while VNICs live there)",
        cmd_cn_rm,
        CN_COLUMNS,
    )
    p.add_argument("uuid", metavar="UUID")

    # network -------------------------------------------------------------------------------
    net = subparsers.add_parser("network", help="networks: subnets on a vnet and VLAN")
    net_sub = net.add_subparsers(dest="network_command", metavar="ACTION", required=True)
    p = leaf(net_sub, "create", "create a network", cmd_network_create, NETWORK_COLUMNS)
    p.add_argument("--name", required=True)
    p.add_argument("--owner-uuid", required=True, metavar="UUID")
    p.add_argument("--vnet-id", required=True, type=_vnet_id, metavar="V")
    p.add_argument("--vlan-id", required=True, type=int, metavar="L")
    p.add_argument("--subnet", required=True, metavar="CIDR")
    p.add_argument("--gateway", metavar="IP")
    p.add_argument("--provision-start", metavar="IP")
    p.add_argument("--provision-end", metavar="IP")
    leaf(net_sub, "list", "list networks", cmd_network_list, NETWORK_COLUMNS)
    p = leaf(net_sub, "show", "show one network", cmd_network_show, NETWORK_COLUMNS)
    p.add_argument("uuid", metavar="UUID")
    p = leaf(
        net_sub,
        "rm",
        "remove a network (refused while VNICs use it)",
        cmd_network_rm,
        NETWORK_COLUMNS,
    )
    p.add_argument("uuid", metavar="UUID")

    # vnic ----------------------------------------------------------------------------------
    vnic = subparsers.add_parser("vnic", help="VNICs: MAC and IP on a network, on a compute node")
    vnic_sub = vnic.add_subparsers(dest="vnic_command", metavar="ACTION", required=True)
    p = leaf(vnic_sub, "create", "create a VNIC", cmd_vnic_create, VNIC_COLUMNS)
    p.add_argument("--network", required=True, metavar="UUID")
    p.add_argument("--cn", required=True, metavar="UUID")
    p.add_argument("--mac", help="MAC address (allocated when not given)")
    p.add_argument("--ip", help="IP address (allocated from the network when not given)")
    p.add_argument("--owner-uuid", metavar="UUID")
    p.add_argument("--belongs-to", metavar="UUID", help="the VM (or other thing) it belongs to")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag (repeatable)")
    p.add_argument("--firewall", action="store_true", help="enable the firewall on it")
    p = leaf(vnic_sub, "list", "list VNICs", cmd_vnic_list, VNIC_COLUMNS)
    p.add_argument("--vnet-id", type=_vnet_id, metavar="V")
    p.add_argument("--cn", "--cn-uuid", dest="cn", metavar="UUID")
    p.add_argument("--network", "--network-uuid", dest="network", metavar="UUID")
    p.add_argument("--owner-uuid", metavar="UUID")
    p = leaf(vnic_sub, "show", "show one VNIC", cmd_vnic_show, VNIC_COLUMNS)
    p.add_argument("mac", metavar="MAC")
    p = leaf(vnic_sub, "move", "move a VNIC to another compute node", cmd_vnic_move, VNIC_COLUMNS)
    p.add_argument("mac", metavar="MAC")
    p.add_argument("--cn", required=True, metavar="UUID")
    p = leaf(vnic_sub, "update", "change a VNIC", cmd_vnic_update, VNIC_COLUMNS)
    p.add_argument("mac", metavar="MAC")
    p.add_argument("--ip")
    p.add_argument("--cn", metavar="UUID", help="move it to this compute node")
    p.add_argument("--owner-uuid", metavar="UUID")
    p.add_argument("--belongs-to", metavar="UUID")
    tags = p.add_mutually_exclusive_group()
    tags.add_argument(
        "--tag", action="append", metavar="KEY=VALUE", help="replace the tags with these"
    )
    tags.add_argument("--clear-tags", action="store_true", help="remove every tag")
    fw = p.add_mutually_exclusive_group()
    fw.add_argument("--firewall", dest="firewall", action="store_const", const=True)
    fw.add_argument("--no-firewall", dest="firewall", action="store_const", const=False)
    p = leaf(vnic_sub, "rm", "remove a VNIC", cmd_vnic_rm, VNIC_COLUMNS)
    p.add_argument("mac", metavar="MAC")

    # rule ----------------------------------------------------------------------------------
    rule = subparsers.add_parser("rule", help="firewall rules (FWAPI-style rule language)")
    rule_sub = rule.add_subparsers(dest="rule_command", metavar="ACTION", required=True)
    p = leaf(rule_sub, "add", "create a firewall rule", cmd_rule_add, RULE_COLUMNS)
    p.add_argument("rule", metavar="RULE", help="rule text, e.g. 'FROM any TO all vms ALLOW ...'")
    owner = p.add_mutually_exclusive_group()
    owner.add_argument("--owner-uuid", metavar="UUID", help="the customer the rule belongs to")
    owner.add_argument(
        "--global", dest="is_global", action="store_true", help="a global (operator) rule"
    )
    p.add_argument("--enabled", action="store_true", help="enable it (default: disabled)")
    p.add_argument("--log", action="store_true", help="log matching connections")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--uuid", metavar="UUID", help="the rule's uuid (generated when not given)")
    p = leaf(rule_sub, "list", "list firewall rules", cmd_rule_list, RULE_COLUMNS)
    p.add_argument("--owner-uuid", metavar="UUID")
    p.add_argument("--vnic", metavar="MAC", help="rules that apply to this VNIC")
    p.add_argument("--tag", action="append", metavar="NAME[=VALUE]", help="rules naming a tag")
    en = p.add_mutually_exclusive_group()
    en.add_argument("--enabled", dest="enabled", action="store_const", const=True, default=None)
    en.add_argument("--disabled", dest="enabled", action="store_const", const=False)
    gl = p.add_mutually_exclusive_group()
    gl.add_argument("--global", dest="is_global", action="store_const", const=True, default=None)
    gl.add_argument("--owned", dest="is_global", action="store_const", const=False)
    p = leaf(rule_sub, "show", "show one firewall rule", cmd_rule_show, RULE_COLUMNS)
    p.add_argument("uuid", metavar="UUID")
    p = leaf(rule_sub, "update", "change a firewall rule", cmd_rule_update, RULE_COLUMNS)
    p.add_argument("uuid", metavar="UUID")
    p.add_argument("--rule", metavar="TEXT", help="new rule text")
    en = p.add_mutually_exclusive_group()
    en.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None)
    en.add_argument("--disable", dest="enabled", action="store_const", const=False)
    lg = p.add_mutually_exclusive_group()
    lg.add_argument("--log", dest="log", action="store_const", const=True, default=None)
    lg.add_argument("--no-log", dest="log", action="store_const", const=False)
    p.add_argument("--description", metavar="TEXT")
    owner = p.add_mutually_exclusive_group()
    owner.add_argument("--owner-uuid", metavar="UUID")
    owner.add_argument("--global", dest="is_global", action="store_true")
    p = leaf(rule_sub, "rm", "remove a firewall rule", cmd_rule_rm, RULE_COLUMNS)
    p.add_argument("uuid", metavar="UUID")
    p = leaf(
        rule_sub, "vnics", "the VNICs a firewall rule applies to", cmd_rule_vnics, VNIC_COLUMNS
    )
    p.add_argument("uuid", metavar="UUID")
