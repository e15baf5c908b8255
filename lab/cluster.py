"""The one way to build, drive, observe and tear down a cluster described by a `ClusterSpec`.

    async with open_cluster(spec, log=print_event) as cluster:   # portolan up, nodes up
        await cluster.register_cns()                               # PUT /cns for every node
        vnic = await cluster.api("POST", "/vnics", {...})
        await cluster.vnic_add("cn-a", vnic["mac"])
        await cluster.cache_dest("cn-b", vnic["mac"])             # "10.0.0.1:4789" | None

Building, in order (`Cluster.__aenter__`): a work folder (temporary unless given); with
``placement="netns"`` the hub namespace and one namespace per node joined by veths, and the
calling thread joins the hub; the store preloaded when the spec carries a document; portolan
(in this trio run, or a ``portolan serve`` child); an ``httpx`` client on its API. Then the
nodes (`Cluster.start_nodes`, done by `open_cluster` unless ``start_nodes=False``, so that a
caller can provision through the API first): in-process `Varpd` objects on one shared
`MemoryUnderlay` (memory backend), or ``varpd run`` processes in the node namespaces (udp,
and linux once varpd has it). Every node gets every `DeviceSpec`'s device, searched by svp.

Observation is the same whatever the placement: `cache_dest` (a node's cache entry for a MAC),
`control` (any control-socket op), `metrics_urls`, and `api` (every call shown on the log as
``METHOD path body -> status``). In-process nodes also expose their `Varpd` and driver
(`Node.varpd`, `Node.driver`) and the cluster its `underlay` (tap, capture).

Teardown (`__aexit__`, also on failure or cancellation): the cluster's nursery is cancelled
(in-process daemons stop), varpd and portolan processes are terminated, the thread leaves the
hub namespace, every namespace is deleted, the temporary work folder is removed.

`log(source, text)` receives one call per event (commands run, API calls, varpd process
stderr); the default drops them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from lab.inprocess import (
    DriverFactory,
    PortolanProcess,
    preload,
    start_portolan_inprocess,
    start_varpd_inprocess,
)
from lab.netns import Log, Shell, Underlay, _no_log, in_netns
from lab.spec import ClusterSpec, LabError, NodeSpec

HUB_IP = "10.0.0.254"


@dataclass
class Node:
    """A running compute node. ``varpd``/``driver`` for in-process nodes; ``ns``/``process``
    for nodes in namespaces."""

    spec: NodeSpec
    folder: str = ""
    varpd: Any = None
    driver: Any = None
    ns: str = ""
    process: Any = None
    metrics_url: str = ""
    control_path: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cn_uuid(self) -> str:
        return self.spec.cn_uuid

    @property
    def underlay_ip(self) -> str:
        return self.spec.underlay_ip

    @property
    def underlay(self) -> str:
        """``ip:port`` of the node's VXLAN listener, as cache entries name it."""
        return f"{self.spec.underlay_ip}:{self.spec.underlay_port}"


def unavailable(spec: ClusterSpec) -> str | None:
    """None when this host can build ``spec``; else why not (callers skip or exit 2)."""
    if spec.placement == "inprocess":
        return None
    if spec.backend == "udp":
        try:
            import varpd.shim.udp  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name == "varpd.shim.udp":
                return "the udp backend (varpd.shim.udp) is not available yet"
            raise
    if spec.backend == "linux":
        import importlib.util

        if importlib.util.find_spec("varpd.linux") is None:
            return "the linux backend (varpd.linux) is not available yet"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (TAP devices unavailable)"
    if shutil.which("ip") is None:
        return "no `ip` command"
    return None


def _suffixes(spec: ClusterSpec) -> list[str]:
    """Namespace suffixes of the nodes: their names' last characters when those differ
    (``cn-a`` -> ``a``), else their indexes."""
    last = [n.name[-1] for n in spec.nodes]
    if len(set(last)) == len(last) and "ul" not in last:
        return last
    return [str(i) for i in range(len(spec.nodes))]


class Cluster:
    """A built cluster (see the module docstring). Use `open_cluster`, or
    ``async with Cluster(spec) as c: await c.start_nodes()``."""

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        log: Log | None = None,
        driver_factory: DriverFactory | None = None,
        workdir: str | None = None,
    ) -> None:
        self.spec = spec
        self.log: Log = log or _no_log
        self.driver_factory = driver_factory
        self.workdir = workdir or ""
        self._own_workdir = workdir is None
        self.nodes: dict[str, Node] = {n.name: Node(n) for n in spec.nodes}
        self.bound: dict[str, tuple[str, int]] = {}
        self.api_url = ""
        self.http: httpx.AsyncClient | None = None
        self.shell = Shell(self.log)
        self.netns: Underlay | None = None
        self.underlay: Any = None  # MemoryUnderlay of the memory backend
        self._portolan_process: PortolanProcess | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        if spec.backend == "memory":
            from varpd.shim.memory import MemoryUnderlay

            self.underlay = MemoryUnderlay()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            if self._own_workdir:
                self.workdir = tempfile.mkdtemp(prefix=f"portolan-{self.spec.prefix}-")
                stack.callback(shutil.rmtree, self.workdir, True)
            stack.push_async_callback(self._teardown)
            # portolan (a child process) stops after the nodes did, as a real one would
            stack.push_async_callback(self._stop_portolan_process)
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(self._nursery.cancel_scope.cancel)
            await self._start_portolan(stack)
            self.http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=self.api_url, timeout=10.0)
            )
        except BaseException as exc:
            if not await stack.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(*exc)

    async def _start_portolan(self, stack: contextlib.AsyncExitStack) -> None:
        spec = self.spec
        store = spec.portolan.store or f"sqlite:{os.path.join(self.workdir, 'portolan.db')}"
        host = "127.0.0.1"
        if spec.placement == "netns":
            self.netns = Underlay(self.shell, f"{spec.prefix}{os.getpid() % 0xFFFF:x}", HUB_IP)
            hub = await self.netns.build_hub()
            for node, suffix in zip(self.nodes.values(), _suffixes(self.spec), strict=True):
                node.ns = await self.netns.add_node(suffix, node.underlay_ip)
            # This thread joins the hub namespace: portolan's listeners and the API client
            # live there, next to the compute nodes' underlay.
            stack.enter_context(in_netns(hub))
            host = HUB_IP
        if spec.portolan.preload is not None:
            await preload(store, spec.portolan.preload)
        assert self._nursery is not None
        if spec.portolan.placement == "process" and spec.placement == "inprocess":
            self._portolan_process = PortolanProcess()
            self.bound = await self._portolan_process.start(
                store, host, spec.portolan.reload_interval
            )
        else:
            self.bound = await start_portolan_inprocess(
                self._nursery, store, host, spec.portolan.reload_interval
            )
        self.api_url = "http://{}:{}".format(*self.bound["api"])

    async def start_nodes(self) -> None:
        """Start every node's varpd (in-process ones in order, processes concurrently)."""
        assert self._nursery is not None
        if self.spec.placement == "inprocess":
            for node in self.nodes.values():
                await self._start_inprocess(node)
        else:
            async with trio.open_nursery() as starting:
                for node in self.nodes.values():
                    starting.start_soon(self._start_process, node)

    async def _start_inprocess(self, node: Node) -> None:
        assert self._nursery is not None
        node.folder = os.path.join(self.workdir, node.name)
        node.varpd, node.driver = await start_varpd_inprocess(
            self._nursery,
            self.spec,
            node.spec,
            folder=node.folder,
            underlay=self.underlay,
            svp=("127.0.0.1", self.bound["svp"][1]),
            api_url=self.api_url,
            driver_factory=self.driver_factory,
        )
        if node.varpd.metrics_address is not None:
            host, port = node.varpd.metrics_address
            node.metrics_url = f"http://{host}:{port}/metrics"
        node.control_path = node.varpd.control_path or ""

    async def _start_process(self, node: Node) -> None:
        from lab.varpd_process import VarpdProcess, write_config

        assert self._nursery is not None
        node.folder = os.path.join(self.workdir, node.name)
        path = write_config(
            self.spec, node.spec, node.folder, api_url=self.api_url,
            svp=(HUB_IP, self.bound["svp"][1]),
        )  # fmt: skip
        if self.spec.varpd.control_socket:
            node.control_path = os.path.join(node.folder, "varpd.sock")
        node.process = VarpdProcess(node.spec, node.ns, self.log)
        await node.process.start(self._nursery, path)
        node.metrics_url = node.process.metrics_url

    async def _stop_portolan_process(self) -> None:
        if self._portolan_process is not None:
            await self._portolan_process.stop()

    async def _teardown(self) -> None:
        with trio.CancelScope(shield=True):
            for node in self.nodes.values():
                if node.process is not None:
                    await node.process.stop()
            # the hub thread-switch is undone by the exit stack after this; namespaces last
            if self.netns is not None:
                await self.netns.teardown()

    # -- driving -----------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def nursery(self) -> trio.Nursery:
        """The cluster's nursery (tasks that must end with the cluster)."""
        assert self._nursery is not None
        return self._nursery

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One management-API call, shown on the log; LabError when it is refused."""
        assert self.http is not None
        response = await self.http.request(method, path, json=body)
        shown = "" if body is None else " " + ", ".join(f"{k}={v}" for k, v in body.items())
        self.log("api", f"{method} {path}{shown} -> {response.status_code}")
        if response.status_code >= 400:
            raise LabError(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json() if response.content else None

    async def register_cns(self) -> None:
        """``PUT /cns/{uuid}`` for every node (its underlay address), in spec order."""
        for node in self.nodes.values():
            await self.api(
                "PUT",
                f"/cns/{node.cn_uuid}",
                {"ip": node.underlay_ip, "port": node.spec.underlay_port},
            )

    async def control(self, node: str | Node, op: str, **args: Any) -> Any:
        """One control-socket request to a node's varpd (needs ``varpd.control_socket``)."""
        from varpd.adm import AdmError, call

        n = node if isinstance(node, Node) else self.nodes[node]
        if not n.control_path:
            raise LabError(f"varpd on {n.name} has no control socket")
        try:
            return await trio.to_thread.run_sync(call, n.control_path, op, args)
        except AdmError as exc:
            raise LabError(f"varpd on {n.name}: {op}: {exc}") from None

    def _device(self, device: str | None) -> str:
        return device or self.spec.devices[0].name

    async def vnic_add(
        self, node: str | Node, mac: str, *, device: str | None = None, tap: str | None = None
    ) -> Any:
        """Plug a VNIC into a node's varpd, as an orchestrator does (TAP name: udp backend)."""
        n = node if isinstance(node, Node) else self.nodes[node]
        if n.varpd is not None:
            return await n.varpd.vnic_add(self._device(device), mac, tap=tap)
        args: dict[str, Any] = {"name": self._device(device), "mac": mac}
        if tap is not None:
            args["tap"] = tap
        return await self.control(n, "vnic_add", **args)

    async def vnic_remove(self, node: str | Node, mac: str, *, device: str | None = None) -> None:
        n = node if isinstance(node, Node) else self.nodes[node]
        if n.varpd is not None:
            await n.varpd.vnic_remove(self._device(device), mac)
        else:
            await self.control(n, "vnic_rm", name=self._device(device), mac=mac)

    async def cache_dest(
        self, node: str | Node, mac: str | bytes, *, device: str | None = None
    ) -> str | None:
        """Where a node's cache sends ``mac`` (``ip:port``), or None (no entry, or drop)."""
        n = node if isinstance(node, Node) else self.nodes[node]
        if n.driver is not None:
            from protocol.addr import parse_mac

            raw = mac if isinstance(mac, bytes) else parse_mac(mac)
            entry = n.driver.cache_get(self._device(device), raw)
            return None if entry is None or entry.point is None else str(entry.point)
        from protocol.addr import format_mac

        text = format_mac(mac) if isinstance(mac, bytes) else mac
        try:
            result = await self.control(n, "cache_get", name=self._device(device), mac=text)
        except LabError:
            return None
        return result.get("dest")

    def metrics_urls(self) -> dict[str, str]:
        """``{"portolan": url, node name: url, ...}`` of every /metrics endpoint served."""
        host, port = self.bound["metrics"]
        urls = {"portolan": f"http://{host}:{port}/metrics"}
        urls.update({n.name: n.metrics_url for n in self.nodes.values() if n.metrics_url})
        return urls


@contextlib.asynccontextmanager
async def open_cluster(
    spec: ClusterSpec,
    *,
    log: Log | None = None,
    driver_factory: DriverFactory | None = None,
    workdir: str | None = None,
    start_nodes: bool = True,
) -> AsyncIterator[Cluster]:
    """Build ``spec``; yield the running `Cluster`; tear everything down on the way out."""
    async with Cluster(spec, log=log, driver_factory=driver_factory, workdir=workdir) as cluster:
        if start_nodes:
            await cluster.start_nodes()
        yield cluster


__all__ = ["HUB_IP", "Cluster", "LabError", "Node", "open_cluster", "unavailable"]
