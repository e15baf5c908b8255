"""Assembly of the management API: routers, error handlers, auth and request metrics.

`create_app` builds one FastAPI application around one Directory. The ASGI stack, outermost
first: Starlette's server-error guard, `RequestMetricsMiddleware` (when a registry is given),
`BearerTokenMiddleware` (when a token is given), `BodyGuardMiddleware` (framing, size limit,
JSON parsed off the trio thread: `portolan.api.body`), then FastAPI's exception handling and
the routers of `ROUTERS` (built with `ParsedBodyRoute`, so they take the parsed body).

Extension point: a new family of routes is an `APIRouter` added to `ROUTERS` (or passed in
``extra_routers``). Routers reach the Directory through ``portolan.api.routes.DirectoryDep``;
writes are already guarded by the token middleware; errors raised as `portolan.errors` types
get the API's JSON shape without more work. Firewall rules (``/rules``, ``/firewalls/...``)
are to live in ``portolan/api/rules.py`` as ``router``: `OPTIONAL_ROUTER_MODULES` picks it up
as soon as it exists (move it into `ROUTERS` once it is always there).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portolan.api.auth import WRITE_METHODS, BearerTokenMiddleware
from portolan.api.body import DEFAULT_MAX_BODY, BodyGuardMiddleware
from portolan.api.errors import install_error_handlers
from portolan.api.routes import cn_router, health_router, network_router, vnic_router

#: the routers every app serves, in this order
ROUTERS: list[APIRouter] = [health_router, cn_router, network_router, vnic_router]

#: modules that, once they exist, contribute a ``router`` (imported lazily by `create_app`)
OPTIONAL_ROUTER_MODULES: tuple[str, ...] = ("portolan.api.rules",)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _optional_routers() -> list[APIRouter]:
    routers = []
    for name in OPTIONAL_ROUTER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet; an import error inside it is a bug to show
                continue
            raise
        routers.append(module.router)
    return routers


class ApiMetrics:
    """The API's collectors: ``portolan_api_requests_total{method, route, status}`` and
    ``portolan_api_request_duration_seconds{method, route}``.

    The route label is the path template (``/vnics/{mac}``), never the raw path, so it cannot
    grow without bound; requests that match no route are labelled ``unmatched``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "portolan_api_requests",
            "Management API requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "portolan_api_request_duration_seconds",
            "Time to answer a management API request, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class RequestMetricsMiddleware:
    """Feeds `ApiMetrics` for every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, templates: Sequence[str]) -> None:
        self.app = app
        self.metrics = metrics
        # For requests answered before routing (401 from the token middleware).
        self.templates = [(compile_path(t)[0], t) for t in templates]

    def _route_label(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        for regex, template in self.templates:
            if regex.match(scope["path"]):
                return template
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            route = self._route_label(scope)
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Count before the last bytes leave, so a client that reads the metrics
                # right after its response already sees its request.
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            if not recorded:
                record()


def _openapi_with_bearer(app: FastAPI, token_required: bool) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        if token_required:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for operations in schema.get("paths", {}).values():
                for method, operation in operations.items():
                    if method.upper() in WRITE_METHODS:
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


DESCRIPTION = """\
Compute nodes (underlay addresses), networks (a subnet on one VLAN of one vnet) and VNICs
(MAC + IP on a network, living on a compute node). Every change is written together with the
SVP shootdown log entries it causes, and is visible to SVP lookups when the call returns.

Errors are JSON `{"code", "message", ...}`: 422 InvalidParameters (with `errors`, one entry per
bad field), 404 ResourceNotFound, 409 Conflict / InUse, 507 SubnetFull, 401 Unauthorized,
503 ServiceUnavailable. Writes need `Authorization: Bearer <token>` when a token is configured.
"""


def create_app(
    directory: Any,
    *,
    token: str | None,
    registry: CollectorRegistry | None = None,
    extra_routers: Iterable[APIRouter] = (),
    max_body: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """The management API for ``directory``.

    ``token``: when set, writes need ``Authorization: Bearer <token>``; ``registry``: a
    prometheus registry to count requests on (for example ``PortolanMetrics.registry``);
    ``max_body``: the largest request body accepted, bytes (larger: 413 PayloadTooLarge).
    """
    app = FastAPI(
        title="Portolan management API",
        version="1",
        description=DESCRIPTION,
        redoc_url=None,
        # A body without a Content-Type is read as JSON (curl -d, simple scripts).
        strict_content_type=False,
    )
    app.state.directory = directory
    install_error_handlers(app)
    routers = [*ROUTERS, *_optional_routers(), *extra_routers]
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi_with_bearer(app, bool(token))  # type: ignore[method-assign]
    # add_middleware wraps what was added before: the last added runs first.
    app.add_middleware(BodyGuardMiddleware, max_body=max_body)
    if token:
        app.add_middleware(BearerTokenMiddleware, token=token)
    if registry is not None:
        registry = getattr(registry, "registry", registry)  # accept a PortolanMetrics too
        app.state.metrics = ApiMetrics(registry)
        templates = [r.path for router in routers for r in router.routes if hasattr(r, "path")]
        app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics, templates=templates)
    return app
