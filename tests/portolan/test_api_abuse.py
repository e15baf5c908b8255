"""The management API under abuse (issue 12, items 5-10): bodies that cannot be stored or
answered (NaN, Infinity, lone surrogates), oversized bodies and tag sets, unparseable bodies,
request smuggling (Content-Length with Transfer-Encoding), a VNIC on the gateway's address, and
every bad field reported at once. Real HTTP on 127.0.0.1:0 (raw sockets where the HTTP client
would refuse to send what is tested), a Directory on a temporary SQLite store."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from portolan.api import create_app, serve_api
from portolan.api.body import DEFAULT_MAX_BODY
from portolan.errors import InvalidParameters
from portolan.service import MAX_TAG_KEY, MAX_TAG_VALUE, MAX_TAGS, Directory
from tests.portolan.conftest_api import OWNER, ApiUnderTest, new_uuid, running_api


@asynccontextmanager
async def api_on(tmp_path: Path, **app_options: Any) -> AsyncIterator[ApiUnderTest]:
    directory = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    try:
        if not app_options:
            async with running_api(directory) as api:
                yield api
            return
        app = create_app(directory, token=None, **app_options)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_api, app, "127.0.0.1", 0)
            url = f"http://{host}:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield ApiUnderTest(directory, url, client, None, None)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    finally:
        await directory.aclose()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiUnderTest]:
    async with api_on(tmp_path) as running:
        yield running


async def setup_net(api: ApiUnderTest, **net: Any) -> tuple[str, str]:
    cn = await api.cn("192.168.50.1")
    fields = {"gateway": "10.1.0.1", **net}
    network = await api.network(**fields)
    return network["uuid"], cn["uuid"]


async def post_raw(api: ApiUnderTest, path: str, raw: bytes | str, method: str = "POST") -> Any:
    content = raw.encode() if isinstance(raw, str) else raw
    return await api.client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )


def fields_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert body["code"] == "InvalidParameters", body
    return {e["field"]: e["message"] for e in body["errors"]}


def vnic_body(net: str, cn: str, tags_json: str) -> str:
    return f'{{"network_uuid": "{net}", "cn_uuid": "{cn}", "tags": {tags_json}}}'


def http_exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``); blocking (use a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            chunks.append(b"<<timeout>>")
        return b"".join(chunks)


def port_of(api: ApiUnderTest) -> int:
    return int(api.url.rsplit(":", 1)[1])


# -- item 5: values JSON cannot carry ------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_tag_is_refused_naming_the_tag_and_lists_keep_working(
    api: ApiUnderTest, literal: str
) -> None:
    net, cn = await setup_net(api)
    r = await post_raw(api, "/vnics", vnic_body(net, cn, f'{{"k": {literal}}}'))
    assert r.status_code == 422, r.text
    assert "tags.k" in fields_of(r)
    assert await api.directory.list_vnics() == []
    vnic = await api.vnic(net, cn)
    r = await post_raw(api, f"/vnics/{vnic['mac']}", f'{{"tags": {{"k": {literal}}}}}', "PUT")
    assert r.status_code == 422, r.text
    assert "tags.k" in fields_of(r)
    assert (await api.directory.get_vnic(vnic["mac"])).tags == {}
    r = await api.get("/vnics")
    assert r.status_code == 200 and len(r.json()) == 1


async def test_lone_surrogates_are_refused_in_tag_values_keys_and_names(api: ApiUnderTest) -> None:
    net, cn = await setup_net(api)
    r = await post_raw(api, "/vnics", vnic_body(net, cn, '{"k": "a\\ud800b"}'))
    assert r.status_code == 422, r.text
    assert "tags.k" in fields_of(r)
    r = await post_raw(api, "/vnics", vnic_body(net, cn, '{"\\udfff": "v"}'))
    assert r.status_code == 422, r.text
    assert "tags" in fields_of(r)
    raw = json.dumps({"name": "x", "owner_uuid": OWNER, "vnet_id": 9, "vlan_id": 0})
    r = await post_raw(api, "/networks", raw[:-1] + ', "subnet": "10.9.0.0/24", "name": "\\ud800"}')
    assert r.status_code == 422, r.text
    assert "name" in fields_of(r)
    # A proper pair is a character, not an error.
    vnic = await api.vnic(net, cn, tags={"k": "\U0001f600"})
    assert vnic["tags"] == {"k": "\U0001f600"}
    assert (await api.get("/vnics")).status_code == 200
    assert (await api.get("/networks")).status_code == 200


async def test_the_directory_refuses_non_finite_and_surrogate_tags(api: ApiUnderTest) -> None:
    net, cn = await setup_net(api)
    for tags in ({"k": math.nan}, {"k": math.inf}, {"k": "\ud800"}, {"\udc00": 1}):
        with pytest.raises(InvalidParameters) as exc:
            await api.directory.create_vnic(network_uuid=net, cn_uuid=cn, tags=tags)
        assert exc.value.fields() == ["tags"], tags


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ('{"k":NaN,"ok":1}', {"k": "NaN", "ok": 1}),
        ('{"k":-Infinity}', {"k": "-Infinity"}),
        ('{"k":"a\\ud800"}', {"k": "a\ufffd"}),
        ('{"\\udbff":true}', {"\ufffd": True}),
        ("not json", {}),
        ("[1, 2]", {}),
    ],
)
async def test_bad_tags_already_stored_are_repaired_on_every_read(
    tmp_path: Path, stored: str, expected: dict[str, Any]
) -> None:
    async with api_on(tmp_path) as api:
        net, cn = await setup_net(api)
        vnic = await api.vnic(net, cn, tags={"k": 1})

        def corrupt() -> None:
            with api.directory.store.transaction(write=True) as tx:
                tx.execute("UPDATE vnics SET tags = ?", (stored,))

        await trio.to_thread.run_sync(corrupt)
        r = await api.get("/vnics")
        assert r.status_code == 200, r.text
        assert r.json()[0]["tags"] == expected
        r = await api.get(f"/vnics/{vnic['mac']}")
        assert r.status_code == 200 and r.json()["tags"] == expected
    # ...and across a restart (the index load reads the same rows).
    async with api_on(tmp_path) as api:
        r = await api.get("/vnics")
        assert r.status_code == 200 and r.json()[0]["tags"] == expected
        # A write of the repaired VNIC stores clean tags.
        r = await api.put(f"/vnics/{vnic['mac']}", {"firewall_enabled": True})
        assert r.status_code == 200, r.text


# -- item 6: sizes ---------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_before_it_is_read(tmp_path: Path) -> None:
    async with api_on(tmp_path, max_body=4096) as api:
        net, cn = await setup_net(api)
        big = {"network_uuid": net, "cn_uuid": cn, "tags": {"k": "x" * 5000}}
        r = await api.post("/vnics", big)
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "PayloadTooLarge"
        # Chunked, so no Content-Length announces the size.

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        r = await api.client.post(
            "/vnics", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
        # A client announcing 100 MB gets its answer without sending them.
        head = (
            b"POST /vnics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n{"
        )
        answer = await trio.to_thread.run_sync(http_exchange, port_of(api), head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"PayloadTooLarge" in answer
        assert await api.directory.list_vnics() == []
        # Below the limit all is as before.
        assert (await api.vnic(net, cn, tags={"k": "x" * 100}))["tags"] == {"k": "x" * 100}


async def test_default_body_limit_is_one_mebibyte(api: ApiUnderTest) -> None:
    assert DEFAULT_MAX_BODY == 1 << 20
    net, cn = await setup_net(api)
    r = await api.post("/vnics", {"network_uuid": net, "cn_uuid": cn, "x": "y" * (1 << 20)})
    assert r.status_code == 413


async def test_tag_count_key_and_value_lengths_are_bounded(api: ApiUnderTest) -> None:
    net, cn = await setup_net(api)
    cases = [
        {f"k{i}": i for i in range(MAX_TAGS + 1)},
        {"k" * (MAX_TAG_KEY + 1): 1},
        {"k": "v" * (MAX_TAG_VALUE + 1)},
        {"": 1},
    ]
    for tags in cases:
        r = await api.post("/vnics", {"network_uuid": net, "cn_uuid": cn, "tags": tags})
        assert r.status_code == 422, r.text
        assert any(f.startswith("tags") for f in fields_of(r)), r.text
    at_limit = {f"{i:0{MAX_TAG_KEY}d}": "v" * MAX_TAG_VALUE for i in range(MAX_TAGS)}
    vnic = await api.vnic(net, cn, tags=at_limit)
    assert vnic["tags"] == at_limit
    assert await api.directory.list_vnics() != []


# -- item 7: bodies that cannot be parsed -----------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"tags": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"name": "\xff\xfe"}',
        b'{"vnet_id": ' + b"9" * 5000 + b"}",
        b'{"name": "a\xc3"}',
    ],
    ids=["deep", "bad-utf8", "huge-int", "truncated-utf8"],
)
async def test_unparseable_bodies_are_422_naming_body(api: ApiUnderTest, raw: bytes) -> None:
    r = await post_raw(api, "/networks", raw)
    assert r.status_code == 422, r.text
    assert list(fields_of(r)) == ["body"]
    assert (await api.get("/ping")).status_code == 200


# -- item 8: request smuggling ------------------------------------------------------------------


async def test_content_length_with_transfer_encoding_is_answered_and_closed(
    api: ApiUnderTest,
) -> None:
    smuggled = b"GET /cns HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n"
    first = (
        b"POST /vnics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body
    )
    answer = await trio.to_thread.run_sync(http_exchange, port_of(api), first + smuggled)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"<<timeout>>" not in answer  # the server closed the connection
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the second request was not served


# -- item 9: the gateway's address ------------------------------------------------------------


async def test_vnic_on_the_gateway_ip_is_refused(api: ApiUnderTest) -> None:
    net, cn = await setup_net(api)
    r = await api.post("/vnics", {"network_uuid": net, "cn_uuid": cn, "ip": "10.1.0.1"})
    assert r.status_code == 422, r.text
    assert "gateway" in fields_of(r)["ip"]
    vnic = await api.vnic(net, cn, ip="10.1.0.7")
    r = await api.put(f"/vnics/{vnic['mac']}", {"ip": "10.1.0.1"})
    assert r.status_code == 422, r.text
    assert "ip" in fields_of(r)
    assert (await api.directory.get_vnic(vnic["mac"])).ip == "10.1.0.7"
    assert [v.ip for v in await api.directory.list_vnics()] == ["10.1.0.7"]


# -- item 10: every bad field at once ----------------------------------------------------------


async def test_bad_mac_and_out_of_subnet_ip_are_reported_together(api: ApiUnderTest) -> None:
    net, cn = await setup_net(api)
    body = {"network_uuid": net, "cn_uuid": cn, "mac": "zz", "ip": "10.9.9.9"}
    r = await api.post("/vnics", body)
    assert r.status_code == 422, r.text
    assert set(fields_of(r)) == {"mac", "ip"}
    body = {"network_uuid": new_uuid(), "cn_uuid": cn, "mac": "zz", "firewall_enabled": "yes"}
    r = await api.post("/vnics", body)
    assert set(fields_of(r)) == {"mac", "network_uuid", "firewall_enabled"}
    body = {"network_uuid": net, "cn_uuid": new_uuid(), "ip": "10.1.0.1", "tags": []}
    r = await api.post("/vnics", body)
    assert set(fields_of(r)) == {"cn_uuid", "ip", "tags"}
    vnic = await api.vnic(net, cn)
    r = await api.put(f"/vnics/{vnic['mac']}", {"cn_uuid": new_uuid(), "ip": "10.1.0.1", "x": 1})
    assert set(fields_of(r)) == {"cn_uuid", "ip", "x"}
    assert await api.directory.list_vnics() == [await api.directory.get_vnic(vnic["mac"])]


async def test_the_directory_reports_syntax_and_state_errors_together(api: ApiUnderTest) -> None:
    net, cn = await setup_net(api)
    with pytest.raises(InvalidParameters) as exc:
        await api.directory.create_vnic(network_uuid=net, cn_uuid=cn, mac="zz", ip="10.9.9.9")
    assert set(exc.value.fields()) == {"mac", "ip"}
    with pytest.raises(InvalidParameters) as exc:
        await api.directory.create_vnic(network_uuid=net, cn_uuid=new_uuid(), ip="10.1.0.1")
    assert set(exc.value.fields()) == {"cn_uuid", "ip"}
    vnic = await api.vnic(net, cn)
    with pytest.raises(InvalidParameters) as exc:
        await api.directory.update_vnic(vnic["mac"], ip="10.1.0.1", tags={"k": math.nan})
    assert set(exc.value.fields()) == {"ip", "tags"}


def test_serve_takes_the_body_limit_from_the_command_line() -> None:
    from portolan.cli.main import build_parser
    from portolan.cli.serve import config_from_args

    args = build_parser().parse_args(["serve", "--api-max-body", "4096"])
    assert config_from_args(args).api_max_body == 4096
    assert config_from_args(build_parser().parse_args(["serve"])).api_max_body == DEFAULT_MAX_BODY
