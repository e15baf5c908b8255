"""The management API: HTTP/JSON in front of the Directory.

Theory of operation
-------------------
Operators and orchestrators describe the overlay here: compute nodes (``/cns``: the
underlay address each CN's varpd listens on), networks (``/networks``: a subnet on one VLAN of
one vnet, with its provisioning range) and VNICs (``/vnics``: a MAC and IP on a network, living
on a CN). Every route is a thin adapter: validate the request, make one `Directory` call,
return the object's ``to_json()``. The Directory is the only writer: it commits the mapping and
the SVP shootdown log rows of every CN concerned in one store transaction and updates the
in-memory lookup index before it returns, so when the HTTP response leaves, SVP lookups answer
the new state and each CN's LOG_REQ already finds its entries.

Success is 201 with the object on create, 200 on update (``PUT /cns/{uuid}`` is 201 when it
created the CN), 204 on delete; lists are JSON arrays.

Errors
------
Every error body is ``{"code", "message", ...}`` (`portolan.api.errors`):

- 422 ``InvalidParameters`` with ``errors: [{"field", "code", "message"}]`` naming every bad
  field at once (codes ``MissingParameter``, ``InvalidParameter``, ``UnknownParameters``;
  unknown fields are refused; malformed JSON is the field ``body``). Validation happens before
  the Directory is called, so a refused request writes nothing.
- 404 ``ResourceNotFound`` (unknown object or route), 409 ``Conflict`` (duplicate MAC, IP taken
  in the vnet, CN underlay IP taken, overlapping subnet) or ``InUse`` (deleting a CN or network
  that VNICs use), 507 ``SubnetFull``, 503 ``ServiceUnavailable`` (store unreachable): raised
  by the Directory as `portolan.errors` types and forwarded with their ``http_status``.
- 413 ``PayloadTooLarge`` (a body over ``max_body``, default 1 MiB), 400 ``BadRequest`` (both
  Content-Length and Transfer-Encoding; the connection is closed) and 422 naming ``body`` or
  the field for bodies that cannot be parsed or answered (`portolan.api.body`).
- 401 ``Unauthorized``: with a token configured, every POST/PUT/PATCH/DELETE needs
  ``Authorization: Bearer <token>`` (compared in constant time, `portolan.api.auth`); reads
  stay open. Refusing to serve without a token on a non-loopback address is `portolan serve`'s
  decision.

OpenAPI and metrics
-------------------
FastAPI publishes the schema at ``/openapi.json`` (and a browsable page at ``/docs``), built
from the pydantic models of `portolan.api.schemas`; with a token, write operations declare the
bearer scheme. With a prometheus registry, requests are counted by method, route template and
status, and timed (`portolan.api.app.ApiMetrics`).

Serving and lifecycle
---------------------
`serve_api` runs the app on hypercorn's trio worker inside the caller's nursery (no threads:
FastAPI/Starlette run on trio through anyio) and reports the bound ``(host, port)`` through
``task_status`` (port 0 picks a free port). Cancelling the task, or setting the optional
``shutdown`` event, stops it: hypercorn stops accepting and gives open requests a short grace
period.

Where to change what
--------------------
Routes: `portolan.api.routes` (one router per resource; new families such as firewall rules
join `portolan.api.app.ROUTERS`, or ``portolan/api/rules.py`` exposing ``router``, picked up
automatically). Request shapes: `portolan.api.schemas`. Error mapping: `portolan.api.errors`.
The admin command line that talks to this API: `portolan.cli.admin`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from portolan.api.app import ROUTERS, create_app

__all__ = ["ROUTERS", "create_app", "serve_api"]

log = logging.getLogger("portolan.api")

#: seconds open requests get to finish once the server is told to stop
GRACEFUL_TIMEOUT = 2.0


def _bind_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_bound(bind: str) -> tuple[str, int]:
    """``http://127.0.0.1:41234`` or ``http://[::1]:41234`` -> (host, port)."""
    hostport = bind.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


async def serve_api(
    app: Any,
    host: str,
    port: int,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port with hypercorn until cancelled (or ``shutdown`` is set).

    ``task_status.started((host, port))`` reports the address actually bound, so ``port=0``
    works. Raises OSError (through the nursery) when the address cannot be bound.
    """
    config = Config()
    config.bind = [_bind_text(host, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("portolan.api.http")
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False

    class _Started:
        """Translates hypercorn's list of bind URLs into our (host, port)."""

        def started(self, binds: list[str] | None = None) -> None:
            bound = _parse_bound(binds[0]) if binds else (host, port)
            log.info("management API listening on http://%s", _bind_text(*bound))
            task_status.started(bound)

    trigger = shutdown.wait if shutdown is not None else None
    await serve(app, config, shutdown_trigger=trigger, task_status=_Started())  # type: ignore[arg-type]
