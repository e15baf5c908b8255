"""A plugin that degrades its instance during start, before the device is associated (the
reported bug): the reason must reach the driver once associated, and survive activation."""

from __future__ import annotations

from typing import Any

import pytest

from varpd.daemon import Varpd
from varpd.plugins.svp import SvpOptions
from varpd.plugins.svp.remote import DNS_FAIL_MESSAGE
from varpd.shim.types import NotAssociated

HOST = "portolan.invalid"
DNS_MESSAGE = DNS_FAIL_MESSAGE.format(host=HOST)


async def no_addresses(host: str, port: int) -> list[Any]:
    return []  # the name resolves to nothing: the remote degrades (lasting DNS failure)


def svp_props(listen: str = "10.0.0.1") -> dict[str, object]:
    return {
        "vxlan/listen_ip": listen,
        "svp/host": HOST,
        "svp/port": 1296,
        "svp/underlay_ip": listen,
    }


def refuse_degrade_until_associated(v: Varpd, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the driver behave as illumos' OVERLAY_TARG_DEGRADE: ENXIO without a varpd."""
    driver = v.driver
    real = driver.degrade
    refused: list[str] = []

    def degrade(name: str, message: str) -> None:
        if not driver.status(name).associated:
            refused.append(name)
            raise NotAssociated(f"overlay {name} is not associated with a varpd")
        real(name, message)

    monkeypatch.setattr(driver, "degrade", degrade)
    return refused


async def test_degrade_during_start_is_applied_to_the_driver_once_associated(
    make_varpd: Any, monkeypatch: pytest.MonkeyPatch, until: Any
) -> None:
    async with make_varpd("d") as v:
        v.shared["svp:options"] = SvpOptions(resolver=no_addresses)
        refused = refuse_degrade_until_associated(v, monkeypatch)
        # The first instance starts the shared remote, whose DNS lookup then fails.
        await v.create("o0", 1, "svp", props=svp_props())
        await v.activate("o0")
        await until(lambda: v.driver.status("o0").degraded)
        # The second instance attaches to the already degraded remote: it is told during
        # plugin start, before its device is associated, and the driver refuses it then.
        await v.create("o1", 2, "svp", props=svp_props())
        shown = await v.activate("o1")
        assert "o1" in refused
        assert shown["state"] == "active" and shown["degraded"] and shown["reason"] == DNS_MESSAGE
        status = v.driver.status("o1")
        assert status.degraded and status.message == DNS_MESSAGE
        assert shown["device"]["status"] == "DEGRADED"
        assert [i["degraded"] for i in v.list()] == [True, True]


async def test_activation_keeps_the_plugins_reason_when_the_driver_took_it_early(
    make_varpd: Any, until: Any
) -> None:
    """Without the ENXIO refusal: a successful activation must not wipe a plugin's reason."""
    async with make_varpd("e") as v:
        v.shared["svp:options"] = SvpOptions(resolver=no_addresses)
        await v.create("o0", 1, "svp", props=svp_props())
        await v.activate("o0")
        await until(lambda: v.driver.status("o0").degraded)
        await v.create("o1", 2, "svp", props=svp_props())
        await v.activate("o1")
        assert v.show("o1")["reason"] == DNS_MESSAGE
        assert v.driver.status("o1").message == DNS_MESSAGE


async def test_daemon_reason_is_cleared_by_activation_but_the_plugin_reason_stays(
    make_varpd: Any, until: Any
) -> None:
    async with make_varpd("f") as v:
        v.shared["svp:options"] = SvpOptions(resolver=no_addresses)
        await v.create("o0", 1, "svp", props=svp_props())
        await v.activate("o0")
        await until(lambda: v.driver.status("o0").degraded)
        inst = v.instances["o0"]
        inst.set_failure("activation failed: something")
        assert v.show("o0")["reason"] == "activation failed: something"
        inst.clear_failure()
        assert v.show("o0")["reason"] == DNS_MESSAGE
        assert v.driver.status("o0").message == DNS_MESSAGE


async def test_deleting_a_degraded_instance_updates_the_gauge(
    make_varpd: Any, metric: Any, until: Any
) -> None:
    async with make_varpd("g") as v:
        v.shared["svp:options"] = SvpOptions(resolver=no_addresses)
        await v.create("o0", 1, "svp", props=svp_props())
        await v.activate("o0")
        await until(lambda: metric(v, "varpd_degraded_instances") == 1)
        await v.delete("o0")
        assert metric(v, "varpd_degraded_instances") == 0
