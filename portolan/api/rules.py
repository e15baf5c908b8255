"""Firewall routes: rules CRUD, which VNICs a rule applies to, which rules a VNIC gets, and the
per-compute-node compiled policy that varpd long-polls.

| route | answer |
|---|---|
| ``POST /rules`` | 201, the rule (canonical text) |
| ``GET /rules?owner_uuid=&vnic=&tag=&enabled=&global=`` | 200, list (filters AND-ed) |
| ``GET /rules/{uuid}`` / ``PUT`` (merge, 200) / ``DELETE`` (204) | the rule |
| ``GET /rules/{uuid}/vnics`` | VNICs either side of the rule selects (owner-scoped) |
| ``GET /firewalls/vnics/{mac}`` | rules applying to the VNIC, disabled ones included |
| ``GET /firewalls/cns/{cn_uuid}/policy[?wait=S]`` | the ``protocol.fwpolicy`` document |

Writes need the bearer token (the app's middleware). Rule payload errors are 422
``InvalidParameters`` carrying the rule language's messages and fields.

The policy: ``ETag: "<generation>"``. A request whose ``If-None-Match`` names the current
generation gets 304 at once without ``wait``; with ``wait`` (seconds, capped at
:data:`MAX_WAIT`) it is held until the CN's policy changes (200 with the new document) or the
wait ends (304). Any other request gets 200 with the document. A CN without firewall-enabled
VNICs (or unknown) has an empty document at generation 0.
"""

from __future__ import annotations

from typing import Annotated, Any

import trio
from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from portolan.api.body import ParsedBodyRoute
from portolan.api.routes import ERROR_RESPONSES, DirectoryDep
from portolan.api.schemas import MacText, UuidText
from portolan.errors import NotFound
from portolan.firewall import rules as rulebook
from portolan.firewall.policy_service import PolicyService, policy_service_for
from portolan.firewall.selection import FwRule

#: longest a policy long-poll is held, whatever ``wait`` asks
MAX_WAIT = 60.0

router = APIRouter(tags=["firewall"], responses=ERROR_RESPONSES, route_class=ParsedBodyRoute)


def policy_service(request: Request) -> PolicyService:
    """The app's PolicyService: ``app.state.policy_service`` if set, else the Directory's."""
    service = getattr(request.app.state, "policy_service", None)
    if service is None:
        service = policy_service_for(request.app.state.directory)
        request.app.state.policy_service = service
    return service


class RuleFilters(BaseModel):
    """Query parameters of ``GET /rules``; all optional, combined with AND."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    owner_uuid: UuidText | None = None
    vnic: MacText | None = None
    tag: list[str] = Field(default_factory=list)
    enabled: bool | None = None
    global_: bool | None = Field(default=None, alias="global")


def _rules_json(items: list[Any]) -> list[dict[str, Any]]:
    return [rulebook.rule_json(r) for r in items]


@router.post("/rules", status_code=201, summary="Create a firewall rule")
async def create_rule(directory: DirectoryDep, body: Annotated[dict[str, Any], Body()]) -> Response:
    rule = await rulebook.create(directory, body)
    return JSONResponse(rulebook.rule_json(rule), 201)


@router.get("/rules", summary="List firewall rules, filtered")
async def list_rules(directory: DirectoryDep, filters: Annotated[RuleFilters, Query()]) -> Response:
    vnic = None
    if filters.vnic is not None:
        try:
            vnic = await directory.get_vnic(filters.vnic)
        except NotFound:
            return JSONResponse([])  # a filter matches nothing; it is not a lookup
    rules = rulebook.filter_rules(
        await rulebook.list_all(directory),
        owner_uuid=filters.owner_uuid,
        enabled=filters.enabled,
        is_global=filters.global_,
        tags=[rulebook.parse_tag_filter(t) for t in filters.tag],
        vnic=vnic,
    )
    return JSONResponse(_rules_json(rules))


@router.get("/rules/{uuid}", summary="Show a firewall rule")
async def get_rule(uuid: UuidText, directory: DirectoryDep) -> Response:
    return JSONResponse(rulebook.rule_json(await rulebook.get(directory, uuid)))


@router.put("/rules/{uuid}", summary="Change a firewall rule (fields merged over the stored rule)")
async def update_rule(
    uuid: UuidText, directory: DirectoryDep, body: Annotated[dict[str, Any], Body()]
) -> Response:
    rule = await rulebook.update(directory, uuid, body)
    return JSONResponse(rulebook.rule_json(rule))


@router.delete("/rules/{uuid}", status_code=204, summary="Remove a firewall rule")
async def delete_rule(uuid: UuidText, directory: DirectoryDep) -> Response:
    await rulebook.delete(directory, uuid)
    return Response(status_code=204)


@router.get("/rules/{uuid}/vnics", summary="The VNICs a rule applies to (either side)")
async def rule_vnics(uuid: UuidText, request: Request, directory: DirectoryDep) -> Response:
    stored = await rulebook.get(directory, uuid)
    service = policy_service(request)
    await service.ensure_fresh()
    views = service.model.vnics_selected(FwRule.of(stored))
    return JSONResponse([v.vnic.to_json() for v in views])


@router.get("/firewalls/vnics/{mac}", summary="The rules that apply to a VNIC (disabled too)")
async def vnic_rules(mac: MacText, directory: DirectoryDep) -> Response:
    vnic = await directory.get_vnic(mac)
    rules = rulebook.filter_rules(await rulebook.list_all(directory), vnic=vnic)
    return JSONResponse(_rules_json(rules))


def _etag(generation: int) -> str:
    return f'"{generation}"'


def _matches(if_none_match: str | None, generation: int) -> bool:
    if not if_none_match:
        return False
    for item in if_none_match.split(","):
        tag = item.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == str(generation):
            return True
    return False


@router.get(
    "/firewalls/cns/{cn_uuid}/policy",
    summary="The compiled firewall policy of a compute node (ETag, long-poll with wait)",
    responses={304: {"description": "unchanged (If-None-Match matched, wait over)"}},
)
async def cn_policy(
    cn_uuid: UuidText,
    request: Request,
    wait: Annotated[float | None, Query(ge=0, description="seconds to hold the request")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    service = policy_service(request)
    await service.ensure_fresh()
    generation = service.generation(cn_uuid)
    if _matches(if_none_match, generation):
        if wait:
            with trio.move_on_after(min(wait, MAX_WAIT)):
                generation = await service.wait_changed(cn_uuid, generation)
        if _matches(if_none_match, generation):
            return Response(status_code=304, headers={"ETag": _etag(generation)})
    doc = service.document(cn_uuid)
    return Response(
        doc.json_bytes(),
        200,
        media_type="application/json",
        headers={"ETag": _etag(doc.generation), "Cache-Control": "no-cache"},
    )
