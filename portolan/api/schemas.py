"""Request and response shapes of the management API (pydantic models).

Request models check syntax only (a UUID is a UUID, an IP parses, a VLAN is 0-4094, no unknown
fields); rules that need the stored state (is the IP inside the subnet and free, does the network
exist, is the MAC taken) belong to the Directory, which raises the typed errors of
``portolan.errors``. Every request model forbids unknown fields, so a typo is a 422 naming the
field instead of a silently ignored setting.

Values are normalised on the way in: UUIDs to lower-case canonical text, IPs and subnets to
their canonical text, MACs to six raw bytes (the Directory's form). Response models document
the JSON that ``to_json()`` of the model objects produces; the routes return that JSON as is.
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from portolan.service import VLAN_MAX as MAX_VLAN_ID
from portolan.service import VNET_MAX as MAX_VNET_ID
from protocol.addr import parse_ip, parse_mac


def _shown(value: str, limit: int = 64) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters (a client's 1 MiB
    string is not echoed back)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def canonical_uuid(value: str) -> str:
    """Lower-case, hyphenated text of a UUID; ValueError if it is not one."""
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"{_shown(value)} is not a UUID") from None


def canonical_ip(value: str) -> str:
    """Canonical text of an IP (an IPv4-mapped IPv6 address as IPv4); ValueError if none."""
    try:
        return str(parse_ip(value))
    except ValueError:
        raise ValueError(f"{_shown(value)} is not an IP address") from None


def canonical_subnet(value: str) -> str:
    if "/" not in value:
        raise ValueError(f"subnet {_shown(value)} must be in CIDR form (address/prefix length)")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"subnet {_shown(value)} is not a valid CIDR network: {e}") from None
    return str(net)


UuidText = Annotated[StrictStr, AfterValidator(canonical_uuid)]
IpText = Annotated[StrictStr, AfterValidator(canonical_ip)]
SubnetText = Annotated[StrictStr, AfterValidator(canonical_subnet)]
MacText = Annotated[StrictStr, AfterValidator(parse_mac)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
VnetId = Annotated[StrictInt, Field(ge=0, le=MAX_VNET_ID)]
VlanId = Annotated[StrictInt, Field(ge=0, le=MAX_VLAN_ID)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=255)]
TagValue = StrictStr | StrictBool | StrictInt | float
Tags = dict[Annotated[StrictStr, Field(min_length=1)], TagValue]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- compute nodes -------------------------------------------------------------------------


class CnPut(_Request):
    """Body of ``PUT /cns/{uuid}``: the CN's underlay address."""

    ip: IpText
    port: Port = 4789


class CnOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    uuid: str
    ip: str
    port: int
    version: int


# -- networks ------------------------------------------------------------------------------


class NetworkCreate(_Request):
    """Body of ``POST /networks``."""

    name: Name
    owner_uuid: UuidText
    vnet_id: VnetId
    vlan_id: VlanId
    subnet: SubnetText
    gateway: IpText | None = None
    provision_start: IpText | None = None
    provision_end: IpText | None = None


class NetworkOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    uuid: str
    name: str
    owner_uuid: str
    vnet_id: int
    vlan_id: int
    subnet: str
    gateway: str | None = None
    provision_start: str | None = None
    provision_end: str | None = None
    version: int


# -- VNICs ---------------------------------------------------------------------------------


class VnicCreate(_Request):
    """Body of ``POST /vnics``; the MAC and IP are allocated when not given."""

    network_uuid: UuidText
    cn_uuid: UuidText
    mac: MacText | None = None
    ip: IpText | None = None
    belongs_to_uuid: UuidText | None = None
    owner_uuid: UuidText | None = None
    tags: Tags | None = None
    firewall_enabled: StrictBool = False


class VnicUpdate(_Request):
    """Body of ``PUT /vnics/{mac}``: only the fields present are changed.

    ``cn_uuid`` moves the VNIC (a migration: VL2 and VL3 shootdowns), ``ip`` readdresses it
    (VL3 shootdowns for the old and new address); tags and the firewall flag write no SVP log.
    ``belongs_to_uuid`` and ``owner_uuid`` may be set to null to clear them.
    """

    # Not nullable: leave the field out to keep the value (the None default is never validated,
    # so an explicit null is refused).
    cn_uuid: UuidText = None  # type: ignore[assignment]
    ip: IpText = None  # type: ignore[assignment]
    firewall_enabled: StrictBool = None  # type: ignore[assignment]
    # Nullable: null clears the value.
    tags: Tags | None = None
    belongs_to_uuid: UuidText | None = None
    owner_uuid: UuidText | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the client sent, ready for ``Directory.update_vnic(**changes)``."""
        changes = {name: getattr(self, name) for name in self.model_fields_set}
        if "tags" in changes and changes["tags"] is None:
            changes["tags"] = {}
        return changes


class VnicOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    mac: str
    ip: str | None
    vnet_id: int
    vlan_id: int
    network_uuid: str | None
    cn_uuid: str
    belongs_to_uuid: str | None = None
    owner_uuid: str | None = None
    tags: dict[str, Any] = {}
    firewall_enabled: bool = False
    version: int


# -- errors --------------------------------------------------------------------------------


class FieldErrorOut(BaseModel):
    field: str
    code: str
    message: str


class ErrorOut(BaseModel):
    """Every error body: ``code`` and ``message``, plus ``errors`` for 422 and some 409s."""

    model_config = ConfigDict(extra="allow")
    code: str
    message: str
    errors: list[FieldErrorOut] | None = None
