"""The `portolan-cni` entry point: ADD, DEL, CHECK and VERSION.

``main()`` reads stdin and the environment, runs one command and prints its JSON: the result
for ADD, the version document for VERSION, nothing for a successful DEL or CHECK. Any failure
prints the spec's error document (``cniVersion``, ``code``, ``msg``, ``details``) on stdout and
exits 1. Unexpected exceptions are reported the same way (code 5, I/O failure) so a runtime
always gets JSON it can read.

ADD runs its steps in the order the module docstring of `cni` gives and keeps an undo list;
on any failure (or an interrupt) the undo steps run in reverse, best effort, and the original
error is reported, with the undo failures (if any) in ``details``. SIGTERM and SIGINT (a
runtime giving up on a slow ADD) raise error 11 where the process is, so the undo runs too.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from cni import netlink
from cni.api import PortolanClient
from cni.spec import (
    CHECK_FAILED,
    INVALID_CONFIG,
    IO_FAILURE,
    NETLINK_ERROR,
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
    Env,
    NetConf,
    add_result,
    config_version,
    parse_config,
    parse_env,
    vnic_attributes,
)
from cni.varpdctl import VarpdClient, VarpdRefused


def _api(conf: NetConf) -> PortolanClient:
    return PortolanClient(conf.api, conf.token(), conf.timeout)


def _varpd(conf: NetConf) -> VarpdClient:
    return VarpdClient(conf.varpd_socket, conf.timeout)


def tap_name(mac: str) -> str:
    """The name varpd gives the VNIC's link in its own namespace (unique per MAC, 14 chars)."""
    return "pc" + mac.replace(":", "").lower()


def _varpd_remove(varpd: VarpdClient, overlay: str, mac: str) -> None:
    try:
        varpd.call("vnic_rm", name=overlay, mac=mac)
    except VarpdRefused as exc:
        if exc.varpd_code != "not_found":
            raise


def _detach(api: PortolanClient, conf: NetConf, env: Env, macs: list[str]) -> None:
    """Remove the VNICs ``macs`` of this container everywhere: varpd, kernel, portolan."""
    if not macs:
        return
    with _varpd(conf) as varpd:
        for mac in macs:
            _varpd_remove(varpd, conf.overlay, mac)
    for mac in macs:
        netlink.delete_link(env.netns, env.ifname, mac)
        api.delete_vnic(mac)


def _prev_mac(conf: NetConf, ifname: str) -> str | None:
    for iface in (conf.prev_result or {}).get("interfaces") or []:
        if isinstance(iface, dict) and iface.get("name") == ifname and iface.get("mac"):
            return str(iface["mac"]).lower()
    return None


def cmd_add(conf: NetConf, env: Env) -> dict[str, Any]:
    if not os.path.exists(env.netns):
        raise CniError(UNKNOWN_CONTAINER, f"CNI_NETNS {env.netns} does not exist")
    if netlink.link_exists(env.netns, env.ifname):
        raise CniError(NETLINK_ERROR, f"{env.ifname} already exists in {env.netns}")
    tags, firewall = vnic_attributes(conf, env)
    with _api(conf) as api:
        network = api.network(conf.network_uuid)
        stale = [v["mac"] for v in api.find_vnics(
            conf.network_uuid, conf.cn_uuid, env.container_id, env.ifname)]  # fmt: skip
        _detach(api, conf, env, stale)  # a retried ADD after a crash: start clean
        with _varpd(conf) as varpd:
            undo: list[Callable[[], object]] = []
            try:
                return _add_steps(conf, env, api, varpd, network, tags, firewall, undo)
            except BaseException as exc:
                failures = []
                for step in reversed(undo):
                    try:
                        step()
                    except Exception as undo_exc:
                        failures.append(str(undo_exc))
                if failures and isinstance(exc, CniError):
                    exc.details = "; ".join([exc.details, "cleanup failed: ", *failures])
                raise


def _add_steps(
    conf: NetConf,
    env: Env,
    api: PortolanClient,
    varpd: VarpdClient,
    network: dict[str, Any],
    tags: dict[str, Any],
    firewall: bool,
    undo: list[Callable[[], object]],
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "network_uuid": conf.network_uuid,
        "cn_uuid": conf.cn_uuid,
        "belongs_to_uuid": conf.belongs_to(env.container_id),
        "tags": tags,
        "firewall_enabled": firewall,
    }
    if conf.owner_uuid:
        body["owner_uuid"] = conf.owner_uuid
    vnic = api.create_vnic(body)
    mac = str(vnic["mac"]).lower()
    undo.append(lambda: api.delete_vnic(mac))
    if not vnic.get("ip"):
        raise CniError(INVALID_CONFIG, f"portolan gave VNIC {mac} no address")

    wanted = tap_name(mac)
    reply = varpd.call("vnic_add", name=conf.overlay, mac=mac, tap=wanted) or {}
    undo.append(lambda: _varpd_remove(varpd, conf.overlay, mac))
    link = reply.get("ifname") or reply.get("tap") or wanted

    undo.append(lambda: netlink.delete_link(env.netns, env.ifname, mac))
    undo.append(lambda: netlink.delete_link(env.netns, link, mac))
    if not netlink.link_exists(env.netns, link):
        netlink.move_link(conf.varpd_netns or varpd.peer_netns(), link, env.netns)
    prefixlen = ipaddress.ip_network(network["subnet"], strict=False).prefixlen
    address = f"{vnic['ip']}/{prefixlen}"
    gateway = network.get("gateway")
    netlink.configure(
        env.netns, link, ifname=env.ifname, mac=mac, mtu=conf.mtu, address=address,
        gateway=gateway,
    )  # fmt: skip
    return add_result(
        conf.version, ifname=env.ifname, mac=mac, sandbox=env.netns, address=address,
        gateway=gateway, dns=conf.dns,
    )  # fmt: skip


def cmd_del(conf: NetConf, env: Env) -> None:
    with _api(conf) as api:
        macs = [str(v["mac"]).lower() for v in api.find_vnics(
            conf.network_uuid, conf.cn_uuid, env.container_id, env.ifname)]  # fmt: skip
        prev = _prev_mac(conf, env.ifname)
        if prev and prev not in macs:
            macs.append(prev)
        _detach(api, conf, env, macs)
    return None


def _fail(text: str) -> CniError:
    return CniError(CHECK_FAILED, text)


def cmd_check(conf: NetConf, env: Env) -> None:
    prev = conf.prev_result
    if not prev:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the network configuration")
    mac = _prev_mac(conf, env.ifname)
    if mac is None:
        raise _fail(f"prevResult has no interface {env.ifname}")
    addresses = [ip.get("address") for ip in prev.get("ips") or [] if isinstance(ip, dict)]
    gateways = [r.get("gw") for r in prev.get("routes") or [] if isinstance(r, dict)]
    with _api(conf) as api:
        vnic = api.vnic(mac)
    if vnic is None:
        raise _fail(f"portolan has no VNIC {mac}")
    vtags = vnic.get("tags") or {}
    if vtags.get("cni.container_id") != env.container_id or vnic.get("cn_uuid") != conf.cn_uuid:
        raise _fail(f"portolan's VNIC {mac} belongs to another container or compute node")
    if not any(str(a).split("/")[0] == vnic.get("ip") for a in addresses):
        raise _fail(f"portolan's VNIC {mac} has address {vnic.get('ip')}, not {addresses}")
    with _varpd(conf) as varpd:
        held = varpd.call("vnic_list", name=conf.overlay) or []
    if mac not in [str(v.get("mac", "")).lower() for v in held]:
        raise _fail(f"varpd holds no VNIC {mac} on {conf.overlay}")
    state = netlink.inspect(env.netns, env.ifname)
    if state is None:
        raise _fail(f"no interface {env.ifname} in {env.netns}")
    if str(state["mac"]).lower() != mac:
        raise _fail(f"{env.ifname} has MAC {state['mac']}, not {mac}")
    if not state["up"]:
        raise _fail(f"{env.ifname} is down")
    if state["mtu"] != conf.mtu:
        raise _fail(f"{env.ifname} has MTU {state['mtu']}, not {conf.mtu}")
    for address in addresses:
        if str(ipaddress.ip_interface(address)) not in state["addresses"]:
            raise _fail(f"{env.ifname} lacks address {address} (has {state['addresses']})")
    for gw in gateways:
        if gw and gw not in state["gateways"]:
            raise _fail(f"no default route through {gw} on {env.ifname}")
    return None


def cmd_version(version: str) -> dict[str, Any]:
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


COMMANDS: dict[str, Callable[[NetConf, Env], dict[str, Any] | None]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
}


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """One plugin invocation: (exit status, JSON document to print or None)."""
    version = config_version(stdin) if stdin.strip() else SPEC_VERSION
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, cmd_version(version)
        conf = parse_config(stdin, env.command)
        return 0, COMMANDS[env.command](conf, env)
    except CniError as exc:
        return 1, exc.document(version)
    except Exception as exc:  # a bug or an unforeseen failure: still the spec's error shape
        err = CniError(IO_FAILURE, f"{type(exc).__name__}: {exc}")
        return 1, err.document(version)


_MAIN_PID = 0


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT from a runtime giving up: unwind through ADD's undo steps.

    pyroute2's ``NetNS`` forks helper processes that inherit this handler and are stopped
    with SIGTERM; in them the signal keeps its default meaning."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise CniError(TRY_AGAIN_LATER, f"interrupted by signal {signum}")


def main() -> int:
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    status, doc = run(os.environ, sys.stdin.buffer.read())
    if doc is not None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
