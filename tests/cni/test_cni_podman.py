"""A real container runtime attaching containers through `portolan-cni`: rootful podman.

Podman (Debian's 4.x, ``network_backend = "cni"``) runs with everything of its own under this
test's temporary folder (``--root``/``--runroot``, vfs storage, a containers.conf naming our
network configuration folder and a plugin folder holding a link to the installed
``portolan-cni``). The image is Debian's static busybox imported with ``podman import``; no
registry is involved.

Podman runs inside a helper process's namespaces: the network namespace ``ul`` of the test
cluster (where portolan's API listens, as on a management network) and a private mount
namespace in which the hybrid-cgroup ``/sys/fs/cgroup/unified`` mount is detached (crun
refuses hybrid cgroup layouts whose v2 half has controllers; containers run with
``--cgroups disabled``). Container namespaces made by podman live in that mount namespace;
the plugin, exec'd by podman there, reaches each compute node's varpd by its socket path.

Two networks ``pcbluecn1`` / ``pcbluecn2`` are the same portolan network attached through the
varpd of cn1 and of cn2; a container on each pings the other across the overlay, then one is
removed and its VNIC is gone from portolan (and from its varpd).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cni.cluster import Cluster, backend_unavailable, run
from tests.cni.cluster import unavailable as cluster_unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow]

IMAGE = "localhost/pcbusybox:latest"
RUN_OPTS = ["--cgroups", "disabled", "--ulimit", "nofile=4096:4096", "--ulimit",
            "nproc=4096:4096", "--cap-add", "NET_RAW", "-d"]  # fmt: skip


def tools_missing() -> str | None:
    for tool, package in (("podman", "podman"), ("crun", "crun"), ("busybox", "busybox-static"),
                          ("nsenter", "util-linux"), ("unshare", "util-linux")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install {package} containernetworking-plugins)"
    return None


class Podman:
    """podman confined to one folder, run inside a helper's (network, mount) namespaces."""

    def __init__(self, c: Cluster, tmp: Path) -> None:
        self.c = c
        self.tmp = tmp
        plugins = tmp / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "portolan-cni").symlink_to(c.plugin)
        self.netdir = tmp / "net"
        self.netdir.mkdir()
        (tmp / "containers.conf").write_text(
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n"
            f"[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{self.netdir}\"\n"
            f"cni_plugin_dirs = [\"{plugins}\", \"/usr/lib/cni\"]\n"
        )  # fmt: skip
        # podman wants a short runroot (< 50 characters): its storage lives in /tmp/pcnipod*
        for old in Path("/tmp").glob("pcnipod*"):  # left by a killed run (vfs: no mounts)
            shutil.rmtree(old, ignore_errors=True)
        self.store = Path(tempfile.mkdtemp(prefix="pcnipod", dir="/tmp"))
        self.env = {**os.environ, "CONTAINERS_CONF": str(tmp / "containers.conf")}
        script = "umount /sys/fs/cgroup/unified 2>/dev/null; exec sleep 3600"
        self.helper = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{c.ns['ul']}", "unshare", "-m",
             "--propagation", "private", "sh", "-c", script],
            start_new_session=True,
        )  # fmt: skip
        time.sleep(0.3)

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        argv = ["nsenter", "-t", str(self.helper.pid), "-m", "-n", "podman",
                "--root", str(self.store / "root"), "--runroot", str(self.store / "run"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout if proc.returncode == 0 else proc.stderr

    def network(self, name: str, cn: str) -> None:
        conf = self.c.conf(cn)
        del conf["cniVersion"], conf["name"]
        doc = {"cniVersion": "1.0.0", "name": name, "plugins": [conf]}
        (self.netdir / f"{name}.conflist").write_text(json.dumps(doc))

    def image(self) -> None:
        root = self.tmp / "image"
        (root / "bin").mkdir(parents=True)
        shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
        for name in ("sh", "ping", "ip", "sleep", "true"):
            (root / "bin" / name).symlink_to("busybox")
        run("tar", "-C", str(root), "-cf", str(self.tmp / "image.tar"), ".")
        self("import", str(self.tmp / "image.tar"), IMAGE)

    def close(self) -> None:
        try:
            self("rm", "-af", "-t", "0", check=False)
        finally:
            self.helper.kill()
            self.helper.wait()
            shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture(params=["udp", "linux"])
def podman(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Podman]:
    reason = tools_missing() or cluster_unavailable() or backend_unavailable(request.param)
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path, backend=request.param)
    p = None
    try:
        c.build()
        p = Podman(c, tmp_path / "podman")
        p.image()
        probe = p("run", "--rm", *RUN_OPTS[:-1], "--network", "none", IMAGE, "true", check=False)
        if p("ps", "-a", "-q").strip() or "Error" in probe:
            pytest.skip(f"podman cannot run a container on this machine: {probe.strip()}")
        yield p
    except BaseException:
        print(c.diagnostics())
        raise
    finally:
        if p is not None:
            p.close()
        c.close()


def _ping(p: Podman, name: str, dst: str, bound: float = 20.0) -> None:
    t0 = time.monotonic()
    out = ""
    while time.monotonic() - t0 < bound:
        out = p("exec", name, "ping", "-c", "1", "-W", "1", dst, check=False)
        if "1 packets received" in out:
            return
    raise AssertionError(f"{name} got no reply from {dst} within {bound}s: {out}")


def test_podman_containers_on_two_nodes_ping_and_removal_deletes_the_vnic(podman: Podman):
    p, c = podman, podman.c
    p.network("pcbluecn1", "cn1")
    p.network("pcbluecn2", "cn2")
    id_a = p("run", *RUN_OPTS, "--name", "pca", "--network", "pcbluecn1", IMAGE, "sleep", "600")
    id_b = p("run", *RUN_OPTS, "--name", "pcb", "--network", "pcbluecn2", IMAGE, "sleep", "600")
    by_ctr = {v["tags"]["cni.container_id"]: v for v in c.vnics()}
    vnic_a, vnic_b = by_ctr[id_a.strip()], by_ctr[id_b.strip()]
    assert vnic_a["cn_uuid"] != vnic_b["cn_uuid"]
    assert c.varpd_vnics("cn1") == [vnic_a["mac"]] and c.varpd_vnics("cn2") == [vnic_b["mac"]]
    shown = p("exec", "pca", "ip", "addr", "show", "eth0")
    assert vnic_a["mac"] in shown and f"{vnic_a['ip']}/24" in shown
    _ping(p, "pca", vnic_b["ip"])
    _ping(p, "pcb", vnic_a["ip"])

    p("rm", "-f", "-t", "0", "pcb")
    assert [v["mac"] for v in c.vnics()] == [vnic_a["mac"]]
    assert c.varpd_vnics("cn2") == []
    out = p("exec", "pca", "ping", "-c", "1", "-W", "2", vnic_b["ip"], check=False)
    assert "1 packets received" not in out
