"""`portolan-cni` driven the way a runtime drives it, against real namespaces and daemons.

Each test gets a fresh `Cluster` (tests/cni/cluster.py: portolan in ns ul, a varpd per
compute node in ns cn1 / cn2, joined by veths on a bridge) and execs the installed plugin
with the spec's environment and the network configuration on stdin, for ADD / CHECK / DEL
into container namespaces the test makes. Results are checked against the spec's shapes
(tests/cni/schema.py) and against the kernel (iproute2 JSON in the container namespace),
portolan's API and varpd's control socket. The backend is parametrised: udp (TAP) always,
linux (veth) when varpd has it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import ping as echo
from tests.cni import schema
from tests.cni.cluster import CNS, GATEWAY, Cluster, backend_unavailable, finish_plugin, run
from tests.cni.cluster import unavailable as cluster_unavailable

pytestmark = pytest.mark.netns

BACKENDS = ["udp", "linux"]


@pytest.fixture(params=BACKENDS)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    reason = cluster_unavailable() or backend_unavailable(request.param)
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path, backend=request.param)
    try:
        c.build()
        yield c
    except BaseException:
        print(c.diagnostics())
        raise
    finally:
        c.close()


def _addr_state(ns: str, ifname: str) -> dict:
    (link,) = json.loads(run("ip", "-n", ns, "-j", "addr", "show", "dev", ifname).stdout)
    return link


def _default_gw(ns: str) -> str | None:
    routes = json.loads(run("ip", "-n", ns, "-j", "route", "show", "default").stdout)
    return routes[0].get("gateway") if routes else None


def _ping(ns: str, dst: str, bound: float = 15.0) -> None:
    ok, out = echo(ns, dst, count=1, deadline=bound)
    assert ok, f"no reply from {dst} within {bound}s: {out}"


def _leftover_links(c: Cluster, cn: str, *, host_ends: bool = True) -> list[str]:
    """Links in the compute node's namespace that are neither ours (lo, ul0) nor varpd's
    per-device links (linux backend: vxlan and bridge); with ``host_ends=False`` the host
    ends of live VNICs' veths (``pvh...``, linux backend) are not counted either."""
    own = ("pvx", "pvb") if host_ends else ("pvx", "pvb", "pvh")
    return [n for n in c.links(c.ns[cn]) if n not in ("lo", "ul0") and not n.startswith(own)]


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0"])
def test_add_check_del_configure_the_kernel_and_both_daemons(cluster: Cluster, version: str):
    c = cluster
    k1 = c.container_ns()
    conf = c.conf("cn1", cniVersion=version)
    status, result = c.exec_plugin("ADD", conf, container_id="ctr-one", netns=k1)
    assert status == 0, result
    schema.check_result(result, version)
    (iface,) = result["interfaces"]
    (ip,) = result["ips"]
    assert iface["name"] == "eth0" and iface["sandbox"].endswith(k1)
    assert ip["gateway"] == GATEWAY and result["routes"] == [{"dst": "0.0.0.0/0", "gw": GATEWAY}]
    address = ipaddress.ip_interface(ip["address"])
    assert address in ipaddress.ip_network(c.network["subnet"]) or address.network == (
        ipaddress.ip_network(c.network["subnet"])
    )

    # the kernel: the interface in the container namespace as the result says
    link = _addr_state(k1, "eth0")
    assert link["address"] == iface["mac"]
    assert link["mtu"] == 1400
    assert "UP" in link["flags"]
    assert [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]] == [ip["address"]]
    assert _default_gw(k1) == GATEWAY
    assert _leftover_links(c, "cn1", host_ends=False) == []  # the tenant end moved out

    # portolan and varpd hold the VNIC, tagged with the container
    (vnic,) = c.vnics()
    assert vnic["mac"] == iface["mac"] and vnic["ip"] == str(address.ip)
    assert vnic["cn_uuid"] == CNS["cn1"][0]
    assert vnic["tags"]["cni.container_id"] == "ctr-one"
    assert vnic["tags"]["cni.ifname"] == "eth0" and vnic["belongs_to_uuid"]
    assert c.varpd_vnics("cn1") == [iface["mac"]]

    status, out = c.exec_plugin(
        "CHECK", {**conf, "prevResult": result}, container_id="ctr-one", netns=k1
    )
    assert (status, out) == (0, None)

    status, out = c.exec_plugin("DEL", {**conf, "prevResult": result}, container_id="ctr-one",
                                netns=k1)  # fmt: skip
    assert (status, out) == (0, None)
    assert c.vnics() == []
    assert c.varpd_vnics("cn1") == []
    assert c.links(k1) == ["lo"]
    assert _leftover_links(c, "cn1") == []

    # DEL is idempotent: again, and with the namespace gone
    assert c.exec_plugin("DEL", conf, container_id="ctr-one", netns=k1) == (0, None)
    run("ip", "netns", "del", k1)
    assert c.exec_plugin("DEL", conf, container_id="ctr-one", netns=k1) == (0, None)
    assert c.exec_plugin("DEL", conf, container_id="ctr-one", netns="") == (0, None)


def test_containers_on_two_nodes_ping_across_the_overlay(cluster: Cluster):
    c = cluster
    k1, k2 = c.container_ns(), c.container_ns()
    s1, r1 = c.exec_plugin("ADD", c.conf("cn1"), container_id="ctr-a", netns=k1)
    s2, r2 = c.exec_plugin("ADD", c.conf("cn2"), container_id="ctr-b", netns=k2)
    assert s1 == 0 and s2 == 0, (r1, r2)
    ip1 = r1["ips"][0]["address"].split("/")[0]
    ip2 = r2["ips"][0]["address"].split("/")[0]
    assert ip1 != ip2
    _ping(k1, ip2)
    _ping(k2, ip1)
    # B leaves: its VNIC is gone from portolan and A can no longer reach it
    assert c.exec_plugin("DEL", c.conf("cn2"), container_id="ctr-b", netns=k2) == (0, None)
    assert [v["mac"] for v in c.vnics()] == [r1["interfaces"][0]["mac"]]
    ok, out = echo(k1, ip2, count=1, deadline=2)
    assert not ok, out


def test_check_reports_what_changed_since_add(cluster: Cluster):
    c = cluster
    k1 = c.container_ns()
    conf = c.conf("cn1")
    status, result = c.exec_plugin("ADD", conf, container_id="ctr-c", netns=k1)
    assert status == 0, result
    checked = {**conf, "prevResult": result}
    address = result["ips"][0]["address"]
    mac = result["interfaces"][0]["mac"]

    run("ip", "-n", k1, "route", "del", "default")
    status, err = c.exec_plugin("CHECK", checked, container_id="ctr-c", netns=k1)
    assert status != 0 and err["code"] == 104 and GATEWAY in err["msg"], err
    schema.check_error(err)
    run("ip", "-n", k1, "route", "add", "default", "via", GATEWAY)
    assert c.exec_plugin("CHECK", checked, container_id="ctr-c", netns=k1) == (0, None)

    run("ip", "-n", k1, "addr", "del", address, "dev", "eth0")
    status, err = c.exec_plugin("CHECK", checked, container_id="ctr-c", netns=k1)
    assert status != 0 and err["code"] == 104 and address in err["msg"], err
    run("ip", "-n", k1, "addr", "add", address, "dev", "eth0")
    run("ip", "-n", k1, "route", "replace", "default", "via", GATEWAY)

    c.api("DELETE", f"/vnics/{mac}")  # portolan forgot it
    status, err = c.exec_plugin("CHECK", checked, container_id="ctr-c", netns=k1)
    assert status != 0 and err["code"] == 104 and "portolan" in err["msg"], err
    # DEL still cleans varpd and the kernel through prevResult
    assert c.exec_plugin("DEL", checked, container_id="ctr-c", netns=k1) == (0, None)
    assert c.varpd_vnics("cn1") == []
    assert c.links(k1) == ["lo"]


def test_a_failed_add_leaves_nothing_behind(cluster: Cluster):
    c = cluster
    k1 = c.container_ns()
    # varpd refuses (no such overlay device): the portolan VNIC is deleted again
    status, err = c.exec_plugin("ADD", c.conf("cn1", overlay="nosuch0"), container_id="x1",
                                netns=k1)  # fmt: skip
    assert status != 0 and err["code"] == 101 and "not_found" in err["msg"], err
    schema.check_error(err)
    assert c.vnics() == []
    # the link cannot be moved (varpd_netns names the wrong namespace): varpd's device and the
    # portolan VNIC are both removed
    wrong = f"/var/run/netns/{c.ns['cn2']}"
    status, err = c.exec_plugin("ADD", c.conf("cn1", varpd_netns=wrong), container_id="x2",
                                netns=k1)  # fmt: skip
    assert status != 0 and err["code"] == 102, err
    schema.check_error(err)
    assert c.vnics() == []
    assert c.varpd_vnics("cn1") == []
    assert _leftover_links(c, "cn1") == []
    assert c.links(k1) == ["lo"]
    # the interface name is taken in the container: refused before anything is created
    run("ip", "-n", k1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    status, err = c.exec_plugin("ADD", c.conf("cn1"), container_id="x3", netns=k1)
    assert status != 0 and err["code"] == 102 and "exists" in err["msg"], err
    assert c.vnics() == [] and c.varpd_vnics("cn1") == []
    # and afterwards a good ADD works
    run("ip", "-n", k1, "link", "del", "eth0")
    status, result = c.exec_plugin("ADD", c.conf("cn1"), container_id="x4", netns=k1)
    assert status == 0, result


def test_labels_and_cni_args_set_tags_and_the_firewall_flag(cluster: Cluster):
    c = cluster
    k1, k2 = c.container_ns(), c.container_ns()
    args = "IgnoreUnknown=1;K8S_POD_NAME=web-0;PORTOLAN_TAG_role=www;PORTOLAN_FIREWALL=true"
    status, r1 = c.exec_plugin("ADD", c.conf("cn1", tags={"tier": "front"}), container_id="t1",
                               netns=k1, args=args)  # fmt: skip
    assert status == 0, r1
    labels = {"cni": {"labels": [{"key": "portolan.tag.role", "value": "db"},
                                 {"key": "portolan.firewall", "value": "true"},
                                 {"key": "app", "value": "ignored"}]}}  # fmt: skip
    status, r2 = c.exec_plugin("ADD", c.conf("cn1", args=labels), container_id="t2", netns=k2)
    assert status == 0, r2
    by_ctr = {v["tags"]["cni.container_id"]: v for v in c.vnics()}
    assert by_ctr["t1"]["tags"]["role"] == "www" and by_ctr["t1"]["tags"]["tier"] == "front"
    assert by_ctr["t1"]["firewall_enabled"] is True
    assert by_ctr["t2"]["tags"]["role"] == "db" and "app" not in by_ctr["t2"]["tags"]
    assert by_ctr["t2"]["firewall_enabled"] is True
    # an unknown CNI_ARGS key without IgnoreUnknown is refused, and nothing is created
    k3 = c.container_ns()
    status, err = c.exec_plugin("ADD", c.conf("cn1"), container_id="t3", netns=k3, args="FOO=1")
    assert status != 0 and err["code"] == 4, err
    assert len(c.vnics()) == 2


def test_errors_are_the_specs_documents(cluster: Cluster):
    c = cluster
    k1 = c.container_ns()
    cases = [
        ({**c.conf("cn1"), "cniVersion": "0.2.0"}, "ADD", k1, 1),
        ({**c.conf("cn1"), "ipam": {"type": "host-local"}}, "ADD", k1, 2),
        (c.conf("cn1"), "ADD", "/var/run/netns/pcni-no-such-ns", 3),
        (c.conf("cn1"), "ADD", "", 4),
        ({**c.conf("cn1"), "mtu": 100}, "ADD", k1, 7),
        (c.conf("cn1", api="http://127.0.0.1:9"), "ADD", k1, 11),
        (c.conf("cn1", varpd_socket=str(c.tmp / "nope.sock")), "ADD", k1, 11),
        (c.conf("cn1", api="http://127.0.0.1:9"), "DEL", k1, 11),
    ]
    for conf, command, netns, code in cases:
        status, err = c.exec_plugin(command, conf, container_id="e1", netns=netns)
        assert status != 0, (conf, err)
        schema.check_error(err)
        assert err["code"] == code, (command, conf, err)
    proc = c.spawn_plugin("ADD", c.conf("cn1"), container_id="e1", netns=k1)
    status, err = finish_plugin(proc, "{not json")
    assert status != 0 and err["code"] == 6
    assert c.vnics() == [] and c.varpd_vnics("cn1") == []
    status, doc = c.exec_plugin("VERSION", {"cniVersion": "0.4.0"})
    assert status == 0 and doc == {"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0"]}


def test_a_retried_add_after_a_crash_replaces_the_half_made_attachment(cluster: Cluster):
    c = cluster
    k1 = c.container_ns()
    status, first = c.exec_plugin("ADD", c.conf("cn1"), container_id="r1", netns=k1)
    assert status == 0, first
    # the runtime lost the result and tears the namespace down without DEL, then retries ADD
    run("ip", "netns", "del", k1)
    k1b = c.container_ns()
    status, second = c.exec_plugin("ADD", c.conf("cn1"), container_id="r1", netns=k1b)
    assert status == 0, second
    (vnic,) = c.vnics()
    assert vnic["mac"] == second["interfaces"][0]["mac"]
    assert c.varpd_vnics("cn1") == [vnic["mac"]]


@pytest.mark.slow
def test_twenty_concurrent_adds_get_distinct_addresses_and_leak_nothing(cluster: Cluster):
    c = cluster
    n = 20
    namespaces = [c.container_ns() for _ in range(n)]
    procs = [
        c.spawn_plugin("ADD", c.conf("cn1"), container_id=f"par{i}", netns=ns)
        for i, ns in enumerate(namespaces)
    ]
    results = [finish_plugin(p, timeout=120) for p in procs]
    failed = [r for r in results if r[0] != 0]
    assert not failed, failed
    ips = {r["ips"][0]["address"] for _, r in results}
    macs = {r["interfaces"][0]["mac"] for _, r in results}
    assert len(ips) == n and len(macs) == n
    assert {v["mac"] for v in c.vnics()} == macs
    assert set(c.varpd_vnics("cn1")) == macs
    assert _leftover_links(c, "cn1", host_ends=False) == []
    for ns, (_, r) in zip(namespaces, results, strict=True):
        assert _addr_state(ns, "eth0")["address"] == r["interfaces"][0]["mac"]
    procs = [
        c.spawn_plugin("DEL", c.conf("cn1"), container_id=f"par{i}", netns=ns)
        for i, ns in enumerate(namespaces)
    ]
    assert all(finish_plugin(p, timeout=120) == (0, None) for p in procs)
    assert c.vnics() == [] and c.varpd_vnics("cn1") == []
    assert _leftover_links(c, "cn1") == []
    assert all(c.links(ns) == ["lo"] for ns in namespaces)
