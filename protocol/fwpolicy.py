"""The compiled per-compute-node firewall policy document (portolan -> varpd), sans I/O.

Portolan compiles, for one compute node, the effective rules of every firewall-enabled VNIC
on it and serves the result as JSON at ``GET /firewalls/cns/{cn_uuid}/policy``; varpd fetches
it and compiles it once more into per-VNIC matchers. This module is the contract between the
two: frozen dataclasses, ``from_json`` (strict validation) and ``to_json``.

Document (version 1)::

    {"version": 1, "cn_uuid": "...", "generation": 17,
     "vnics": {"aa:bb:cc:dd:ee:ff": {
         "ips": ["10.0.0.5", "fd00::5"], "vnet_id": 12340,
         "rules": [{"uuid": "...", "direction": "in", "action": "allow", "priority": 0,
                    "protocol": "tcp", "ports": [[22, 22], [8000, 8100]],
                    "peers": ["10.0.0.0/24", "fd00::1/128"], "log": false}]}}}

Field rules (what ``from_json`` enforces):

- ``version`` must be 1; ``generation`` an integer >= 0; ``cn_uuid`` a non-empty string.
- ``vnics`` maps a MAC (any spelling ``protocol.addr.parse_mac`` accepts; normalised to
  ``aa:bb:cc:dd:ee:ff``; two spellings of one MAC are an error) to a VNIC entry with ``ips``
  (IP addresses, may be empty), ``vnet_id`` (0..2^24-1) and ``rules``.
- A rule has ``uuid`` (non-empty string), ``direction`` (``in``/``out``: relative to the VNIC,
  i.e. already direction-mapped), ``action`` (``allow``/``block``), ``priority`` (0..100),
  ``protocol`` (``tcp udp icmp icmp6 ah esp``), ``peers`` (``"any"`` or a non-empty list of
  addresses / CIDR prefixes; host bits must be zero; a bare address means /32 or /128) and
  ``log`` (bool, optional, default false).
- tcp/udp rules need ``ports``: ``"all"`` or a non-empty list of ``[start, end]`` with
  1 <= start <= end <= 65535 (a single port is ``[p, p]``); ``types`` is not allowed.
- icmp/icmp6 rules need ``types``: ``"all"`` or a non-empty list of ``[type, code|null]``
  (0..255; null = every code of that type); ``ports`` is not allowed.
- ah/esp rules take neither ``ports`` nor ``types``.
- icmp peers must be IPv4 and icmp6 peers IPv6 (portolan drops the other family when it
  resolves peers, spec/fwrule.md §3.3), so a mixed list is refused rather than half-ignored.
- Unknown keys are ignored at every level (a newer portolan may add fields); booleans are
  never accepted where an integer is expected.

Errors: ``PolicyError(path, message)``, a ``ValueError``; ``path`` names the bad field in a
JSONPath-like form, e.g. ``vnics["02:00:00:00:00:01"].rules[3].ports[0][1]``.

``to_json(from_json(doc))`` is the canonical form of ``doc`` (normalised MACs and prefixes,
``log`` always present, port/type lists as lists of two-element lists).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any, Literal

from protocol.addr import format_mac, parse_mac

POLICY_VERSION = 1

DIRECTIONS = ("in", "out")
ACTIONS = ("allow", "block")
PROTOCOLS = ("tcp", "udp", "icmp", "icmp6", "ah", "esp")
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "ah": 51, "esp": 50}
PORT_PROTOCOLS = frozenset({"tcp", "udp"})
ICMP_PROTOCOLS = frozenset({"icmp", "icmp6"})
PRIORITY_MAX = 100
VNET_ID_MAX = (1 << 24) - 1

Direction = Literal["in", "out"]
Action = Literal["allow", "block"]
PortRanges = tuple[tuple[int, int], ...]
IcmpTypes = tuple[tuple[int, int | None], ...]
Network = IPv4Network | IPv6Network


class PolicyError(ValueError):
    """A policy document that does not validate; ``path`` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One effective rule of one VNIC (already owner-scoped, direction-mapped, resolved)."""

    uuid: str
    direction: Direction
    action: Action
    priority: int
    protocol: str
    ports: Literal["all"] | PortRanges | None = None  # tcp/udp only
    types: Literal["all"] | IcmpTypes | None = None  # icmp/icmp6 only
    peers: Literal["any"] | tuple[Network, ...] = "any"
    log: bool = False

    @property
    def protocol_number(self) -> int:
        return PROTOCOL_NUMBERS[self.protocol]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uuid": self.uuid,
            "direction": self.direction,
            "action": self.action,
            "priority": self.priority,
            "protocol": self.protocol,
        }
        if self.ports is not None:
            out["ports"] = self.ports if self.ports == "all" else [list(r) for r in self.ports]
        if self.types is not None:
            out["types"] = self.types if self.types == "all" else [list(t) for t in self.types]
        out["peers"] = self.peers if self.peers == "any" else [str(n) for n in self.peers]
        out["log"] = self.log
        return out


@dataclass(frozen=True, slots=True)
class VnicPolicy:
    """The firewall of one VNIC: its MAC (canonical text), addresses, vnet and rules."""

    mac: str
    ips: tuple[str, ...] = ()
    vnet_id: int = 0
    rules: tuple[PolicyRule, ...] = ()

    @property
    def mac_bytes(self) -> bytes:
        return parse_mac(self.mac)

    def to_json(self) -> dict[str, Any]:
        return {
            "ips": list(self.ips),
            "vnet_id": self.vnet_id,
            "rules": [r.to_json() for r in self.rules],
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """The whole document for one compute node; ``vnics`` is keyed by canonical MAC text."""

    cn_uuid: str
    generation: int
    vnics: Mapping[str, VnicPolicy] = field(default_factory=dict)
    version: int = POLICY_VERSION

    def vnic(self, mac: bytes | str) -> VnicPolicy | None:
        key = format_mac(mac) if isinstance(mac, bytes) else format_mac(parse_mac(mac))
        return self.vnics.get(key)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "cn_uuid": self.cn_uuid,
            "generation": self.generation,
            "vnics": {mac: v.to_json() for mac, v in sorted(self.vnics.items())},
        }


def to_json(policy: Policy) -> dict[str, Any]:
    """The JSON-ready dict of ``policy`` (canonical form)."""
    return policy.to_json()


# --------------------------------------------------------------------------- validation


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, f"expected an object, got {_type_name(value)}")
    return value


def _list(value: object, path: str, *, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise PolicyError(path, f"expected an array, got {_type_name(value)}")
    if non_empty and not value:
        raise PolicyError(path, "must not be empty")
    return list(value)


def _req(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise PolicyError(f"{path}.{key}" if path else key, "required field is missing")
    return obj[key]


def _int(value: object, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(path, f"expected an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise PolicyError(path, f"must be {lo}..{hi}, got {value}")
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(path, f"expected a non-empty string, got {_type_name(value)}")
    return value


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PolicyError(path, f"must be one of {', '.join(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def _ports(value: object, path: str) -> Literal["all"] | PortRanges:
    if value == "all":
        return "all"
    ranges = []
    for i, item in enumerate(_list(value, path, non_empty=True)):
        p = f"{path}[{i}]"
        pair = _list(item, p)
        if len(pair) != 2:
            raise PolicyError(p, f"expected [start, end], got {len(pair)} element(s)")
        start = _int(pair[0], f"{p}[0]", 1, 65535)
        end = _int(pair[1], f"{p}[1]", 1, 65535)
        if start > end:
            raise PolicyError(p, f"range start {start} is above its end {end}")
        ranges.append((start, end))
    return tuple(ranges)


def _types(value: object, path: str) -> Literal["all"] | IcmpTypes:
    if value == "all":
        return "all"
    types = []
    for i, item in enumerate(_list(value, path, non_empty=True)):
        p = f"{path}[{i}]"
        pair = _list(item, p)
        if len(pair) != 2:
            raise PolicyError(p, f"expected [type, code or null], got {len(pair)} element(s)")
        icmp_type = _int(pair[0], f"{p}[0]", 0, 255)
        code = None if pair[1] is None else _int(pair[1], f"{p}[1]", 0, 255)
        types.append((icmp_type, code))
    return tuple(types)


def _peers(value: object, path: str, protocol: str) -> Literal["any"] | tuple[Network, ...]:
    if value == "any":
        return "any"
    nets: list[Network] = []
    for i, item in enumerate(_list(value, path, non_empty=True)):
        p = f"{path}[{i}]"
        if not isinstance(item, str):
            raise PolicyError(p, f"expected an address or prefix, got {_type_name(item)}")
        try:
            net = ip_network(item.strip(), strict=True)
        except ValueError as e:
            raise PolicyError(p, f"not an address or a prefix with zero host bits: {e}") from None
        if protocol == "icmp" and net.version != 4:
            raise PolicyError(p, f"icmp rules take IPv4 peers only, got {net}")
        if protocol == "icmp6" and net.version != 6:
            raise PolicyError(p, f"icmp6 rules take IPv6 peers only, got {net}")
        nets.append(net)
    return tuple(nets)


def rule_from_json(value: object, path: str = "rule") -> PolicyRule:
    """Validate one rule object (``path`` prefixes error paths)."""
    r = _obj(value, path)
    protocol = _choice(_req(r, "protocol", path), f"{path}.protocol", PROTOCOLS)
    ports: Literal["all"] | PortRanges | None = None
    types: Literal["all"] | IcmpTypes | None = None
    if protocol in PORT_PROTOCOLS:
        ports = _ports(_req(r, "ports", path), f"{path}.ports")
        if "types" in r:
            raise PolicyError(f"{path}.types", f"{protocol} rules take ports, not types")
    elif protocol in ICMP_PROTOCOLS:
        types = _types(_req(r, "types", path), f"{path}.types")
        if "ports" in r:
            raise PolicyError(f"{path}.ports", f"{protocol} rules take types, not ports")
    else:
        for key in ("ports", "types"):
            if key in r:
                raise PolicyError(f"{path}.{key}", f"{protocol} rules take no {key}")
    log = r.get("log", False)
    if not isinstance(log, bool):
        raise PolicyError(f"{path}.log", f"expected a boolean, got {_type_name(log)}")
    return PolicyRule(
        uuid=_str(_req(r, "uuid", path), f"{path}.uuid"),
        direction=_choice(_req(r, "direction", path), f"{path}.direction", DIRECTIONS),  # type: ignore[arg-type]
        action=_choice(_req(r, "action", path), f"{path}.action", ACTIONS),  # type: ignore[arg-type]
        priority=_int(_req(r, "priority", path), f"{path}.priority", 0, PRIORITY_MAX),
        protocol=protocol,
        ports=ports,
        types=types,
        peers=_peers(_req(r, "peers", path), f"{path}.peers", protocol),
        log=log,
    )


def vnic_from_json(mac: str, value: object, path: str) -> VnicPolicy:
    v = _obj(value, path)
    ips = []
    for i, ip in enumerate(_list(_req(v, "ips", path), f"{path}.ips")):
        p = f"{path}.ips[{i}]"
        if not isinstance(ip, str):
            raise PolicyError(p, f"expected an IP address, got {_type_name(ip)}")
        try:
            ips.append(str(ip_address(ip.strip())))
        except ValueError:
            raise PolicyError(p, f"not an IP address: {ip!r}") from None
    vnet_id = _int(_req(v, "vnet_id", path), f"{path}.vnet_id", 0, VNET_ID_MAX)
    rules = tuple(
        rule_from_json(r, f"{path}.rules[{i}]")
        for i, r in enumerate(_list(_req(v, "rules", path), f"{path}.rules"))
    )
    return VnicPolicy(mac=mac, ips=tuple(ips), vnet_id=vnet_id, rules=rules)


def from_json(doc: object) -> Policy:
    """Validate a policy document and build the ``Policy``; raises ``PolicyError``."""
    d = _obj(doc, "")
    version = _req(d, "version", "")
    if isinstance(version, bool) or version != POLICY_VERSION:
        raise PolicyError("version", f"unsupported policy version {version!r} (expected 1)")
    cn_uuid = _str(_req(d, "cn_uuid", ""), "cn_uuid")
    generation = _int(_req(d, "generation", ""), "generation", 0, (1 << 63) - 1)
    vnics: dict[str, VnicPolicy] = {}
    for key, value in _obj(_req(d, "vnics", ""), "vnics").items():
        path = f"vnics[{key!r}]".replace("'", '"')
        if not isinstance(key, str):
            raise PolicyError(path, "a VNIC key must be a MAC address string")
        try:
            mac = format_mac(parse_mac(key))
        except ValueError:
            raise PolicyError(path, f"not a MAC address: {key!r}") from None
        if mac in vnics:
            raise PolicyError(path, f"MAC {mac} appears twice (under another spelling)")
        vnics[mac] = vnic_from_json(mac, value, path)
    return Policy(cn_uuid=cn_uuid, generation=generation, vnics=vnics, version=POLICY_VERSION)
