"""Stopping varpd keeps the TAP devices tenants use; the next varpd re-attaches to them.

Before, a stopped varpd closed every TAP fd, which deletes the link wherever it is: a tenant
whose TAP had been moved into its namespace lost its interface (and addresses) on a restart.
Removing a VNIC still deletes its TAP.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.e2e import netns
from varpd.shim.tap import TapPort
from varpd.shim.udp import UdpBackend

pytestmark = pytest.mark.netns

PREFIX = "h13k"
MAC = bytes.fromhex("02000000d001")
PEER = bytes.fromhex("02000000d002")
TAP = "h13tap0"


def _sweep() -> None:
    listed = netns.run("ip", "netns", "list", check=False).stdout.split()
    for name in listed:
        if name.startswith(PREFIX):
            netns.run("ip", "netns", "del", name, check=False)


@pytest.fixture
def spaces() -> Iterator[tuple[str, str]]:
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    _sweep()
    tag = uuid.uuid4().hex[:6]
    cn, tenant = f"{PREFIX}cn{tag}", f"{PREFIX}ten{tag}"
    try:
        netns.run("ip", "netns", "add", cn)
        netns.run("ip", "netns", "add", tenant)
        yield cn, tenant
    finally:
        netns.run("ip", "netns", "del", cn, check=False)
        netns.run("ip", "netns", "del", tenant, check=False)


def link_exists(ns: str, name: str) -> bool:
    return netns.run("ip", "-n", ns, "link", "show", name, check=False).returncode == 0


def frame(payload: bytes) -> bytes:
    return MAC + PEER + b"\x88\xb5" + payload  # local experimental ethertype


def tenant_socket(tenant: str) -> socket.socket:
    with netns.in_netns(tenant):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        sock.bind((TAP, 0))
    sock.settimeout(5)
    return sock


async def open_port(backend: UdpBackend, cn: str) -> TapPort:
    with netns.in_netns(cn):
        return backend.tap_port(TAP, "o0", MAC, 0, mtu=1400)


async def test_a_restart_keeps_the_tenants_tap_and_reattaches(
    spaces: tuple[str, str], nursery: Any
) -> None:
    cn, tenant = spaces
    # varpd #1 makes the TAP; the orchestrator moves it into the tenant and addresses it
    async with trio.open_nursery() as first:
        backend = UdpBackend()
        await first.start(backend.run)
        port = await open_port(backend, cn)
        port.attach(lambda f: None)
        netns.run("ip", "-n", cn, "link", "set", TAP, "netns", tenant)
        netns.run("ip", "-n", tenant, "addr", "add", "192.168.77.1/24", "dev", TAP)
        netns.run("ip", "-n", tenant, "link", "set", TAP, "up")
        first.cancel_scope.cancel()  # varpd stops
    assert link_exists(tenant, TAP), "the tenant lost its interface when varpd stopped"
    addr = netns.run("ip", "-n", tenant, "-o", "addr", "show", "dev", TAP).stdout
    assert "192.168.77.1/24" in addr

    # varpd #2 re-attaches to the same link, in the tenant's namespace
    backend2 = UdpBackend()
    await nursery.start(backend2.run)
    port2 = await open_port(backend2, cn)
    assert not link_exists(cn, TAP)  # no second link was made in varpd's namespace
    got: list[bytes] = []
    port2.attach(got.append)
    sock = tenant_socket(tenant)
    try:
        # tenant -> varpd
        with trio.fail_after(10):
            while not any(b"from-tenant" in f for f in got):
                await trio.to_thread.run_sync(sock.send, frame(b"from-tenant"))
                await trio.sleep(0.05)
        # varpd -> tenant
        assert port2.deliver(PEER + MAC + b"\x88\xb5" + b"to-tenant")
        data = await trio.to_thread.run_sync(sock.recv, 2048)
        assert data.endswith(b"to-tenant")
    finally:
        sock.close()
    # removing the VNIC (detach) still deletes the link
    port2.detach()
    assert not link_exists(tenant, TAP)


async def test_a_tap_left_in_varpds_namespace_is_reattached_and_reconfigured(
    spaces: tuple[str, str],
) -> None:
    cn, _ = spaces
    async with trio.open_nursery() as first:
        backend = UdpBackend()
        await first.start(backend.run)
        await open_port(backend, cn)
        first.cancel_scope.cancel()
    assert link_exists(cn, TAP)
    async with trio.open_nursery() as second:
        backend = UdpBackend()
        await second.start(backend.run)
        port = await open_port(backend, cn)
        shown = netns.run("ip", "-n", cn, "-o", "link", "show", TAP).stdout
        assert "02:00:00:00:d0:01" in shown and "mtu 1400" in shown
        port.close()
        assert not link_exists(cn, TAP)  # not persistent any more while varpd runs
        second.cancel_scope.cancel()
    assert os.path.exists("/dev/net/tun")
