"""``PolicyFetcher``: keep this compute node's firewall policy in step with portolan.

One trio task (``await nursery.start(fetcher.run)``) loops over::

    GET {api}/firewalls/cns/{cn_uuid}/policy                       (full fetch)
    GET {api}/firewalls/cns/{cn_uuid}/policy?wait=N  If-None-Match: <etag>   (long-poll)

- 200: the body is validated with ``protocol.fwpolicy.from_json`` and handed to ``apply``
  (synchronously, e.g. ``FirewallTable.apply``); its ``ETag`` is kept for the next long-poll.
  A 200 without an ETag cannot be long-polled: the fetcher waits ``wait`` seconds and fetches
  in full again.
- 304: nothing changed within the wait; poll again at once.
- Anything else (connection refused or reset, timeout, an HTTP status other than 200/304, a body
  that is not JSON or not a valid policy, ``apply`` raising) is an error: ``state`` becomes
  ``"backoff"``, ``last_error`` says what happened, and the fetcher sleeps 0.5 s, doubling up to
  10 s between consecutive failures. The next request after an error is a **full** fetch (no
  If-None-Match, no wait), so a policy portolan changed while we were cut off (or a restarted
  portolan whose ETags mean something else) is picked up at once. A success resets the delay.
- The read timeout is ``wait`` plus a margin, so a long-poll that the server holds for the whole
  wait is not mistaken for a dead server.

Until the first policy has been applied, nothing is filtered by this varpd's firewall (VNICs are
filtered only once their policy is known); after that, the last applied policy stays in force
while portolan is unreachable.

Observability for varpdadm and metrics: ``state`` (``"starting"``, ``"fetching"``,
``"polling"``, ``"backoff"``, ``"stopped"``), ``last_error``, ``generation`` (of the applied
policy, None before the first), ``etag``, ``counters`` and ``status()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import trio

from protocol.fwpolicy import Policy, from_json

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
READ_MARGIN = 10.0


class FetchError(Exception):
    """An answer the fetcher cannot use (bad status, bad body)."""


class PolicyFetcher:
    """Long-polls portolan for this CN's firewall policy and applies every new one."""

    def __init__(
        self,
        api_url: str,
        cn_uuid: str,
        apply: Callable[[Policy], None],
        wait: float = 30,
        *,
        token: str | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        read_margin: float = READ_MARGIN,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if wait <= 0:
            raise ValueError(f"wait must be positive, got {wait}")
        self.url = f"{api_url.rstrip('/')}/firewalls/cns/{cn_uuid}/policy"
        self.cn_uuid = cn_uuid
        self.apply = apply
        self.wait = wait
        self.token = token
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.read_margin = read_margin
        self.transport = transport
        self.state = "starting"
        self.last_error: str | None = None
        self.generation: int | None = None
        self.etag: str | None = None
        self.last_applied: float | None = None  # trio.current_time() of the last apply
        self.counters: dict[str, int] = {
            "requests": 0,
            "applied": 0,
            "not_modified": 0,
            "errors": 0,
        }

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "generation": self.generation,
            "etag": self.etag,
            "last_error": self.last_error,
            **self.counters,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch and apply until cancelled; ``task_status.started()`` once the client is up."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        timeout = httpx.Timeout(10.0, read=self.wait + self.read_margin)
        delay = self.backoff_initial
        full = True
        try:
            async with httpx.AsyncClient(
                headers=headers, timeout=timeout, transport=self.transport
            ) as client:
                task_status.started()
                while True:
                    try:
                        more = await self._once(client, full)
                    except Exception as exc:  # HTTP, bad policy, or apply() blew up: back off
                        self._failed(exc)
                    else:
                        delay = self.backoff_initial
                        full = not more
                        if not more:
                            await trio.sleep(self.wait)
                        continue
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    full = True
        finally:
            self.state = "stopped"

    def _failed(self, exc: BaseException) -> None:
        self.state = "backoff"
        self.counters["errors"] += 1
        detail = str(exc) or type(exc).__name__
        self.last_error = f"{type(exc).__name__}: {detail}"

    def _wait_param(self) -> str:
        w = self.wait
        return str(int(w)) if float(w).is_integer() else str(w)

    async def _once(self, client: httpx.AsyncClient, full: bool) -> bool:
        """One request; returns False when the next one cannot be a long-poll (no ETag)."""
        params: dict[str, str] = {}
        headers: dict[str, str] = {}
        if full or self.etag is None:
            self.state = "fetching"
        else:
            self.state = "polling"
            params["wait"] = self._wait_param()
            headers["If-None-Match"] = self.etag
        self.counters["requests"] += 1
        response = await client.get(self.url, params=params, headers=headers)
        if response.status_code == 304 and not full and self.etag is not None:
            self.counters["not_modified"] += 1
            return True
        if response.status_code != 200:
            text = response.text[:200].strip()
            raise FetchError(f"HTTP {response.status_code} from {self.url}: {text}")
        try:
            doc = response.json()
        except ValueError as exc:
            raise FetchError(f"policy body is not JSON: {exc}") from None
        policy = from_json(doc)
        self.apply(policy)
        self.generation = policy.generation
        self.etag = response.headers.get("ETag")
        self.last_applied = trio.current_time()
        self.counters["applied"] += 1
        self.last_error = None
        return self.etag is not None

    @property
    def healthy(self) -> bool:
        return self.state in ("fetching", "polling") and self.generation is not None
