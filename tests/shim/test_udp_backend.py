"""The udp backend: real sockets on loopback, TAP ports, and interop with Linux kernel vxlan.

The loopback tests need nothing special. The interop test builds, in namespaces of its own::

    [guest ns: TAP vnic0 192.168.77.1]   [peer ns: kernel vxlan vx0 192.168.77.2]
            ^ fd (moved here)                    | id VNET, dstport 4789, nolearning,
    [cn ns: our OverlayDriver + UdpBackend]      | fdb: VNIC MAC -> 10.77.0.1, tx csum off
            10.77.0.1 ---------------- veth ---- 10.77.0.2

and shows ping both ways plus a UDP exchange (inner UDP checksums are what the offload gotcha
breaks) across our encapsulation and the kernel's.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import pytest
import trio

from protocol import vxlan
from tests.e2e import netns
from tests.shim.shimnet import frame
from varpd.shim import AddressInUse, OverlayDriver, Point, ShimError, TargetMode
from varpd.shim.tap import TapPort
from varpd.shim.types import NotRunning
from varpd.shim.udp import UdpBackend

LO = Point.of("127.0.0.1", 0)
MAC_G = bytes.fromhex("020000007701")
MAC_K = bytes.fromhex("020000007702")
VNET = 7077


def lo_point(port: int) -> Point:
    return Point.of("127.0.0.1", port)


async def bound_backend(nursery: trio.Nursery, **kw: int) -> tuple[UdpBackend, Point, list]:
    """A running backend receiving on 127.0.0.1:<free port>; returns (backend, listen, got)."""
    backend = UdpBackend(**kw)
    await nursery.start(backend.run)
    got: list[tuple[bytes, Point]] = []
    port = free_udp_port()
    listen = lo_point(port)
    await backend.bind(listen, lambda payload, src: got.append((payload, src)))
    return backend, listen, got


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# ------------------------------------------------------------------------------ loopback


async def test_datagrams_arrive_with_the_pool_socket_as_outer_source(nursery):
    a, a_listen, _ = await bound_backend(nursery)
    b, b_listen, got = await bound_backend(nursery)
    assert a.send(a_listen, b_listen, b"payload", flow_hash=12345)
    await wait_for(lambda: got)
    payload, src = got[0]
    assert payload == b"payload"
    assert src.ip == a_listen.ip
    assert src.port in a.source_ports(a_listen)
    assert a.counters["tx_datagrams"] == 1 and b.counters["rx_datagrams"] == 1


async def test_an_ipv6_underlay_uses_inet6_sockets(nursery):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    backend = UdpBackend(pool_size=2)
    await nursery.start(backend.run)
    listen = Point.of("::1", port)
    got: list[tuple[bytes, Point]] = []
    await backend.bind(listen, lambda payload, src: got.append((payload, src)))
    assert backend.send(listen, listen, b"six", flow_hash=1)
    # a socket bound to ::1 cannot reach an IPv4 peer: refused and counted, not raised
    assert not backend.send(listen, Point.of("127.0.0.1", 4789), b"four", flow_hash=1)
    assert backend.counters["tx_errors"] == 1
    await wait_for(lambda: got)
    assert got[0][0] == b"six"
    assert got[0][1].ip == listen.ip and got[0][1].port in backend.source_ports(listen)


async def test_flows_spread_over_the_pool_and_one_flow_keeps_its_port(nursery):
    a, a_listen, _ = await bound_backend(nursery)
    _, b_listen, got = await bound_backend(nursery)
    assert len(a.source_ports(a_listen)) == 8
    for h in range(64):
        assert a.send(a_listen, b_listen, h.to_bytes(4, "big"), vxlan.flow_hash(bytes([h]) * 60))
    for _ in range(5):
        assert a.send(a_listen, b_listen, b"same", flow_hash=777)
    await wait_for(lambda: len(got) == 69)
    ports = {src.port for payload, src in got if payload != b"same"}
    assert len(ports) >= 5  # 64 flows over 8 sockets
    assert len({src.port for payload, src in got if payload == b"same"}) == 1


async def test_send_refuses_what_it_cannot_take_without_raising(nursery):
    a, a_listen, _ = await bound_backend(nursery)
    assert not a.send(lo_point(1), a_listen, b"x", 0)
    assert a.counters["tx_no_listener"] == 1
    assert not a.send(a_listen, Point.of("fd00::1", 4789), b"x", 0)
    assert a.counters["tx_drop_family"] == 1
    too_big = b"x" * 70000
    assert not a.send(a_listen, a_listen, too_big, 0)
    assert a.counters["tx_errors"] == 1


async def test_bind_refuses_a_taken_address_and_needs_run(nursery):
    a, a_listen, _ = await bound_backend(nursery)
    with pytest.raises(AddressInUse):
        await a.bind(a_listen, lambda p, s: None)
    other = UdpBackend()
    await nursery.start(other.run)
    with pytest.raises(AddressInUse):
        await other.bind(a_listen, lambda p, s: None)
    with pytest.raises(NotRunning):
        await UdpBackend().bind(lo_point(free_udp_port()), lambda p, s: None)


async def test_unbind_closes_the_socket_and_the_address_can_be_bound_again(nursery):
    a, a_listen, _ = await bound_backend(nursery)
    await a.unbind(a_listen)
    await a.unbind(a_listen)  # idempotent
    assert a.bound() == []
    got = []
    await a.bind(a_listen, lambda p, s: got.append(p))
    assert a.send(a_listen, a_listen, b"again", 1)
    await wait_for(lambda: got == [b"again"])


async def test_a_burst_is_drained_in_batches_and_a_raising_receiver_is_survived(nursery):
    backend = UdpBackend()
    await nursery.start(backend.run)
    listen = lo_point(free_udp_port())
    got: list[bytes] = []

    def receiver(payload: bytes, src: Point) -> None:
        if payload == b"boom":
            raise RuntimeError("receiver bug")
        got.append(payload)

    await backend.bind(listen, receiver)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"boom", ("127.0.0.1", listen.port))
        for i in range(1000):  # all queued before the receive task runs again
            s.sendto(i.to_bytes(4, "big"), ("127.0.0.1", listen.port))
    await wait_for(lambda: len(got) == 1000)
    assert got == [i.to_bytes(4, "big") for i in range(1000)]
    assert backend.counters["rx_receiver_errors"] == 1


async def test_an_fd_port_reads_guest_frames_in_batches_and_delivers_without_blocking(nursery):
    backend = UdpBackend()
    await nursery.start(backend.run)
    guest, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    port = backend.fd_port(ours.detach(), "pair")
    seen: list[bytes] = []
    port.attach(seen.append)

    def feed() -> None:
        for i in range(300):
            guest.send(b"frame%d" % i)  # blocks while the reader is behind

    await trio.to_thread.run_sync(feed)
    await wait_for(lambda: len(seen) == 300)
    assert seen[0] == b"frame0" and seen[-1] == b"frame299"
    assert port.deliver(b"to the guest")
    assert guest.recv(100) == b"to the guest"
    while port.deliver(b"y" * 1000):  # fill the guest's queue: refused, not blocked
        pass
    assert port.counters["tx_drop_full"] == 1
    port.detach()
    assert port.closed
    guest.close()


async def test_two_drivers_exchange_frames_over_real_udp(nursery):
    """Guest A -> driver A -> UDP on loopback -> driver B -> guest B, in POINT mode."""
    ports = {}
    guests = {}
    drivers = {}
    for name in ("a", "b"):
        ports[name] = free_udp_port()
    for name, peer in (("a", "b"), ("b", "a")):
        backend = UdpBackend()
        driver = OverlayDriver(backend)
        await nursery.start(driver.run)
        driver.create_device("o0", VNET)
        driver.set_prop("o0", "vxlan/listen_ip", "127.0.0.1")
        driver.set_prop("o0", "vxlan/listen_port", ports[name])
        driver.associate("o0", 1, TargetMode.POINT, lo_point(ports[peer]))
        await driver.activate("o0")
        guest, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        guest.settimeout(5)
        mac = MAC_G if name == "a" else MAC_K
        driver.add_vnic("o0", mac, 0, backend.fd_port(ours.detach(), f"guest-{name}"))
        guests[name], drivers[name] = guest, driver
    sent = frame(MAC_G, MAC_K, b"over the wire")
    guests["a"].send(sent)
    assert await trio.to_thread.run_sync(guests["b"].recv, 2000) == sent
    back = frame(MAC_K, MAC_G, b"and back")
    guests["b"].send(back)
    assert await trio.to_thread.run_sync(guests["a"].recv, 2000) == back
    for g in guests.values():
        g.close()


# ------------------------------------------------------------------------------ kernel interop

UL_OURS, UL_KERNEL = "10.77.0.1", "10.77.0.2"
IP_GUEST, IP_KERNEL = "192.168.77.1", "192.168.77.2"


@pytest.fixture
def lab():
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    lab = netns.Lab("u")
    try:
        yield lab
    finally:
        lab.close()


def mac_text(mac: bytes) -> str:
    return mac.hex(":")


@pytest.mark.netns
async def test_interop_with_a_linux_kernel_vxlan_device(lab, nursery):
    cn, peer, guest = lab.ns("cn"), lab.ns("peer"), lab.ns("guest")
    lab.veth(cn, "ul0", peer, "ul1")
    lab.addr(cn, "ul0", f"{UL_OURS}/24")
    lab.addr(peer, "ul1", f"{UL_KERNEL}/24")
    # the kernel side: vxlan with a static fdb entry for our VNIC, checksum offload off
    netns.run("ip", "-n", peer, "link", "add", "vx0", "address", mac_text(MAC_K), "type",
              "vxlan", "id", str(VNET), "local", UL_KERNEL, "dev", "ul1", "dstport", "4789",
              "nolearning")  # fmt: skip
    netns.run("bridge", "-n", peer, "fdb", "append", "00:00:00:00:00:00", "dev", "vx0",
              "dst", UL_OURS)  # fmt: skip
    netns.run("bridge", "-n", peer, "fdb", "add", mac_text(MAC_G), "dev", "vx0", "dst", UL_OURS)
    netns.txcsum_off(peer, "vx0")
    lab.addr(peer, "vx0", f"{IP_KERNEL}/24")
    netns.run("ip", "-n", peer, "link", "set", "vx0", "mtu", "1400", "up")

    # our side: driver + udp backend in the cn namespace, everything towards the kernel
    backend = UdpBackend()
    driver = OverlayDriver(backend)
    await nursery.start(driver.run)
    driver.create_device("o0", VNET)
    driver.set_prop("o0", "vxlan/listen_ip", UL_OURS)
    driver.associate("o0", 1, TargetMode.POINT, Point.of(UL_KERNEL, 4789))
    with netns.in_netns(cn):
        await driver.activate("o0")
        port = backend.tap_port("vnic0", "o0", MAC_G, 0, mtu=1400)
    assert isinstance(port, TapPort)
    vnic = driver.add_vnic("o0", MAC_G, 0, port)
    # the orchestrator's step: move the TAP into the guest and address it there
    netns.run("ip", "-n", cn, "link", "set", "vnic0", "netns", guest)
    lab.addr(guest, "vnic0", f"{IP_GUEST}/24")
    netns.run("ip", "-n", guest, "link", "set", "vnic0", "up")
    shown = netns.run("ip", "-n", guest, "-o", "link", "show", "vnic0").stdout
    assert mac_text(MAC_G) in shown and "mtu 1400" in shown

    # our encap parsed by the kernel, the kernel's decapped by us: both directions
    ok, out = await trio.to_thread.run_sync(lambda: netns.ping(guest, IP_KERNEL))
    assert ok, out
    ok, out = await trio.to_thread.run_sync(lambda: netns.ping(peer, IP_GUEST))
    assert ok, out
    # inner UDP with checksums (what TX checksum offload on the kernel side would break)
    echo = lab.popen(peer, [sys.executable, "-c", netns.UDP_ECHO, IP_KERNEL, "7007"])
    await trio.to_thread.run_sync(netns.wait_for_line, echo, "READY")
    reply = await trio.to_thread.run_sync(
        lambda: netns.udp_exchange(guest, IP_KERNEL, 7007, "hello kernel")
    )
    assert reply == "echo:hello kernel"

    mux_rx = sum(m["rx_datagrams"] for m in driver.metrics()["muxes"].values())
    assert mux_rx > 0 and backend.counters["rx_datagrams"] == mux_rx
    assert backend.counters["tx_datagrams"] > 0
    assert vnic.counters["tx_frames"] > 0 and vnic.counters["rx_frames"] > 0
    assert backend.counters["tx_errors"] == 0 and backend.counters["rx_errors"] == 0

    # removing the VNIC closes the TAP: the link disappears from the guest namespace
    driver.remove_vnic("o0", MAC_G)
    gone = netns.run("ip", "-n", guest, "link", "show", "vnic0", check=False)
    assert gone.returncode != 0


@pytest.mark.netns
async def test_tap_creation_errors_are_shim_errors(lab):
    cn = lab.ns("cn")
    backend = UdpBackend()
    with netns.in_netns(cn):
        port = backend.tap_port("vnicx", "o0", MAC_G, 0)
        try:
            # a second fd cannot take a TAP that is in use
            with pytest.raises(ShimError) as info:
                backend.tap_port("vnicx", "o0", MAC_G, 0)
        finally:
            port.close()
    assert getattr(info.value, "code", None) == errno.errorcode[errno.EBUSY]
    assert subprocess.run(["ip", "-n", cn, "link", "show", "vnicx"],
                          capture_output=True).returncode != 0  # fmt: skip
