"""Device lifecycle, properties, association, degrade/status, muxes (spec §1.2-§1.4, §2.5)."""

from __future__ import annotations

import errno

import pytest
import trio

from tests.shim.shimnet import A_IP, DEV, MAC_A1, VNET, A, start_node
from varpd.shim import (
    AddressInUse,
    AlreadyExists,
    DeviceBusy,
    InvalidArgument,
    MemoryUnderlay,
    NoSuchDevice,
    NoSuchEncap,
    NoSuchProperty,
    NotAssociated,
    NotSupported,
    OverlayDriver,
    Point,
    ReadOnlyProperty,
    ShimError,
    TargetMode,
)


@pytest.fixture
def driver(underlay: MemoryUnderlay) -> OverlayDriver:
    return OverlayDriver(underlay)


def test_create_defaults(driver):
    driver.create_device(DEV, VNET)
    assert driver.devices() == [DEV]
    assert driver.get_props(DEV) == {
        "mtu": 1400,
        "vnetid": VNET,
        "encap": "vxlan",
        "varpd/id": None,
        "vxlan/listen_ip": None,
        "vxlan/listen_port": 4789,
    }


def test_create_accepts_max_vnetid_but_setprop_does_not(driver):
    driver.create_device(DEV, 2**24 - 1)
    driver.create_device("o1", 5)
    with pytest.raises(InvalidArgument):
        driver.set_prop("o1", "vnetid", 2**24 - 1)
    with pytest.raises(InvalidArgument):
        driver.create_device("o2", 2**24)


def test_create_errors(driver):
    driver.create_device(DEV, 1)
    with pytest.raises(AlreadyExists) as info:
        driver.create_device(DEV, 2)
    assert info.value.code == "EEXIST" and info.value.errno == errno.EEXIST
    with pytest.raises(AlreadyExists):
        driver.create_device("other0", 1)  # (vnetid, encap) unique
    with pytest.raises(NoSuchEncap):
        driver.create_device("geneve0", 3, encap="geneve")
    with pytest.raises(InvalidArgument):
        driver.create_device("bad name", 4)
    with pytest.raises(InvalidArgument):
        driver.create_device("neg0", -1)


def test_setprop_vnetid_must_stay_unique(driver):
    driver.create_device("o0", 1)
    driver.create_device("o1", 2)
    with pytest.raises(AlreadyExists):
        driver.set_prop("o1", "vnetid", 1)
    driver.set_prop("o1", "vnetid", 3)
    assert driver.get_props("o1")["vnetid"] == 3


@pytest.mark.parametrize("mtu", [575, 8901, "x", -1])
def test_mtu_range(driver, mtu):
    driver.create_device(DEV, 1)
    with pytest.raises(InvalidArgument):
        driver.set_prop(DEV, "mtu", mtu)


def test_mtu_bounds_accepted(driver):
    driver.create_device(DEV, 1)
    driver.set_prop(DEV, "mtu", 576)
    driver.set_prop(DEV, "mtu", 8900)
    assert driver.get_props(DEV)["mtu"] == 8900


@pytest.mark.parametrize(
    "ip",
    [
        "::10.0.0.1",  # IPv4-compatible
        "ff02::1",  # IPv6 multicast
        "2002:a00:1::1",  # 6to4
        "::ffff:224.0.0.1",  # v4-mapped multicast
        "224.0.0.1",
        "not-an-ip",
        b"\x00" * 4,
        12,
    ],
)
def test_listen_ip_validation(driver, ip):
    driver.create_device(DEV, 1)
    with pytest.raises(InvalidArgument):
        driver.set_prop(DEV, "vxlan/listen_ip", ip)


@pytest.mark.parametrize("ip", ["10.0.0.1", "fd00::1", "::ffff:10.0.0.1", "::1"])
def test_listen_ip_accepted(driver, ip):
    driver.create_device(DEV, 1)
    driver.set_prop(DEV, "vxlan/listen_ip", ip)
    assert driver.get_props(DEV)["vxlan/listen_ip"] == ip.removeprefix("::ffff:")


@pytest.mark.parametrize("port", [0, 65536, -5])
def test_listen_port_range(driver, port):
    driver.create_device(DEV, 1)
    with pytest.raises(InvalidArgument):
        driver.set_prop(DEV, "vxlan/listen_port", port)


def test_unknown_and_read_only_props(driver):
    driver.create_device(DEV, 1)
    with pytest.raises(NoSuchProperty):
        driver.set_prop(DEV, "svp/host", "x")
    with pytest.raises(ReadOnlyProperty):
        driver.set_prop(DEV, "encap", "vxlan")
    with pytest.raises(ReadOnlyProperty):
        driver.set_prop(DEV, "varpd/id", 3)
    with pytest.raises(NoSuchDevice):
        driver.set_prop("nope0", "mtu", 1500)


async def test_activate_needs_listen_ip_then_association(driver):
    driver.create_device(DEV, 1)
    with pytest.raises(InvalidArgument, match="vxlan/listen_ip"):
        await driver.activate(DEV)
    driver.set_prop(DEV, "vxlan/listen_ip", A_IP)
    with pytest.raises(NotAssociated) as info:
        await driver.activate(DEV)
    assert info.value.code == "ENXIO"
    driver.associate(DEV, 7, TargetMode.DYNAMIC)
    await driver.activate(DEV)
    assert driver.status(DEV).state == "activated"
    assert driver.get_props(DEV)["varpd/id"] == 7
    with pytest.raises(AlreadyExists):
        await driver.activate(DEV)


async def test_props_fixed_after_activation(nursery, underlay):
    driver = await start_node(nursery, underlay, A_IP)
    for prop, value in [
        ("mtu", 1500),
        ("vnetid", 9),
        ("vxlan/listen_ip", "10.9.9.9"),
        ("vxlan/listen_port", 4790),
    ]:
        with pytest.raises(NotSupported) as info:
            driver.set_prop(DEV, prop, value)
        assert info.value.code == "ENOTSUP"
    assert driver.get_props(DEV)["mtu"] == 1400


async def test_delete_refused_while_vnics_exist(nursery, underlay):
    driver = await start_node(nursery, underlay, A_IP)
    driver.add_vnic(DEV, MAC_A1)
    with pytest.raises(DeviceBusy) as info:
        await driver.delete_device(DEV)
    assert info.value.code == "EBUSY"
    driver.remove_vnic(DEV, MAC_A1)
    await driver.delete_device(DEV)
    assert driver.devices() == []
    assert underlay.bound() == []
    with pytest.raises(NoSuchDevice):
        driver.status(DEV)


async def test_devices_share_a_mux_per_listen_address(nursery, underlay):
    driver = await start_node(nursery, underlay, A_IP, vnet=1, name="o1")
    driver.create_device("o2", 2)
    driver.set_prop("o2", "vxlan/listen_ip", A_IP)
    driver.associate("o2", 2, TargetMode.DYNAMIC)
    await driver.activate("o2")
    assert underlay.bound() == [A]
    muxes = driver.metrics()["muxes"]
    assert list(muxes) == ["10.0.0.1:4789"]
    await driver.delete_device("o1")
    assert underlay.bound() == [A]
    await driver.delete_device("o2")
    assert underlay.bound() == []


async def test_listen_address_bound_by_one_driver_only(nursery, underlay):
    await start_node(nursery, underlay, A_IP)
    with pytest.raises(AddressInUse):
        await start_node(nursery, underlay, A_IP, vnet=2)


async def test_per_driver_memory_backend_releases_addresses_when_stopped(underlay):
    driver = OverlayDriver(underlay.backend())
    async with driver.running():
        assert driver.is_running
        driver.create_device(DEV, 1)
        driver.set_prop(DEV, "vxlan/listen_ip", A_IP)
        driver.associate(DEV, 1, TargetMode.DYNAMIC)
        await driver.activate(DEV)
        assert underlay.bound() == [A]
    assert not driver.is_running
    assert underlay.bound() == []


def test_associate_rules(driver):
    driver.create_device(DEV, 1)
    with pytest.raises(InvalidArgument):
        driver.associate(DEV, 0, TargetMode.DYNAMIC)
    with pytest.raises(InvalidArgument):
        driver.associate(DEV, 1, TargetMode.NONE)
    with pytest.raises(InvalidArgument):
        driver.associate(DEV, 1, TargetMode.POINT)  # no point
    for bad in (Point.of("0.0.0.0", 4789), Point.of("::", 4789), Point.of("::10.0.0.1", 1)):
        with pytest.raises(InvalidArgument):
            driver.associate(DEV, 1, TargetMode.POINT, bad)
    with pytest.raises(InvalidArgument):
        driver.associate(DEV, 1, TargetMode.POINT, Point.of("10.0.0.2", 0))
    driver.associate(DEV, 1, TargetMode.POINT, Point.of("10.0.0.2", 4789))
    with pytest.raises(AlreadyExists):
        driver.associate(DEV, 1, TargetMode.DYNAMIC)
    driver.disassociate(DEV)
    with pytest.raises(NotAssociated):
        driver.disassociate(DEV)
    driver.associate(DEV, 2, TargetMode.DYNAMIC)
    status = driver.status(DEV)
    assert status.associated and status.varpd_id == 2 and status.mode == TargetMode.DYNAMIC


def test_degrade_and_restore(driver):
    driver.create_device("o0", 1)
    driver.create_device("o1", 2)
    driver.degrade("o0", "svp: cannot reach portolan " + "x" * 400)
    driver.degrade("o0", "second message")
    driver.degrade("o1", "dns failure")
    status = driver.status("o0")
    assert status.degraded and status.status == "DEGRADED" and status.message == "second message"
    assert driver.degraded_count == 2
    driver.restore("o0")
    status = driver.status("o0")
    assert not status.degraded and status.message == "" and status.status == "ONLINE"
    assert driver.degraded_count == 1
    driver.restore("o0")
    assert driver.degraded_count == 1
    driver.degrade("o0", "y" * 300)
    assert len(driver.status("o0").message) == 255


def test_errors_are_sentences_with_codes(driver):
    with pytest.raises(ShimError) as info:
        driver.status("missing0")
    assert info.value.code == "ENOENT" and "missing0" in info.value.message


async def test_driver_run_is_cancellable(underlay):
    driver = OverlayDriver(underlay)
    with trio.move_on_after(0.01):
        await driver.run()
    assert not driver.is_running
