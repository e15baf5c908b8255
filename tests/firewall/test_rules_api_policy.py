"""``GET /firewalls/cns/{cn}/policy`` over real HTTP: ETag/304, the long-poll woken by rule
and VNIC changes (and only for the CNs whose policy changed), and coherence with changes made
by another process (index reload, remote-change hook)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from portolan.firewall import rules as rulebook
from portolan.firewall.policy_service import PolicyService, policy_service_for
from portolan.index import IndexChange
from portolan.service import Directory
from protocol.fwpolicy import from_json
from tests.portolan.conftest_api import OWNER, TOKEN, ApiUnderTest, directory_and_api

WAKE_BOUND = 2.0  # generous; the goal (1 s) is measured by bench/


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiUnderTest]:
    async with directory_and_api(tmp_path, token=TOKEN) as api:
        yield api


def policy_path(cn: str) -> str:
    return f"/firewalls/cns/{cn}/policy"


async def fetch(api: ApiUnderTest, cn: str, etag: str | None = None, wait: float | None = None):
    headers = {"If-None-Match": etag} if etag else {}
    params = {"wait": wait} if wait is not None else None
    return await api.client.get(policy_path(cn), headers=headers, params=params)


async def setup(api: ApiUnderTest) -> dict[str, Any]:
    cns = [await api.cn(f"192.168.0.{i}") for i in (1, 2, 3)]
    net = await api.network()
    web = await api.vnic(
        net["uuid"], cns[0]["uuid"], owner_uuid=OWNER, tags={"role": "www"}, firewall_enabled=True
    )
    db = await api.vnic(
        net["uuid"], cns[1]["uuid"], owner_uuid=OWNER, tags={"role": "db"}, firewall_enabled=True
    )
    other = await api.vnic(net["uuid"], cns[2]["uuid"], owner_uuid=OWNER, firewall_enabled=True)
    return {"cns": [c["uuid"] for c in cns], "web": web, "db": db, "other": other}


def service(api: ApiUnderTest) -> PolicyService:
    return policy_service_for(api.directory)


async def until_waiting(api: ApiUnderTest, cn: str) -> None:
    """Let a long-poll reach its wait (white-box: its Event exists)."""
    with trio.fail_after(5):
        while cn not in service(api)._events:
            await trio.sleep(0.01)


class Poll:
    """A long-poll running in the background: ``response`` and ``when`` once it returns."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self.when: float | None = None
        self.done = trio.Event()

    async def run(self, api: ApiUnderTest, cn: str, etag: str, wait: float) -> None:
        self.response = await fetch(api, cn, etag, wait)
        self.when = trio.current_time()
        self.done.set()


async def current(api: ApiUnderTest, cn: str) -> tuple[str, dict[str, Any]]:
    r = await fetch(api, cn)
    assert r.status_code == 200, r.text
    return r.headers["etag"], r.json()


async def test_policy_document_etag_and_304(api: ApiUnderTest) -> None:
    s = await setup(api)
    cn1 = s["cns"][0]
    await api.post(
        "/rules",
        {"rule": "FROM tag role = www TO tag role = db ALLOW tcp PORT 5432", "owner_uuid": OWNER,
         "enabled": True},
    )  # fmt: skip
    etag, doc = await current(api, s["cns"][1])
    policy = from_json(doc)
    assert etag == f'"{policy.generation}"' and policy.cn_uuid == s["cns"][1]
    entry = policy.vnic(s["db"]["mac"])
    assert entry is not None and entry.ips == (s["db"]["ip"],)
    assert [(r.direction, r.action, r.ports, [str(p) for p in r.peers]) for r in entry.rules] == [
        ("in", "allow", ((5432, 5432),), [f"{s['web']['ip']}/32"])
    ]
    # web's side of the rule is a priority-0 outbound allow: a no-op, so no entries
    _, doc1 = await current(api, cn1)
    assert doc1["vnics"][s["web"]["mac"]]["rules"] == []

    not_modified = await fetch(api, s["cns"][1], etag)
    assert not_modified.status_code == 304 and not_modified.headers["etag"] == etag
    assert (await fetch(api, s["cns"][1], 'W/"0", ' + etag)).status_code == 304
    assert (await fetch(api, s["cns"][1], '"1"')).status_code == 200
    # an unknown CN: empty document, generation 0
    etag0, doc0 = await current(api, "0f0f0f0f-0000-4000-8000-000000000000")
    assert etag0 == '"0"' and doc0["vnics"] == {} and doc0["generation"] == 0
    bad = await fetch(api, cn1, wait=-1)
    assert bad.status_code == 422


async def test_long_poll_returns_304_when_the_wait_ends(api: ApiUnderTest) -> None:
    s = await setup(api)
    etag, _ = await current(api, s["cns"][0])
    start = trio.current_time()
    r = await fetch(api, s["cns"][0], etag, wait=0.5)
    elapsed = trio.current_time() - start
    assert r.status_code == 304 and r.headers["etag"] == etag
    assert 0.4 <= elapsed < 5


async def test_rule_change_wakes_only_the_cns_whose_policy_changed(api: ApiUnderTest) -> None:
    s = await setup(api)
    cn1, cn2, cn3 = s["cns"]
    tags = {cn: (await current(api, cn))[0] for cn in (cn1, cn2, cn3)}
    polls = {cn: Poll() for cn in (cn1, cn2, cn3)}
    async with trio.open_nursery() as nursery:
        for cn, poll in polls.items():
            nursery.start_soon(poll.run, api, cn, tags[cn], 30 if cn != cn3 else 3)
            await until_waiting(api, cn)
        changed_at = trio.current_time()
        r = await api.post(
            "/rules",
            {"rule": "FROM any TO tag role = www ALLOW tcp PORT 443", "owner_uuid": OWNER,
             "enabled": True},
        )  # fmt: skip
        assert r.status_code == 201
        rule_uuid = r.json()["uuid"]
        with trio.fail_after(WAKE_BOUND):
            await polls[cn1].done.wait()
        response = polls[cn1].response
        assert response is not None and response.status_code == 200
        assert polls[cn1].when is not None and polls[cn1].when - changed_at < WAKE_BOUND
        doc = response.json()
        assert response.headers["etag"] != tags[cn1]
        assert [e["uuid"] for e in doc["vnics"][s["web"]["mac"]]["rules"]] == [rule_uuid]

        # Now a rule that touches cn2 only: cn2's poll returns, cn3's keeps waiting.
        r = await api.post(
            "/rules",
            {"rule": "FROM any TO tag role = db ALLOW tcp PORT 5432", "owner_uuid": OWNER,
             "enabled": True},
        )  # fmt: skip
        with trio.fail_after(WAKE_BOUND):
            await polls[cn2].done.wait()
        assert polls[cn2].response is not None and polls[cn2].response.status_code == 200
        assert not polls[cn3].done.is_set()
        await polls[cn3].done.wait()  # its own 3 s wait ends: 304, never woken
        assert polls[cn3].response is not None and polls[cn3].response.status_code == 304
        assert polls[cn3].when is not None and polls[cn3].when - changed_at >= 2.5


async def test_vnic_move_wakes_both_cns(api: ApiUnderTest) -> None:
    s = await setup(api)
    cn1, cn2, cn3 = s["cns"]
    await api.post(
        "/rules",
        {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "owner_uuid": OWNER, "enabled": True},
    )
    tags = {cn: (await current(api, cn))[0] for cn in (cn1, cn3)}
    polls = {cn: Poll() for cn in (cn1, cn3)}
    async with trio.open_nursery() as nursery:
        for cn, poll in polls.items():
            nursery.start_soon(poll.run, api, cn, tags[cn], 30)
            await until_waiting(api, cn)
        r = await api.put(f"/vnics/{s['web']['mac']}", {"cn_uuid": cn3})
        assert r.status_code == 200, r.text
        with trio.fail_after(WAKE_BOUND):
            await polls[cn1].done.wait()
            await polls[cn3].done.wait()
    gone, arrived = polls[cn1].response, polls[cn3].response
    assert gone is not None and arrived is not None
    assert gone.status_code == arrived.status_code == 200
    assert s["web"]["mac"] not in gone.json()["vnics"]
    assert set(arrived.json()["vnics"]) == {s["web"]["mac"], s["other"]["mac"]}


async def test_peer_changes_and_firewall_flag_reach_the_policy(api: ApiUnderTest) -> None:
    s = await setup(api)
    cn1, cn2, _ = s["cns"]
    await api.post(
        "/rules",
        {"rule": "FROM tag role = www TO tag role = db ALLOW tcp PORT 5432", "owner_uuid": OWNER,
         "enabled": True},
    )  # fmt: skip
    etag, _ = await current(api, cn2)
    poll = Poll()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll.run, api, cn2, etag, 30)
        await until_waiting(api, cn2)
        # the peer (on cn1) changes its IP: db's policy on cn2 changes
        r = await api.put(f"/vnics/{s['web']['mac']}", {"ip": "10.1.0.77"})
        assert r.status_code == 200, r.text
        with trio.fail_after(WAKE_BOUND):
            await poll.done.wait()
    assert poll.response is not None and poll.response.status_code == 200
    rules = poll.response.json()["vnics"][s["db"]["mac"]]["rules"]
    assert rules[0]["peers"] == ["10.1.0.77/32"]
    # firewall off: the VNIC leaves its CN's document (it is then not filtered)
    await api.put(f"/vnics/{s['db']['mac']}", {"firewall_enabled": False})
    _, doc = await current(api, cn2)
    assert doc["vnics"] == {}
    # writes that touch no rule or VNIC leave the generation alone
    etag1, _ = await current(api, cn1)
    await api.post("/networks", {"name": "n2", "owner_uuid": OWNER, "vnet_id": 7, "vlan_id": 0,
                                 "subnet": "10.2.0.0/24"})  # fmt: skip
    assert (await fetch(api, cn1, etag1)).status_code == 304


async def test_changes_by_another_process_are_picked_up(api: ApiUnderTest, tmp_path: Path) -> None:
    s = await setup(api)
    cn1 = s["cns"][0]
    etag, _ = await current(api, cn1)
    other = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    try:
        poll = Poll()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll.run, api, cn1, etag, 30)
            await until_waiting(api, cn1)
            created = await rulebook.create(
                other,
                {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "owner_uuid": OWNER,
                 "enabled": True},
            )  # fmt: skip
            # what `portolan serve`'s follow_store does when the store moved past the index
            await api.directory.reload_index()
            with trio.fail_after(WAKE_BOUND):
                await poll.done.wait()
        assert poll.response is not None and poll.response.status_code == 200
        rules = poll.response.json()["vnics"][s["web"]["mac"]]["rules"]
        assert [r["uuid"] for r in rules] == [created.uuid]

        # the cross-instance hook: a remote rule update and a remote VNIC change
        svc = service(api)
        await rulebook.update(other, created.uuid, {"enabled": False})
        await other.update_vnic(s["other"]["mac"], tags={"role": "www"})
        await svc.apply_remote(IndexChange(0))
        assert svc.policy(cn1).vnic(s["web"]["mac"]).rules == ()  # type: ignore[union-attr]
        moved = await other.get_vnic(s["other"]["mac"])
        await rulebook.update(other, created.uuid, {"enabled": True})
        await svc.apply_remote(IndexChange(0, vnics_put=(moved,)))
        fresh = PolicyService(api.directory, subscribe=False)
        await fresh.reload()
        for cn in s["cns"]:
            assert svc.document(cn).vnics == fresh.document(cn).vnics
            # generations are store versions: a rebuilt service never goes backwards
            assert fresh.generation(cn) >= svc.generation(cn)
    finally:
        await other.aclose()


async def test_varpds_policy_fetcher_follows_rule_changes(api: ApiUnderTest) -> None:
    """The contract end to end: varpd's own PolicyFetcher long-polls this API."""
    from varpd.firewall.fetcher import PolicyFetcher

    s = await setup(api)
    cn1 = s["cns"][0]
    applied: list[Any] = []
    fetcher = PolicyFetcher(api.url, cn1, applied.append, wait=20)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        with trio.fail_after(5):
            while not applied:
                await trio.sleep(0.01)
        await until_waiting(api, cn1)
        r = await api.post(
            "/rules",
            {"rule": "FROM any TO tag role = www ALLOW tcp PORT 443", "owner_uuid": OWNER,
             "enabled": True},
        )  # fmt: skip
        with trio.fail_after(WAKE_BOUND):
            while len(applied) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    latest = applied[-1]
    entry = latest.vnic(s["web"]["mac"])
    assert [e.uuid for e in entry.rules] == [r.json()["uuid"]]
    assert fetcher.etag == f'"{latest.generation}"' and fetcher.counters["errors"] == 0
