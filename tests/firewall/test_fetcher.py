"""PolicyFetcher against a tiny real HTTP server: ETag/304, long-poll, errors, backoff, refetch."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from protocol.fwpolicy import Policy
from tests.firewall.policy_server import PolicyServer
from varpd.firewall import PolicyFetcher

CN = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
MAC = "02:00:00:00:00:01"


def doc(generation: int, port: int = 22) -> dict[str, Any]:
    return {
        "version": 1,
        "cn_uuid": CN,
        "generation": generation,
        "vnics": {
            MAC: {
                "ips": ["10.0.0.1"],
                "vnet_id": 1,
                "rules": [
                    {
                        "uuid": f"r{generation}",
                        "direction": "in",
                        "action": "allow",
                        "priority": 0,
                        "protocol": "tcp",
                        "ports": [[port, port]],
                        "peers": "any",
                    }
                ],
            }
        },
    }


async def until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.fixture
async def server(nursery) -> PolicyServer:
    srv = PolicyServer(CN)
    srv.set_policy(doc(1))
    await srv.start(nursery)
    return srv


def fetcher_for(server: PolicyServer, applied: list[Policy], **kw: Any) -> PolicyFetcher:
    kw.setdefault("wait", 1)
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    return PolicyFetcher(server.url, CN, applied.append, **kw)


async def test_first_fetch_is_full_then_long_polls_with_the_etag(nursery, server):
    applied: list[Policy] = []
    fetcher = fetcher_for(server, applied, token="s3cret")
    await nursery.start(fetcher.run)
    await until(lambda: len(server.requests) >= 2)
    assert [p.generation for p in applied] == [1]
    first, second = server.requests[:2]
    assert first["query"] == {} and "if-none-match" not in first["headers"]
    assert second["query"] == {"wait": "1"} and second["headers"]["if-none-match"] == '"1"'
    assert first["headers"]["authorization"] == "Bearer s3cret"
    assert fetcher.generation == 1 and fetcher.etag == '"1"' and fetcher.state == "polling"


async def test_new_policy_is_applied_promptly_and_304_keeps_the_old_one(nursery, server):
    applied: list[Policy] = []
    fetcher = fetcher_for(server, applied, wait=5)
    await nursery.start(fetcher.run)
    await until(lambda: fetcher.state == "polling")
    await trio.sleep(0.1)
    start = trio.current_time()
    server.set_policy(doc(2, port=80))
    await until(lambda: len(applied) == 2)
    assert trio.current_time() - start < 1.0  # the long-poll returned on the change
    assert applied[1].vnics[MAC].rules[0].ports == ((80, 80),)

    short = fetcher_for(server, applied2 := [], wait=0.2)
    nursery.start_soon(short.run)
    await until(lambda: short.counters["not_modified"] >= 2)
    assert [p.generation for p in applied2] == [2]
    assert short.generation == 2 and short.last_error is None


async def test_server_down_backs_off_and_refetches_in_full_after_reconnect(nursery, server):
    applied: list[Policy] = []
    fetcher = fetcher_for(server, applied, wait=0.3)
    await nursery.start(fetcher.run)
    await until(lambda: fetcher.state == "polling")
    server.stop()
    await until(lambda: fetcher.counters["errors"] >= 3)
    assert fetcher.state == "backoff" and fetcher.last_error
    assert fetcher.generation == 1  # the last policy stays in force
    await trio.sleep(0.3)
    n = len(server.requests)
    server.set_policy(doc(1))  # same generation: the fetcher must still refetch in full
    await server.start(nursery)
    await until(lambda: len(applied) == 2)
    reconnect = server.requests[n]
    assert reconnect["query"] == {} and "if-none-match" not in reconnect["headers"]
    assert fetcher.last_error is None
    await until(lambda: fetcher.state == "polling")


async def test_backoff_doubles_up_to_the_maximum(nursery, autojump_clock):
    calls: list[float] = []

    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        raise httpx.ConnectError("refused", request=request)

    fetcher = PolicyFetcher(
        "http://portolan.invalid",
        CN,
        lambda p: None,
        transport=httpx.MockTransport(handler),
    )
    nursery.start_soon(fetcher.run)
    await until(lambda: len(calls) >= 8, timeout=100)
    gaps = [round(b - a, 3) for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert fetcher.state == "backoff" and "ConnectError" in fetcher.last_error


async def test_server_errors_and_invalid_documents_are_errors_not_policies(nursery, server):
    applied: list[Policy] = []
    server.status_override = 503
    fetcher = fetcher_for(server, applied)
    await nursery.start(fetcher.run)
    await until(lambda: fetcher.counters["errors"] >= 2)
    assert "HTTP 503" in fetcher.last_error and applied == []
    server.status_override = None
    server.body_override = b'{"version": 1, "cn_uuid": "x", "generation": 1, "vnics": {"zz": {}}}'
    await until(lambda: "vnics" in (fetcher.last_error or ""))
    assert applied == []
    server.body_override = b"not json"
    await until(lambda: "JSON" in (fetcher.last_error or ""))
    server.body_override = None
    await until(lambda: len(applied) == 1)


async def test_apply_raising_counts_as_an_error_and_retries(nursery, server):
    attempts: list[int] = []

    def apply(policy: Policy) -> None:
        attempts.append(policy.generation)
        if len(attempts) == 1:
            raise RuntimeError("boom")

    fetcher = PolicyFetcher(server.url, CN, apply, wait=1, backoff_initial=0.05)
    await nursery.start(fetcher.run)
    await until(lambda: len(attempts) == 2)
    assert fetcher.counters["errors"] == 1 and fetcher.generation == 1


async def test_without_etag_the_fetcher_refetches_after_the_wait(nursery, server):
    server.send_etag = False
    applied: list[Policy] = []
    fetcher = fetcher_for(server, applied, wait=0.2)
    await nursery.start(fetcher.run)
    await until(lambda: len(applied) >= 3)
    assert all(r["query"] == {} for r in server.requests)


def test_wait_must_be_positive():
    with pytest.raises(ValueError):
        PolicyFetcher("http://x", CN, lambda p: None, wait=0)
