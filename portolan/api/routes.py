"""The routes of compute nodes, networks and VNICs: thin adapters onto the Directory.

Each route validates its input with the models of `schemas` (FastAPI turns failures into one
422 that `errors` reshapes), makes exactly one Directory call and returns the object's
``to_json()``. No route keeps state or talks to the store itself: the Directory owns the
transaction that writes a mapping and its shootdown log rows together, so when a route returns
the lookup index already answers the new state.

Routers are plain `APIRouter` objects collected by `portolan.api.app.ROUTERS`; a new family
of routes (firewall rules) is a new router there, reaching the Directory with `DirectoryDep`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from portolan.api import schemas
from portolan.api.body import ParsedBodyRoute
from portolan.api.schemas import MacText, UuidText

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorOut, "description": text}
    for status, text in (
        (401, "Unauthorized: a write without the right bearer token"),
        (404, "ResourceNotFound"),
        (409, "Conflict (duplicate MAC, IP in vnet, CN underlay IP) or InUse"),
        (422, "InvalidParameters, naming every bad field"),
        (503, "ServiceUnavailable: the store is unreachable"),
    )
}


def get_directory(request: Request) -> Any:
    """The app's Directory (set by `create_app`)."""
    return request.app.state.directory


DirectoryDep = Annotated[Any, Depends(get_directory)]


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(value, status)


def _objects(items: list[Any]) -> list[dict[str, Any]]:
    return [item.to_json() for item in items]


# -- compute nodes -------------------------------------------------------------------------

cn_router = APIRouter(
    prefix="/cns", tags=["compute nodes"], responses=ERROR_RESPONSES, route_class=ParsedBodyRoute
)


@cn_router.put(
    "/{uuid}",
    response_model=schemas.CnOut,
    responses={201: {"model": schemas.CnOut, "description": "created"}},
    summary="Create or update a compute node's underlay address",
)
async def put_cn(uuid: UuidText, body: schemas.CnPut, directory: DirectoryDep) -> Response:
    cn, created = await directory.put_cn(uuid, body.ip, body.port)
    return _json(cn.to_json(), 201 if created else 200)


@cn_router.get("", response_model=list[schemas.CnOut], summary="List compute nodes")
async def list_cns(directory: DirectoryDep) -> Response:
    return _json(_objects(await directory.list_cns()))


@cn_router.get("/{uuid}", response_model=schemas.CnOut, summary="Show a compute node")
async def get_cn(uuid: UuidText, directory: DirectoryDep) -> Response:
    return _json((await directory.get_cn(uuid)).to_json())


@cn_router.delete(
    "/{uuid}", status_code=204, summary="Remove a compute node (409 InUse while VNICs live there)"
)
async def delete_cn(uuid: UuidText, directory: DirectoryDep) -> Response:
    await directory.delete_cn(uuid)
    return Response(status_code=204)


# -- networks ------------------------------------------------------------------------------

network_router = APIRouter(
    prefix="/networks", tags=["networks"], responses=ERROR_RESPONSES, route_class=ParsedBodyRoute
)


@network_router.post(
    "",
    status_code=201,
    response_model=schemas.NetworkOut,
    summary="Create a network (a subnet on one VLAN of one vnet)",
)
async def create_network(body: schemas.NetworkCreate, directory: DirectoryDep) -> Response:
    network = await directory.create_network(**dict(body))
    return _json(network.to_json(), 201)


@network_router.get("", response_model=list[schemas.NetworkOut], summary="List networks")
async def list_networks(directory: DirectoryDep) -> Response:
    return _json(_objects(await directory.list_networks()))


@network_router.get("/{uuid}", response_model=schemas.NetworkOut, summary="Show a network")
async def get_network(uuid: UuidText, directory: DirectoryDep) -> Response:
    return _json((await directory.get_network(uuid)).to_json())


@network_router.delete(
    "/{uuid}", status_code=204, summary="Remove a network (409 InUse while VNICs use it)"
)
async def delete_network(uuid: UuidText, directory: DirectoryDep) -> Response:
    await directory.delete_network(uuid)
    return Response(status_code=204)


# -- VNICs ---------------------------------------------------------------------------------

vnic_router = APIRouter(
    prefix="/vnics", tags=["VNICs"], responses=ERROR_RESPONSES, route_class=ParsedBodyRoute
)


class VnicFilters(BaseModel):
    """Query parameters of ``GET /vnics``; all optional, combined with AND."""

    model_config = ConfigDict(extra="forbid")
    vnet_id: Annotated[int, Field(ge=0, le=schemas.MAX_VNET_ID)] | None = None
    cn_uuid: UuidText | None = None
    network_uuid: UuidText | None = None
    owner_uuid: UuidText | None = None


@vnic_router.post(
    "",
    status_code=201,
    response_model=schemas.VnicOut,
    responses={507: {"model": schemas.ErrorOut, "description": "SubnetFull: no free IP left"}},
    summary="Create a VNIC (MAC and IP allocated when not given)",
)
async def create_vnic(body: schemas.VnicCreate, directory: DirectoryDep) -> Response:
    vnic = await directory.create_vnic(**dict(body))
    return _json(vnic.to_json(), 201)


@vnic_router.get("", response_model=list[schemas.VnicOut], summary="List VNICs, filtered")
async def list_vnics(filters: Annotated[VnicFilters, Query()], directory: DirectoryDep) -> Response:
    return _json(_objects(await directory.list_vnics(**dict(filters))))


@vnic_router.get("/{mac}", response_model=schemas.VnicOut, summary="Show a VNIC")
async def get_vnic(mac: MacText, directory: DirectoryDep) -> Response:
    return _json((await directory.get_vnic(mac)).to_json())


@vnic_router.put(
    "/{mac}",
    response_model=schemas.VnicOut,
    summary="Change a VNIC: move it (cn_uuid), readdress it (ip), or change its attributes",
)
async def update_vnic(mac: MacText, body: schemas.VnicUpdate, directory: DirectoryDep) -> Response:
    changes = body.changes()
    if not changes:
        vnic = await directory.get_vnic(mac)
    else:
        vnic = await directory.update_vnic(mac, **changes)
    return _json(vnic.to_json())


@vnic_router.delete("/{mac}", status_code=204, summary="Remove a VNIC")
async def delete_vnic(mac: MacText, directory: DirectoryDep) -> Response:
    await directory.delete_vnic(mac)
    return Response(status_code=204)


# -- health --------------------------------------------------------------------------------

health_router = APIRouter(tags=["health"], route_class=ParsedBodyRoute)


@health_router.get("/ping", summary="Liveness: the API answers")
async def ping() -> dict[str, str]:
    return {"status": "ok"}
