"""Every failure of the API as JSON ``{"code", "message", ...}`` with the status of CONVENTIONS.

Three sources of errors meet here:

- the Directory's typed errors (`portolan.errors`): each carries ``http_status`` and
  ``to_json()``, so the handler only forwards them (404 ResourceNotFound, 409 Conflict / InUse,
  422 InvalidParameters, 507 SubnetFull, 503 ServiceUnavailable, ...);
- request validation by FastAPI/pydantic: rewritten into one 422 ``InvalidParameters`` that
  names every bad field (``field`` is the dotted path inside the body, or the path/query
  parameter's name; ``code`` is MissingParameter, InvalidParameter or UnknownParameters), and
  malformed JSON is the field ``body``;
- routing (unknown path 404, wrong method 405) and anything unexpected (500 InternalError,
  logged with its traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from portolan import errors as service_errors

log = logging.getLogger("portolan.api")

#: the Directory's error classes handled by `service_error_handler` (all carry
#: ``http_status`` and ``to_json()``); subclasses are found through the MRO.
SERVICE_ERROR_NAMES = (
    "InvalidParameters",
    "NotFound",
    "Conflict",
    "InUse",
    "SubnetFull",
    "Unauthorized",
    "StoreUnavailable",
)

_STATUS_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "ResourceNotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "InvalidParameters",
    500: "InternalError",
    503: "ServiceUnavailable",
    507: "SubnetFull",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """A JSON error body in the API's shape."""
    return JSONResponse({"code": code, "message": message, **extra}, status, headers=headers)


def field_error(field: str, code: str, message: str) -> dict[str, str]:
    return {"field": field, "code": code, "message": message}


def invalid_parameters(field_errors: Iterable[dict[str, str]]) -> JSONResponse:
    """422 InvalidParameters listing ``field_errors`` (sorted by field, duplicates dropped)."""
    unique: dict[tuple[str, str], dict[str, str]] = {}
    for err in field_errors:
        unique.setdefault((err["field"], err["code"]), err)
    errs = sorted(unique.values(), key=lambda e: (e["field"], e["code"]))
    if errs and all(e["code"] == "MissingParameter" for e in errs):
        message = "Missing parameters"
    elif errs and all(e["code"] == "UnknownParameters" for e in errs):
        message = "Unknown parameters"
    else:
        message = "Invalid parameters"
    names = ", ".join(dict.fromkeys(e["field"] for e in errs))
    if names:
        message = f"{message}: {names}"
    return error_response(422, "InvalidParameters", message, errors=errs)


def _field_name(loc: Sequence[int | str]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        where = parts.pop(0)
        if not parts:
            return "body" if where == "body" else str(where)
    return ".".join(str(p) for p in parts)


def _clean_message(msg: str) -> str:
    # pydantic prefixes messages raised by our validators with "Value error, ".
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def validation_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Translate pydantic/FastAPI error dicts into the API's field errors."""
    out = []
    for err in errors:
        kind = err.get("type", "")
        loc = tuple(err.get("loc", ()))
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            detail = ctx.get("error", "invalid JSON")
            pos = loc[1] if len(loc) > 1 else None
            where = f" at character {pos}" if isinstance(pos, int) else ""
            out.append(field_error("body", "InvalidParameter", f"malformed JSON{where}: {detail}"))
            continue
        field = _field_name(loc)
        if kind == "missing":
            out.append(field_error(field, "MissingParameter", f"{field} is required"))
        elif kind == "extra_forbidden":
            out.append(field_error(field, "UnknownParameters", f"unknown parameter {field!r}"))
        elif field == "body" and kind in ("model_attributes_type", "dict_type", "model_type"):
            out.append(
                field_error(
                    "body",
                    "InvalidParameter",
                    "the body must be a JSON object (sent as Content-Type: application/json)",
                )
            )
        else:
            out.append(
                field_error(field, "InvalidParameter", _clean_message(str(err.get("msg", ""))))
            )
    return out


#: routes whose refused requests also get the Directory's field checks (method, template)
DIRECTORY_CHECKED = {("POST", "/vnics"), ("PUT", "/vnics/{mac}")}


async def directory_field_errors(
    request: Request, exc: RequestValidationError, errs: list[dict[str, str]]
) -> list[dict[str, str]]:
    """The Directory's errors for the fields request validation did not already refuse.

    Request validation (pydantic) checks syntax; the Directory checks the rest against the
    stored state (the network exists, the IP is a host of its subnet and not its gateway).
    Without this a request with a bad MAC and an IP outside the subnet would learn of the
    IP only after fixing the MAC; the README promises every bad field at once."""
    route = getattr(request.scope.get("route"), "path", None)
    if (request.method, route) not in DIRECTORY_CHECKED:
        return []
    body = getattr(exc, "body", None)
    check = getattr(request.app.state.directory, "vnic_field_errors", None)
    flagged = {e["field"].split(".", 1)[0] for e in errs}
    if not isinstance(body, dict) or check is None or "body" in flagged:
        return []
    fields = {k: v for k, v in body.items() if isinstance(k, str) and k not in flagged}
    if route == "/vnics":
        found = await check(**fields)
    else:
        if "mac" in flagged:
            return []
        found = await check(request.path_params["mac"], **fields)
    return [e.to_json() for e in found if e.field.split(".", 1)[0] not in flagged]


async def request_validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = validation_errors(exc.errors())
    errs += await directory_field_errors(request, exc, errs)
    return invalid_parameters(errs)


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    status = int(getattr(exc, "http_status", 500))
    body = exc.to_json()  # type: ignore[attr-defined]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, body.get("message"))
    return JSONResponse(body, status, headers=headers)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _STATUS_CODES.get(status, "Error")
    if status == 404:
        message = f"no such resource: {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(status, code, message, headers=getattr(exc, "headers", None))


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal error; the server log has the details")


def service_error_classes() -> list[type[BaseException]]:
    """The exception classes of `portolan.errors` that carry an HTTP status."""
    found: dict[str, type[BaseException]] = {}
    for name in SERVICE_ERROR_NAMES:
        cls = getattr(service_errors, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found[name] = cls
    for name, cls in vars(service_errors).items():
        if isinstance(cls, type) and issubclass(cls, BaseException) and hasattr(cls, "http_status"):
            found.setdefault(name, cls)
    return list(found.values())


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler of this module on ``app``."""
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    for cls in service_error_classes():
        app.add_exception_handler(cls, service_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
