"""The CNI specification's vocabulary: versions, error codes, environment, config, results.

Everything here is pure (no I/O): `parse_env` reads a mapping like ``os.environ``,
`parse_config` reads the bytes of stdin, `add_result` builds the result document in the shape
of the configuration's ``cniVersion``. Any problem is a `CniError` carrying the spec's code
(1-99 reserved by the spec, ours from 100 up), which `main` prints as the error document.

Network configuration keys (all documented in the README, "## Containers"):

==================  ========  ============================================================
key                 required  meaning
==================  ========  ============================================================
cniVersion          yes       "1.0.0" or "0.4.0"
name                yes       the network's name (goes into the VNIC's tags)
type                yes       "portolan-cni" (the runtime finds the executable by it)
api                 yes       portolan's management API base URL, ``http://host:1280``
api_token_file      no        a file holding the bearer token for writes
network_uuid        yes       the portolan network the VNICs are created on
cn_uuid             yes       this compute node's uuid in portolan
varpd_socket        no        varpd's control socket (``/var/run/varpd/varpd.sock``)
varpd_netns         no        path of varpd's network namespace (default: the namespace of
                              the process listening on ``varpd_socket``)
overlay             no        varpd's overlay device for this network (``overlay0``)
mtu                 no        MTU of the container's interface (1400; 576-8900)
owner_uuid          no        owner_uuid written on the VNICs
tags                no        default tags of every VNIC (string keys; str/int/bool values)
firewall            no        default of the VNIC's ``firewall_enabled`` (false)
timeout             no        seconds allowed for each API / varpd call (10)
dns                 no        passed through into the result
args, prevResult, runtimeConfig, capabilities: as the spec says.
==================  ========  ============================================================
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SPEC_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0")
PLUGIN_TYPE = "portolan-cni"

# The spec's error codes (1-99 are the spec's).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
# Ours, from 100 up.
PORTOLAN_ERROR = 100  # portolan refused the request (the message is portolan's)
VARPD_ERROR = 101  # varpd refused the request (the message is varpd's)
NETLINK_ERROR = 102  # the kernel refused to move or configure the interface
SUBNET_FULL = 103  # portolan has no free address left on the network
CHECK_FAILED = 104  # CHECK found the container's attachment not as ADD left it

ERROR_NAMES = {
    INCOMPATIBLE_VERSION: "incompatible CNI version",
    UNSUPPORTED_FIELD: "unsupported field in network configuration",
    UNKNOWN_CONTAINER: "container unknown or does not exist",
    INVALID_ENVIRONMENT: "invalid necessary environment variables",
    IO_FAILURE: "I/O failure",
    DECODE_FAILURE: "failed to decode content",
    INVALID_CONFIG: "invalid network config",
    TRY_AGAIN_LATER: "try again later",
    PORTOLAN_ERROR: "portolan refused the request",
    VARPD_ERROR: "varpd refused the request",
    NETLINK_ERROR: "netlink operation failed",
    SUBNET_FULL: "no free address on the network",
    CHECK_FAILED: "attachment check failed",
}

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# Tags the plugin writes on every VNIC it creates (users cannot override them).
TAG_CONTAINER = "cni.container_id"
TAG_IFNAME = "cni.ifname"
TAG_NETWORK = "cni.network"
RESERVED_TAGS = (TAG_CONTAINER, TAG_IFNAME, TAG_NETWORK)
# Where belongs_to_uuid comes from: uuid5(BELONGS_NS, "<network>/<container id>").
BELONGS_NS = uuid.UUID("8a6b1f8e-4c5d-5e2f-9a41-706f72746f6c")

# CNI_ARGS keys / label keys we understand.
ARG_FIREWALL = "PORTOLAN_FIREWALL"
ARG_TAG_PREFIX = "PORTOLAN_TAG_"
LABEL_FIREWALL = "portolan.firewall"
LABEL_TAG_PREFIX = "portolan.tag."
_KNOWN_ARG_PREFIXES = ("K8S_POD_",)

_KNOWN_KEYS = {
    "cniVersion", "name", "type", "api", "api_token_file", "network_uuid", "cn_uuid",
    "varpd_socket", "varpd_netns", "overlay", "mtu", "owner_uuid", "tags", "firewall",
    "timeout", "dns", "args", "prevResult", "runtimeConfig", "capabilities",
}  # fmt: skip


class CniError(Exception):
    """A failure reported to the runtime as the spec's error document."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K2=V2`` into a dict; a pair without ``=`` is an error (code 4)."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def parse_env(environ: Mapping[str, str]) -> Env:
    """The spec's environment; which variables are required depends on the command."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"CNI_COMMAND must be one of {', '.join(COMMANDS)}, not {command!r}",
        )
    required = {
        "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
        "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
        "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
        "VERSION": (),
    }[command]
    missing = [k for k in required if not environ.get(k)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)}")
    ifname = environ.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or "/" in ifname or ifname in (".", "..")):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_IFNAME {ifname!r} is not an interface name")
    return Env(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=ifname,
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
    )


@dataclass
class NetConf:
    version: str
    name: str
    api: str = ""
    api_token_file: str | None = None
    network_uuid: str = ""
    cn_uuid: str = ""
    varpd_socket: str = "/var/run/varpd/varpd.sock"
    varpd_netns: str | None = None
    overlay: str = "overlay0"
    mtu: int = 1400
    owner_uuid: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    firewall: bool = False
    timeout: float = 10.0
    dns: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    prev_result: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def belongs_to(self, container_id: str) -> str:
        return str(uuid.uuid5(BELONGS_NS, f"{self.name}/{container_id}"))

    def token(self) -> str | None:
        if not self.api_token_file:
            return None
        try:
            with open(self.api_token_file, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError as exc:
            raise CniError(IO_FAILURE, f"cannot read api_token_file: {exc}") from None
        return text or None


def config_version(data: bytes) -> str:
    """The ``cniVersion`` of stdin if it can be read and is supported, else ours."""
    try:
        version = json.loads(data).get("cniVersion")
    except Exception:
        return SPEC_VERSION
    return version if version in SUPPORTED_VERSIONS else SPEC_VERSION


def _want(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool) -> Any:
    value = raw.get(key)
    if value is None:
        if required:
            raise CniError(INVALID_CONFIG, f"network configuration needs {key!r}")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CniError(INVALID_CONFIG, f"network configuration key {key!r} has the wrong type")
    return value


def _uuid(raw: dict[str, Any], key: str, required: bool) -> str | None:
    value = _want(raw, key, str, required)
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise CniError(INVALID_CONFIG, f"{key} {value!r} is not a UUID") from None


def parse_config(data: bytes, command: str = "ADD") -> NetConf:
    """Decode and validate the network configuration (VERSION needs only ``cniVersion``)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, f"network configuration is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "network configuration must be a JSON object")
    version = raw.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    conf = NetConf(version=version, name=str(raw.get("name") or ""), raw=raw)
    if command == "VERSION":
        return conf
    if raw.get("ipam"):
        raise CniError(UNSUPPORTED_FIELD, "'ipam' is not used: portolan allocates addresses")
    unknown = sorted(set(raw) - _KNOWN_KEYS - {"ipam"})
    if unknown:
        raise CniError(INVALID_CONFIG, f"unknown network configuration keys: {', '.join(unknown)}")
    conf.name = _want(raw, "name", str, True)
    if _want(raw, "type", str, True) != PLUGIN_TYPE:
        raise CniError(INVALID_CONFIG, f"type must be {PLUGIN_TYPE!r}")
    conf.api = _want(raw, "api", str, True).rstrip("/")
    if not conf.api.startswith(("http://", "https://")):
        raise CniError(INVALID_CONFIG, f"api {conf.api!r} is not an http(s) URL")
    conf.api_token_file = _want(raw, "api_token_file", str, False)
    conf.network_uuid = _uuid(raw, "network_uuid", True) or ""
    conf.cn_uuid = _uuid(raw, "cn_uuid", True) or ""
    conf.owner_uuid = _uuid(raw, "owner_uuid", False)
    conf.varpd_socket = _want(raw, "varpd_socket", str, False) or conf.varpd_socket
    conf.varpd_netns = _want(raw, "varpd_netns", str, False)
    conf.overlay = _want(raw, "overlay", str, False) or conf.overlay
    mtu = _want(raw, "mtu", int, False)
    if mtu is not None:
        if not 576 <= mtu <= 8900:
            raise CniError(INVALID_CONFIG, f"mtu {mtu} is outside 576-8900")
        conf.mtu = mtu
    conf.tags = dict(_want(raw, "tags", dict, False) or {})
    fw = _want(raw, "firewall", bool, False)
    conf.firewall = bool(fw)
    timeout = _want(raw, "timeout", (int, float), False)
    if timeout is not None:
        if timeout <= 0:
            raise CniError(INVALID_CONFIG, "timeout must be positive")
        conf.timeout = float(timeout)
    conf.dns = _want(raw, "dns", dict, False)
    conf.args = dict(_want(raw, "args", dict, False) or {})
    conf.prev_result = _want(raw, "prevResult", dict, False)
    return conf


def _flag(text: object, where: str) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise CniError(INVALID_CONFIG, f"{where}: {text!r} is not a boolean")


def vnic_attributes(conf: NetConf, env: Env) -> tuple[dict[str, Any], bool]:
    """Tags and the firewall flag of a new VNIC: config defaults, then ``args`` labels, then
    ``CNI_ARGS``; the plugin's own tags (container id, ifname, network) last."""
    tags = dict(conf.tags)
    firewall = conf.firewall
    labels = (conf.args.get("cni") or {}).get("labels") or []
    if not isinstance(labels, list):
        raise CniError(INVALID_CONFIG, "args.cni.labels must be a list")
    for label in labels:
        if not isinstance(label, dict) or not isinstance(label.get("key"), str):
            raise CniError(INVALID_CONFIG, "args.cni.labels entries are {key, value}")
        key, value = label["key"], label.get("value", "")
        if key == LABEL_FIREWALL:
            firewall = _flag(value, key)
        elif key.startswith(LABEL_TAG_PREFIX) and len(key) > len(LABEL_TAG_PREFIX):
            tags[key[len(LABEL_TAG_PREFIX) :]] = value
    ours = conf.args.get("portolan") or {}
    if not isinstance(ours, dict):
        raise CniError(INVALID_CONFIG, "args.portolan must be an object")
    tags.update(ours.get("tags") or {})
    if "firewall" in ours:
        firewall = _flag(ours["firewall"], "args.portolan.firewall")
    ignore_unknown = _flag(env.args.get("IgnoreUnknown", "0"), "IgnoreUnknown")
    for key, value in env.args.items():
        if key == ARG_FIREWALL:
            firewall = _flag(value, key)
        elif key.startswith(ARG_TAG_PREFIX) and len(key) > len(ARG_TAG_PREFIX):
            tags[key[len(ARG_TAG_PREFIX) :]] = value
        elif (
            key != "IgnoreUnknown"
            and not key.startswith(_KNOWN_ARG_PREFIXES)
            and not ignore_unknown
        ):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: unknown key {key!r}")
    for key in list(tags):
        if not isinstance(key, str) or not key:
            raise CniError(INVALID_CONFIG, f"tag name {key!r} is not a non-empty string")
        if not isinstance(tags[key], (str, int, float, bool)):
            raise CniError(INVALID_CONFIG, f"tag {key!r} must be a string, number or boolean")
    tags[TAG_CONTAINER] = env.container_id
    tags[TAG_IFNAME] = env.ifname
    tags[TAG_NETWORK] = conf.name
    return tags, firewall


def add_result(
    version: str,
    *,
    ifname: str,
    mac: str,
    sandbox: str,
    address: str,
    gateway: str | None,
    dns: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ADD result: one interface in the sandbox, its address, the default route."""
    iface = ipaddress.ip_interface(address)
    ip: dict[str, Any] = {"address": str(iface), "interface": 0}
    if gateway:
        ip["gateway"] = gateway
    if version == "0.4.0":
        ip = {"version": str(iface.version), **ip}
    routes = []
    if gateway:
        routes.append({"dst": "0.0.0.0/0" if iface.version == 4 else "::/0", "gw": gateway})
    result: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [{"name": ifname, "mac": mac, "sandbox": sandbox}],
        "ips": [ip],
        "routes": routes,
    }
    if dns:
        result["dns"] = dns
    return result
