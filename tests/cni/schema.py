"""The CNI specification's result and error documents, checked field by field.

`check_result(doc, version)` and `check_error(doc)` raise AssertionError naming the first
field that breaks the spec (1.0.0: SPEC.md "Success", "Error"; 0.4.0 additionally requires
``ips[].version``, which 1.0.0 removed). No third-party schema library: the rules are few.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _ip(text: Any, where: str) -> None:
    assert isinstance(text, str), f"{where} must be a string"
    ipaddress.ip_address(text)


def _cidr(text: Any, where: str) -> None:
    assert isinstance(text, str) and "/" in text, f"{where} must be CIDR text: {text!r}"
    ipaddress.ip_interface(text)


def check_result(doc: Any, version: str) -> None:
    assert isinstance(doc, dict), "the result is a JSON object"
    allowed = {"cniVersion", "interfaces", "ips", "routes", "dns"}
    assert set(doc) <= allowed, f"unknown result keys {set(doc) - allowed}"
    assert doc.get("cniVersion") == version, f"cniVersion {doc.get('cniVersion')} != {version}"
    interfaces = doc.get("interfaces", [])
    assert isinstance(interfaces, list)
    for i, iface in enumerate(interfaces):
        assert isinstance(iface, dict) and isinstance(iface.get("name"), str), f"interfaces[{i}]"
        assert set(iface) <= {"name", "mac", "sandbox", "mtu", "socketPath", "pciID"}
        if "mac" in iface:
            assert MAC.match(iface["mac"]), f"interfaces[{i}].mac {iface['mac']!r}"
        if "sandbox" in iface:
            assert isinstance(iface["sandbox"], str) and iface["sandbox"]
    ips = doc.get("ips", [])
    assert isinstance(ips, list)
    for i, ip in enumerate(ips):
        assert isinstance(ip, dict), f"ips[{i}]"
        _cidr(ip.get("address"), f"ips[{i}].address")
        if "gateway" in ip:
            _ip(ip["gateway"], f"ips[{i}].gateway")
        if "interface" in ip:
            assert isinstance(ip["interface"], int) and 0 <= ip["interface"] < len(interfaces)
        if version == "0.4.0":
            want = str(ipaddress.ip_interface(ip["address"]).version)
            assert ip.get("version") == want, f"ips[{i}].version must be {want!r} in 0.4.0"
        else:
            assert "version" not in ip, "1.0.0 removed ips[].version"
    routes = doc.get("routes", [])
    assert isinstance(routes, list)
    for i, route in enumerate(routes):
        assert isinstance(route, dict), f"routes[{i}]"
        _cidr(route.get("dst"), f"routes[{i}].dst")
        if "gw" in route:
            _ip(route["gw"], f"routes[{i}].gw")
    if "dns" in doc:
        dns = doc["dns"]
        assert isinstance(dns, dict)
        for key in ("nameservers", "search", "options"):
            assert isinstance(dns.get(key, []), list), f"dns.{key}"


def check_error(doc: Any) -> None:
    assert isinstance(doc, dict), "the error is a JSON object"
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}, f"error keys {set(doc)}"
    assert isinstance(doc.get("cniVersion"), str)
    assert isinstance(doc.get("code"), int) and doc["code"] > 0
    assert not 8 <= doc["code"] <= 10 and not 12 <= doc["code"] <= 99, "reserved code"
    assert isinstance(doc.get("msg"), str) and doc["msg"]
    assert isinstance(doc.get("details", ""), str)
