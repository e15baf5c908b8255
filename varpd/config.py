"""The varpd TOML configuration.

Top-level keys (all optional; defaults in brackets):

    cn_uuid         this compute node's UUID ["" = unknown]
    state_dir       folder of the instance state files [/var/lib/varpd]
    control_socket  Unix socket path of the control API [/var/run/varpd/varpd.sock]; "" = none
    metrics         host:port of the Prometheus endpoint [127.0.0.1:9339]; "" = none; port 0 ok
    portolan_api    http(s) URL of portolan's API; when set (cn_uuid required), varpd long-polls
                    GET {portolan_api}/firewalls/cns/{cn_uuid}/policy and enforces it [none]
    portolan_api_token  bearer token sent to the API (GETs do not need one) [none]
    backend         default data-path backend of the devices: "memory" | "udp" | "linux"
                    [memory]; linux = the kernel's vxlan/bridge/veth (varpd/linux)
    lookup_workers  number of lookup worker tasks [2 * CPUs + 1]
    lookup_timeout  seconds a plugin may take over one lookup before it is dropped [60]
    log_level       DEBUG | INFO | WARNING | ERROR [INFO]

    [firewall]      cloud firewall tunables (used when portolan_api is set)
    wait            long-poll wait in seconds, 1..300 [30]
    max_flows       tracked flows per VNIC (least recently used evicted), 16..10000000 [32768]

    [svp]           svp plugin tunables, shared by every svp instance (not properties, so
                    illumos' property set is kept). Seconds are numbers > 0 unless noted:
    query_timeout   seconds a query may wait for its answer [30]
    connect_timeout seconds a TCP connect may take [10]
    connect_wait    seconds a query waits for a connection when none is up, >= 0 [5]
    retries         re-sends of a query after a connection reset, 0..100 [2]
    log_interval    seconds between LOG_REQ polls when the log is idle [0.25]
    log_count       byte budget of one LOG_REQ, 76..4294967295 [1024]
    resolve_interval  seconds between DNS lookups of svp/host [30]
    dns_retry       seconds before retrying a transient DNS failure [1]
    backoff         array of reconnect delays in seconds (>= 0), last one repeats
                    [1, 2, 4, 8, 16, 32]
    degrade_after   consecutive connect failures before a connection is degraded, 0..1000 [6]
    version         SVP protocol version to speak, 1 | 2 [1]
    log_wait        wait for shootdowns with LOG_WAIT when portolan offers it (our SVP
                    extension); false: always poll LOG_REQ [true]
    log_wait_time   seconds one LOG_WAIT may be held (the server may grant less), 1..3600 [55]
    backoff_jitter  each reconnect delay is drawn from [(1 - this) * delay, delay], 0..1 [0.5]
    reconnect_spread  a reset healthy connection reconnects after U(0, this) seconds [0.5]

    [[device]]      one overlay device + its varpd instance, created at start unless restored
    name            link name (letters, digits, _ . -; starts with a letter; <= 31 chars)
    vnetid          0..16777215
    mtu             576..8900 [1400]
    backend         "memory" | "udp" | "linux" [top-level backend]; all devices of one
                    daemon share one
    search          search plugin: direct | files | svp
    props           table: "<search>/..." properties go to the plugin, every other key
                    (vxlan/listen_ip, vxlan/listen_port, ...) to the device. Both halves are
                    validated here, so ``check-config`` and ``run`` refuse the same files: an
                    unknown property, a bad value, or a required one left unset (the
                    plugin's required properties without a default, and the encapsulation's
                    vxlan/listen_ip) is an error naming ``device[N].props."KEY"``.

    [[device.vnic]] a local VNIC on that device
    mac             the VNIC's MAC
    vlan_id         0..4094 [0]
    tap             TAP device name (udp backend) [none]
    ifname          the same key under the linux backend's name: the tenant end of the
                    VNIC's veth pair [pvt<hash>]; give tap or ifname, not both

Unknown keys are refused, as are wrong types and values; every error names the key path, e.g.
``device[0].vnic[1].mac: invalid MAC address 'zz'``.

Device properties are pluggable: `ENCAP_PROPS` holds the properties every device of an
encapsulation has (the shim's), and a data-path backend that adds its own registers them with
`register_backend_props` (looked up by the device's ``backend``).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.addr import format_mac, parse_mac
from protocol.vxlan import VNI_MAX as VNETID_MAX

DEFAULT_STATE_DIR = "/var/lib/varpd"
DEFAULT_CONTROL_SOCKET = "/var/run/varpd/varpd.sock"
DEFAULT_METRICS = "127.0.0.1:9339"
BACKENDS = ("memory", "udp", "linux")
# Copies of varpd.shim.device's MTU bounds and varpd.firewall.conntrack.DEFAULT_MAX_FLOWS:
# importing those would pull trio and httpx into varpdadm, which reads DEFAULT_CONTROL_SOCKET.
MTU_MIN, MTU_MAX, MTU_DEFAULT = 576, 8900, 1400
FIREWALL_MAX_FLOWS_DEFAULT = 32768
LINK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
FIREWALL_WAIT_DEFAULT = 30.0
FIREWALL_WAIT_MAX = 300.0
FIREWALL_MAX_FLOWS_RANGE = (16, 10_000_000)
U32_MAX = 2**32 - 1

#: [svp] keys -> (kind, low, high, low_inclusive); kinds: "seconds" (int or float), "int"
SVP_KEYS: dict[str, tuple[str, float, float, bool]] = {
    "query_timeout": ("seconds", 0, 86400, False),
    "connect_timeout": ("seconds", 0, 86400, False),
    "connect_wait": ("seconds", 0, 86400, True),
    "retries": ("int", 0, 100, True),
    "log_interval": ("seconds", 0, 3600, False),
    "log_count": ("int", 76, U32_MAX, True),  # 4-byte status + one 72-byte route entry
    "resolve_interval": ("seconds", 0, 86400, False),
    "dns_retry": ("seconds", 0, 86400, False),
    "degrade_after": ("int", 0, 1000, True),
    "version": ("int", 1, 2, True),
    "log_wait_time": ("seconds", 1, 3600, True),
    "backoff_jitter": ("seconds", 0, 1, True),  # a fraction, parsed as a float
    "reconnect_spread": ("seconds", 0, 3600, True),
}


@dataclass(frozen=True)
class DevicePropSpec:
    """One device (not plugin) property: ``check(value)`` raises ValueError with the reason."""

    name: str
    check: Callable[[object], None]
    required: bool = False


def _check_listen_ip(value: object) -> None:
    from varpd.shim.device import validate_listen_ip  # lazily: the shim imports trio
    from varpd.shim.types import ShimError

    try:
        validate_listen_ip(value)
    except ShimError as exc:
        raise ValueError(str(exc)) from None


def _check_port(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a port number 1..65535, got {value!r}")
    text = str(value).strip()
    if not text.isdecimal() or not text.isascii() or not 1 <= int(text) <= 65535:
        raise ValueError(f"expected a port number 1..65535, got {value!r}")


#: encapsulation -> the properties each of its devices has (varpd/shim/device.py's, minus
#: mtu, which has its own key, and the read-only vnetid/encap/varpd/id)
ENCAP_PROPS: dict[str, tuple[DevicePropSpec, ...]] = {
    "vxlan": (
        DevicePropSpec("vxlan/listen_ip", _check_listen_ip, required=True),
        DevicePropSpec("vxlan/listen_port", _check_port),
    ),
}
#: backend -> extra device properties it understands (see `register_backend_props`)
BACKEND_PROPS: dict[str, tuple[DevicePropSpec, ...]] = {}


def register_backend_props(backend: str, specs: tuple[DevicePropSpec, ...]) -> None:
    """Declare the device properties a data-path backend adds to its encapsulation's."""
    BACKEND_PROPS[backend] = tuple(specs)


def device_prop_specs(backend: str, encap: str = "vxlan") -> dict[str, DevicePropSpec]:
    specs = [*ENCAP_PROPS.get(encap, ()), *BACKEND_PROPS.get(backend, ())]
    return {spec.name: spec for spec in specs}


def prop_path(path: str, key: str) -> str:
    """``device[0].props."vxlan/listen_ip"``: property names carry '/', so they are quoted."""
    return f'{path}."{key}"'


def validate_device_props(
    backend: str, props: dict[str, object], path: str, encap: str = "vxlan", *, require: bool = True
) -> dict[str, object]:
    """Check device properties against the encapsulation and the backend (values unchanged);
    with ``require``, the required ones must be given."""
    specs = device_prop_specs(backend, encap)
    for key, value in props.items():
        spec = specs.get(key)
        if spec is None:
            raise ConfigError(
                prop_path(path, key), f"unknown property; known: {', '.join(sorted(specs))}"
            )
        try:
            spec.check(value)
        except ValueError as exc:
            raise ConfigError(prop_path(path, key), str(exc)) from None
    for name, spec in specs.items():
        if require and spec.required and name not in props:
            raise ConfigError(
                prop_path(path, name), f"missing required property of the {encap} encapsulation"
            )
    return dict(props)


def default_workers() -> int:
    return 2 * (os.cpu_count() or 1) + 1


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class VnicConfig:
    mac: str  # canonical aa:bb:cc:dd:ee:ff
    vlan_id: int = 0
    tap: str | None = None


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    vnetid: int
    search: str
    mtu: int = MTU_DEFAULT
    backend: str = "memory"
    plugin_props: dict[str, object] = field(default_factory=dict)
    device_props: dict[str, object] = field(default_factory=dict)
    vnics: tuple[VnicConfig, ...] = ()


@dataclass(frozen=True)
class FirewallConfig:
    wait: float = FIREWALL_WAIT_DEFAULT
    max_flows: int = FIREWALL_MAX_FLOWS_DEFAULT


@dataclass(frozen=True)
class VarpdConfig:
    cn_uuid: str = ""
    state_dir: str = DEFAULT_STATE_DIR
    control_socket: str = DEFAULT_CONTROL_SOCKET
    metrics: str = DEFAULT_METRICS
    portolan_api: str | None = None
    portolan_api_token: str | None = None
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    svp: dict[str, object] = field(default_factory=dict)  # SvpOptions fields given in [svp]
    backend: str = "memory"
    lookup_workers: int = field(default_factory=default_workers)
    lookup_timeout: float = 60.0
    log_level: str = "INFO"
    devices: tuple[DeviceConfig, ...] = ()

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if not self.metrics:
            return None
        return parse_hostport(self.metrics, "metrics")


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal():
        raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    n = int(port)
    if not 0 <= n <= 65535:
        raise ConfigError(key, f"port {n} is out of range 0..65535")
    return host, n


def _typed(d: dict[str, Any], key: str, path: str, kinds: type | tuple[type, ...]) -> Any:
    value = d[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(path, f"expected {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(path, f"expected {_kind_name(kinds)}, got {value!r}")
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        dict: "a table",
        list: "an array",
        bool: "a boolean",
    }
    ks = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(k, k.__name__) for k in ks)


def _unknown(d: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in d:
        if key not in allowed:
            path = f"{prefix}.{key}" if prefix else key
            raise ConfigError(path, f"unknown key (expected one of: {', '.join(sorted(allowed))})")


def parse_vnic(d: object, path: str) -> VnicConfig:
    if not isinstance(d, dict):
        raise ConfigError(path, "expected a table")
    _unknown(d, {"mac", "vlan_id", "vlan", "tap", "ifname"}, path)
    if "mac" not in d:
        raise ConfigError(f"{path}.mac", "missing required key")
    mac_text = _typed(d, "mac", f"{path}.mac", str)
    try:
        mac = format_mac(parse_mac(mac_text))
    except ValueError as exc:
        raise ConfigError(f"{path}.mac", str(exc)) from None
    vlan = 0
    for vkey in ("vlan_id", "vlan"):
        if vkey in d:
            vlan = _typed(d, vkey, f"{path}.{vkey}", int)
            if not 0 <= vlan <= 4094:
                raise ConfigError(f"{path}.{vkey}", f"{vlan} is out of range 0..4094")
    tap = None
    if "tap" in d and "ifname" in d:
        raise ConfigError(f"{path}.ifname", "give tap or ifname, not both (they are one key)")
    for tkey in ("tap", "ifname"):
        if tkey in d:
            tap = _typed(d, tkey, f"{path}.{tkey}", str) or None
    return VnicConfig(mac, vlan, tap)


def split_props(
    search: str, props: dict[str, object]
) -> tuple[dict[str, object], dict[str, object]]:
    """(plugin props, device props): the ``<search>/`` prefix goes to the plugin (as dladm)."""
    plugin: dict[str, object] = {}
    device: dict[str, object] = {}
    for key, value in props.items():
        (plugin if key.startswith(search + "/") else device)[key] = value
    return plugin, device


def validate_plugin_props(
    search: str, props: dict[str, object], path: str, *, require: bool = True
) -> dict[str, object]:
    """Validate ``<search>/...`` props against the plugin's specs; with ``require``, the
    plugin's required properties that have no default must be given."""
    from varpd.plugins import PLUGINS
    from varpd.plugins.base import PropError

    try:
        cls = PLUGINS[search]
    except KeyError:
        raise ConfigError(
            path.rsplit(".", 1)[0] + ".search",
            f"unknown search plugin {search!r} (available: {', '.join(PLUGINS.available())})",
        ) from None
    out: dict[str, object] = {}
    for key, value in props.items():
        spec = cls.prop_spec(key)
        if spec is None:
            known = ", ".join(s.name for s in cls.props) or "none"
            raise ConfigError(prop_path(path, key), f"unknown property; known: {known}")
        try:
            out[key] = spec.validate(value)
        except PropError as exc:
            raise ConfigError(prop_path(path, key), exc.message) from None
    if require:
        for spec in cls.props:
            if spec.required and spec.default is None and spec.name not in out:
                raise ConfigError(
                    prop_path(path, spec.name),
                    f"missing required property of search plugin {search}",
                )
    return out


def parse_device(d: object, path: str, default_backend: str) -> DeviceConfig:
    if not isinstance(d, dict):
        raise ConfigError(path, "expected a table")
    _unknown(d, {"name", "vnetid", "mtu", "backend", "search", "props", "vnic"}, path)
    for key in ("name", "vnetid", "search"):
        if key not in d:
            raise ConfigError(f"{path}.{key}", "missing required key")
    name = _typed(d, "name", f"{path}.name", str)
    if not LINK_NAME.match(name):
        raise ConfigError(f"{path}.name", f"{name!r} is not a valid link name")
    vnetid = _typed(d, "vnetid", f"{path}.vnetid", int)
    if not 0 <= vnetid <= VNETID_MAX:
        raise ConfigError(f"{path}.vnetid", f"{vnetid} is out of range 0..{VNETID_MAX}")
    mtu = MTU_DEFAULT
    if "mtu" in d:
        mtu = _typed(d, "mtu", f"{path}.mtu", int)
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ConfigError(f"{path}.mtu", f"{mtu} is out of range {MTU_MIN}..{MTU_MAX}")
    backend = default_backend
    if "backend" in d:
        backend = _typed(d, "backend", f"{path}.backend", str)
        if backend not in BACKENDS:
            raise ConfigError(
                f"{path}.backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}"
            )
    search = _typed(d, "search", f"{path}.search", str)
    props = _typed(d, "props", f"{path}.props", dict) if "props" in d else {}
    plugin_raw, device_props = split_props(search, props)
    if "mtu" in device_props:
        raise ConfigError(prop_path(f"{path}.props", "mtu"), "set mtu with the device's mtu key")
    # unknown and bad values first (either half), then what is missing
    plugin_props = validate_plugin_props(search, plugin_raw, f"{path}.props", require=False)
    validate_device_props(backend, device_props, f"{path}.props", require=False)
    validate_plugin_props(search, plugin_raw, f"{path}.props")
    validate_device_props(backend, device_props, f"{path}.props")
    vnics_raw = _typed(d, "vnic", f"{path}.vnic", list) if "vnic" in d else []
    vnics = tuple(parse_vnic(v, f"{path}.vnic[{i}]") for i, v in enumerate(vnics_raw))
    seen: set[str] = set()
    for i, v in enumerate(vnics):
        if v.mac in seen:
            raise ConfigError(f"{path}.vnic[{i}].mac", f"duplicate VNIC {v.mac}")
        seen.add(v.mac)
    return DeviceConfig(name, vnetid, search, mtu, backend, plugin_props, dict(device_props), vnics)


def _number(value: object, path: str, kind: str, lo: float, hi: float, lo_incl: bool) -> Any:
    """A validated number of ``kind`` ("int" | "seconds") in ``lo``..``hi``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            path, f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
        )
    if kind == "int" and not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(path, f"expected a finite number, got {value!r}")
    low_ok = value >= lo if lo_incl else value > lo
    if not low_ok or value > hi:
        lo_text = f"{lo:g}" if lo_incl else f"above {lo:g}"
        raise ConfigError(path, f"{value!r} is out of range ({lo_text} .. {hi:g})")
    return float(value) if kind == "seconds" else int(value)


def parse_svp(d: object, path: str = "svp") -> dict[str, object]:
    """The ``[svp]`` table: validated `SvpOptions` fields (only the keys given)."""
    if not isinstance(d, dict):
        raise ConfigError(path, "expected a table")
    _unknown(d, {*SVP_KEYS, "backoff", "log_wait"}, path)
    out: dict[str, object] = {}
    if "log_wait" in d:
        out["log_wait"] = _typed(d, "log_wait", f"{path}.log_wait", bool)
    for key, (kind, lo, hi, lo_incl) in SVP_KEYS.items():
        if key in d:
            out[key] = _number(d[key], f"{path}.{key}", kind, lo, hi, lo_incl)
    if "backoff" in d:
        steps = _typed(d, "backoff", f"{path}.backoff", list)
        if not steps:
            raise ConfigError(f"{path}.backoff", "must list at least one delay")
        if len(steps) > 64:
            raise ConfigError(f"{path}.backoff", "at most 64 delays")
        out["backoff"] = tuple(
            _number(v, f"{path}.backoff[{i}]", "seconds", 0, 86400, True)
            for i, v in enumerate(steps)
        )
    return out


def parse_firewall(d: object, path: str = "firewall") -> FirewallConfig:
    if not isinstance(d, dict):
        raise ConfigError(path, "expected a table")
    _unknown(d, {"wait", "max_flows"}, path)
    kw: dict[str, Any] = {}
    if "wait" in d:
        kw["wait"] = _number(d["wait"], f"{path}.wait", "seconds", 1, FIREWALL_WAIT_MAX, True)
    if "max_flows" in d:
        lo, hi = FIREWALL_MAX_FLOWS_RANGE
        kw["max_flows"] = _number(d["max_flows"], f"{path}.max_flows", "int", lo, hi, True)
    return FirewallConfig(**kw)


def parse_config(data: dict[str, Any]) -> VarpdConfig:
    """Build a `VarpdConfig` from a decoded TOML document, or raise `ConfigError`."""
    allowed = {
        "cn_uuid",
        "state_dir",
        "control_socket",
        "metrics",
        "portolan_api",
        "portolan_api_token",
        "firewall",
        "svp",
        "backend",
        "lookup_workers",
        "lookup_timeout",
        "log_level",
        "device",
    }
    _unknown(data, allowed, "")
    kw: dict[str, Any] = {}
    if "cn_uuid" in data:
        text = _typed(data, "cn_uuid", "cn_uuid", str)
        if text:
            try:
                uuid.UUID(text)
            except ValueError:
                raise ConfigError("cn_uuid", f"{text!r} is not a UUID") from None
        kw["cn_uuid"] = text
    for key in ("state_dir", "control_socket"):
        if key in data:
            kw[key] = _typed(data, key, key, str)
    if "state_dir" in kw and not kw["state_dir"]:
        raise ConfigError("state_dir", "must not be empty")
    if "metrics" in data:
        kw["metrics"] = _typed(data, "metrics", "metrics", str)
        if kw["metrics"]:
            parse_hostport(kw["metrics"], "metrics")
    if "portolan_api" in data:
        api = _typed(data, "portolan_api", "portolan_api", str)
        if api and not re.match(r"^https?://[^/\s]+", api):
            raise ConfigError("portolan_api", f"expected an http(s) URL, got {api!r}")
        kw["portolan_api"] = api or None
        if api and not kw.get("cn_uuid"):
            raise ConfigError("cn_uuid", "required when portolan_api is set (the policy is per CN)")
    if "portolan_api_token" in data:
        token = _typed(data, "portolan_api_token", "portolan_api_token", str)
        if any(c.isspace() for c in token):
            raise ConfigError("portolan_api_token", "must not contain white space")
        kw["portolan_api_token"] = token or None
    if "firewall" in data:
        kw["firewall"] = parse_firewall(data["firewall"])
    if "svp" in data:
        kw["svp"] = parse_svp(data["svp"])
    backend = "memory"
    if "backend" in data:
        backend = _typed(data, "backend", "backend", str)
        if backend not in BACKENDS:
            raise ConfigError("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if "lookup_workers" in data:
        n = _typed(data, "lookup_workers", "lookup_workers", int)
        if not 1 <= n <= 4096:
            raise ConfigError("lookup_workers", f"{n} is out of range 1..4096")
        kw["lookup_workers"] = n
    if "lookup_timeout" in data:
        t = _typed(data, "lookup_timeout", "lookup_timeout", (int, float))
        if not t > 0:
            raise ConfigError("lookup_timeout", "must be a positive number of seconds")
        kw["lookup_timeout"] = float(t)
    if "log_level" in data:
        level = _typed(data, "log_level", "log_level", str).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level", f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
        kw["log_level"] = level
    devices_raw = _typed(data, "device", "device", list) if "device" in data else []
    devices = tuple(parse_device(d, f"device[{i}]", backend) for i, d in enumerate(devices_raw))
    names: set[str] = set()
    vnetids: set[int] = set()
    for i, dev in enumerate(devices):
        if dev.name in names:
            raise ConfigError(f"device[{i}].name", f"duplicate device name {dev.name!r}")
        if dev.vnetid in vnetids:
            raise ConfigError(f"device[{i}].vnetid", f"vnetid {dev.vnetid} is used twice")
        names.add(dev.name)
        vnetids.add(dev.vnetid)
    backends = {dev.backend for dev in devices}
    if len(backends) > 1:
        raise ConfigError(
            "device",
            "all devices of one varpd must use the same backend "
            f"(found {', '.join(sorted(backends))})",
        )
    kw["backend"] = backends.pop() if backends else backend
    return VarpdConfig(devices=devices, **kw)


def load_config(path: str | os.PathLike[str]) -> VarpdConfig:
    """Read and validate a TOML file; `ConfigError` names the file problem or the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
    return parse_config(data)
