"""Typed service errors raised by the Directory and mapped to HTTP responses by the API.

Every error carries ``code`` (the API code of CONVENTIONS), ``message``, ``http_status`` and
``to_json()`` (the response body: ``{"code", "message", ...}``).

| class | http | code |
|---|---|---|
| ``InvalidParameters(errors)`` | 422 | ``InvalidParameters`` (``errors``: list of FieldError) |
| ``NotFound(resource, id)`` | 404 | ``ResourceNotFound`` |
| ``Conflict(message, errors=())`` | 409 | ``Conflict`` (duplicate MAC, IP in vnet, CN underlay IP, subnet overlap) |
| ``InUse(message)`` | 409 | ``InUse`` (delete refused) |
| ``SubnetFull(network_uuid)`` | 507 | ``SubnetFull`` |
| ``Unauthorized(message)`` | 401 | ``Unauthorized`` |
| ``StoreUnavailable(message)`` | 503 | ``ServiceUnavailable`` |

``FieldError.code`` is ``InvalidParameter`` or ``MissingParameter`` inside InvalidParameters;
inside a Conflict it is ``Duplicate`` (MAC, IP, underlay IP) or ``Overlap`` (subnet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INVALID = "InvalidParameter"
MISSING = "MissingParameter"
DUPLICATE = "Duplicate"
OVERLAP = "Overlap"


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "message": self.message}


class PortolanError(Exception):
    """Base class of every service error."""

    code: str = "InternalError"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class InvalidParameters(PortolanError):
    code = "InvalidParameters"
    http_status = 422

    def __init__(
        self, errors: list[FieldError] | tuple[FieldError, ...], message: str = ""
    ) -> None:
        errs = sorted(errors, key=lambda e: e.field)
        if not message:
            if errs and all(e.code == MISSING for e in errs):
                message = "Missing parameters"
            else:
                message = "Invalid parameters"
        super().__init__(message)
        self.errors: list[FieldError] = errs

    def fields(self) -> list[str]:
        return [e.field for e in self.errors]

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "errors": [e.to_json() for e in self.errors]}

    def __str__(self) -> str:
        detail = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        return f"{self.message}: {detail}" if detail else self.message


class NotFound(PortolanError):
    code = "ResourceNotFound"
    http_status = 404

    def __init__(self, resource: str, id: str) -> None:
        super().__init__(f"{resource} not found")
        self.resource = resource
        self.id = id

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "resource": self.resource, "id": self.id}


class Conflict(PortolanError):
    code = "Conflict"
    http_status = 409

    def __init__(
        self, message: str, errors: list[FieldError] | tuple[FieldError, ...] = ()
    ) -> None:
        super().__init__(message)
        self.errors: list[FieldError] = list(errors)

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        if self.errors:
            body["errors"] = [e.to_json() for e in self.errors]
        return body


class InUse(PortolanError):
    code = "InUse"
    http_status = 409


class SubnetFull(PortolanError):
    code = "SubnetFull"
    http_status = 507

    def __init__(self, network_uuid: str) -> None:
        super().__init__("no more free IPs")
        self.network_uuid = network_uuid

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "network_uuid": self.network_uuid}


class Unauthorized(PortolanError):
    code = "Unauthorized"
    http_status = 401

    def __init__(self, message: str = "missing or invalid API token") -> None:
        super().__init__(message)


class StoreUnavailable(PortolanError):
    code = "ServiceUnavailable"
    http_status = 503


__all__ = [
    "DUPLICATE",
    "INVALID",
    "MISSING",
    "OVERLAP",
    "Conflict",
    "FieldError",
    "InUse",
    "InvalidParameters",
    "NotFound",
    "PortolanError",
    "StoreUnavailable",
    "SubnetFull",
    "Unauthorized",
]
