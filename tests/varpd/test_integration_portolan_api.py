"""End to end with the real portolan: Directory on SQLite, its SVP server and its management API
served in-process (hypercorn on trio), two varpd daemons on one memory underlay using the svp
plugin for lookups and long-polling the API for their firewall policy.

Firewall changes go through the API (``PUT /vnics/{mac}``, ``POST /rules``, ``DELETE
/rules/{uuid}``), exactly as an operator would make them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from varpd.daemon import Varpd

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("portolan.api.rules") is None,
    reason="portolan's firewall routes (portolan/api/rules.py) are not there yet",
)

OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
CN_A = "00000000-0000-4000-8000-0000000000a1"
CN_B = "00000000-0000-4000-8000-0000000000b1"
MAC_A, MAC_B = "02:00:00:00:01:0a", "02:00:00:00:01:0b"
IP_A, IP_B = "192.168.8.1", "192.168.8.2"
VNET = 310
TOKEN = "integration-secret"
BOUND = 5.0


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def tcp(
    src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int, flags: str = "S"
) -> bytes:
    return bytes(
        Ether(src=src[0], dst=dst[0])
        / IP(src=src[1], dst=dst[1])
        / TCP(sport=sport, dport=dport, flags=flags)
    )


def udp(src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int) -> bytes:
    return bytes(
        Ether(src=src[0], dst=dst[0]) / IP(src=src[1], dst=dst[1]) / UDP(sport=sport, dport=dport)
    )


A, B = (MAC_A, IP_A), (MAC_B, IP_B)


def delivered(sender: Varpd, src_mac: str, receiver: Varpd, dst_mac: str, frame: bytes) -> bool:
    """Synchronous once the sender's target cache knows the destination."""
    inbox = receiver.vnic("o0", dst_mac).port
    inbox.received()
    sender.vnic("o0", src_mac).port.send_nowait(frame)
    return frame in inbox.received()


async def warm(sender: Varpd, src_mac: str, receiver: Varpd, dst_mac: str, dst_ip: str) -> None:
    """Resolve ``dst_mac`` in the sender's cache (one svp lookup) so later sends are synchronous."""
    sender.vnic("o0", src_mac).port.send_nowait(udp((src_mac, "0.0.0.0"), (dst_mac, dst_ip), 9, 9))
    await wait_until(lambda: _cached(sender, dst_mac))
    receiver.vnic("o0", dst_mac).port.received()


def _cached(v: Varpd, mac: str) -> bool:
    try:
        return "valid" in v.cache_get("o0", mac)["flags"]
    except Exception:
        return False


async def test_firewall_rules_made_through_the_api_are_enforced_by_varpd(
    tmp_path: Path, nursery: trio.Nursery, make_varpd: Any
) -> None:
    from portolan.api import create_app, serve_api
    from portolan.metrics import PortolanMetrics
    from portolan.service import Directory
    from portolan.svp_server import SvpServer

    directory = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    try:
        await directory.put_cn(CN_A, "10.0.0.1", 4789)
        await directory.put_cn(CN_B, "10.0.0.2", 4789)
        net = await directory.create_network(
            name="fwnet", owner_uuid=OWNER, vnet_id=VNET, vlan_id=0, subnet="192.168.8.0/24"
        )
        for mac, ip, cn in ((MAC_A, IP_A, CN_A), (MAC_B, IP_B, CN_B)):
            await directory.create_vnic(
                network_uuid=net.uuid,
                cn_uuid=cn,
                mac=bytes.fromhex(mac.replace(":", "")),
                ip=ip,
                owner_uuid=OWNER,
            )
        _, svp_port = await nursery.start(
            SvpServer(directory, metrics=PortolanMetrics()).serve, "127.0.0.1", 0
        )
        app = create_app(directory, token=TOKEN)
        host, api_port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        api_url = f"http://{host}:{api_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}

        common = {"portolan_api": api_url, "portolan_api_token": TOKEN, "firewall": {"wait": 5}}
        async with (
            httpx.AsyncClient(base_url=api_url, headers=auth, timeout=10) as api,
            make_varpd("a", cn_uuid=CN_A, **common) as a,
            make_varpd("b", cn_uuid=CN_B, **common) as b,
        ):
            for node, listen, mac in ((a, "10.0.0.1", MAC_A), (b, "10.0.0.2", MAC_B)):
                props = {
                    "vxlan/listen_ip": listen,
                    "svp/host": "127.0.0.1",
                    "svp/port": svp_port,
                    "svp/underlay_ip": listen,
                }
                await node.create("o0", VNET, "svp", props=props, vnics=[{"mac": mac}])
                await node.activate("o0")
            await wait_until(lambda: a.firewall.generation is not None)
            await wait_until(lambda: b.firewall.generation is not None)
            await warm(a, MAC_A, b, MAC_B, IP_B)
            await warm(b, MAC_B, a, MAC_A, IP_A)

            # Firewall off: everything passes.
            assert b.vnic("o0", MAC_B).filter is None
            assert delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40000, 80))

            # Enable B's firewall through the API: inbound is blocked by default.
            r = await api.put(f"/vnics/{MAC_B}", json={"firewall_enabled": True})
            assert r.status_code == 200, r.text
            await wait_until(lambda: b.vnic("o0", MAC_B).filter is not None, timeout=BOUND)
            assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40001, 80))

            # An ALLOW rule: traffic to port 80 passes within the bound.
            r = await api.post(
                "/rules",
                json={
                    "rule": "FROM any TO all vms ALLOW tcp PORT 80",
                    "owner_uuid": OWNER,
                    "enabled": True,
                },
            )
            assert r.status_code in (200, 201, 202), r.text
            rule_uuid = r.json()["uuid"]
            with trio.fail_after(BOUND):
                while not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40002, 80)):
                    await trio.sleep(0.02)
            assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40003, 22))

            # Replies to B's own outbound connections pass; unsolicited ones do not.
            assert delivered(b, MAC_B, a, MAC_A, tcp(B, A, 50000, 22))
            assert delivered(a, MAC_A, b, MAC_B, tcp(A, B, 22, 50000, "SA"))
            assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 22, 50001, "SA"))

            # Delete the rule: port 80 is blocked again.
            r = await api.delete(f"/rules/{rule_uuid}")
            assert r.status_code in (200, 204), r.text
            with trio.fail_after(BOUND):
                while delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40004, 80)):
                    await trio.sleep(0.02)

            status = b.firewall_status()
            assert status["state"] in ("polling", "fetching") and status["last_error"] is None
            (row,) = status["vnics"]
            assert row["filtered"] and row["rules_in"] == 0
            assert a.vnic("o0", MAC_A).filter is None  # A's firewall was never enabled
    finally:
        await directory.aclose()
