"""KernelFirewallService (the daemon's side) with a fake nftables driver: coalescing, port
names derived from the policy, the driver's names winning, retry after a refused batch."""

from __future__ import annotations

from typing import Any

import trio

from protocol.addr import parse_mac
from protocol.fwpolicy import from_json
from varpd.firewall.kernel import KernelFirewall, NftError
from varpd.firewall.kernel.service import KernelFirewallService
from varpd.linux import names

MAC = "02:00:00:00:00:01"


class FakeDriver:
    backend = "fake"
    netns = None

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail = 0

    def run(self, commands: list[dict[str, Any]]) -> None:
        if self.fail:
            self.fail -= 1
            raise NftError("refused (test)")
        self.batches.append(commands)

    def query(self, command: str) -> list[dict[str, Any]]:
        return []


class Vnic:
    def __init__(self, mac: str, host: str) -> None:
        self.mac = parse_mac(mac)
        self.host_ifname = host
        self.bridge = None


def policy(generation: int) -> Any:
    rule = {"uuid": "r", "direction": "in", "action": "allow", "priority": 0,
            "protocol": "tcp", "ports": [[22, 22]], "peers": "any"}  # fmt: skip
    vnic = {"ips": ["10.0.0.1"], "vnet_id": 77, "rules": [rule] * (generation % 2)}
    doc = {"version": 1, "cn_uuid": "c", "generation": generation, "vnics": {MAC: vnic}}
    return from_json(doc)


def elements(batch: list[dict[str, Any]]) -> list[str]:
    out = []
    for cmd in batch:
        elem = cmd.get("add", {}).get("element")
        if elem and elem["name"] == "in_ports":
            out.append(elem["elem"][0][0])
    return out


async def test_policies_are_coalesced_and_ports_derived_then_reported():
    driver = FakeDriver()
    service = KernelFirewallService(KernelFirewall(driver, cut_flows=False), refresh=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        service.vnic_event("added", Vnic("02:00:00:00:00:09", "pvhunfiltered"))
        await trio.sleep(0.1)
        assert driver.batches == []  # no policy yet: nothing is installed
        for g in range(1, 6):
            service.submit(policy(g))
        await trio.sleep(0.2)
        assert service.applied_generation == 5
        assert len(driver.batches) == 1  # five policies, one transaction
        derived = names.host_name(77, parse_mac(MAC))
        assert elements(driver.batches[0]) == [derived]
        service.vnic_event("added", Vnic(MAC, "pvhactual"))
        await trio.sleep(0.2)
        assert elements(driver.batches[-1]) == ["pvhactual"]
        nursery.cancel_scope.cancel()


async def test_a_refused_batch_is_retried_with_a_full_rebuild():
    driver = FakeDriver()
    service = KernelFirewallService(KernelFirewall(driver, cut_flows=False), refresh=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        service.submit(policy(1))
        await trio.sleep(0.1)
        driver.fail = 1
        service.submit(policy(2))
        await trio.sleep(0.3)
        assert service.errors == 1 and service.applied_generation == 2
        assert service.kfw.counters["refused"] == 1
        assert service.kfw.counters["full_rebuilds"] == 2  # the first one, and the retry
        nursery.cancel_scope.cancel()
