"""The description of a cluster: plain frozen dataclasses, no I/O.

A `ClusterSpec` says what to build; `lab.cluster.Cluster` builds it. Nothing here imports
portolan or varpd, so a spec can be written, printed and compared anywhere.

Invariants checked at construction (`ClusterSpec.__post_init__` raises `ValueError`):

- node names, CN UUIDs and underlay IPs are unique;
- ``backend`` is ``"memory"``, ``"udp"`` or ``"linux"`` and ``placement`` is ``"inprocess"``
  or ``"netns"``; the memory backend is one shared in-process underlay, so it needs
  ``placement="inprocess"``; the udp and linux backends need real namespaces
  (``placement="netns"``: one namespace and one ``varpd run`` process per node);
- ``portolan.placement`` is ``"inprocess"`` (served by this trio run, exactly as
  ``portolan serve`` serves) or ``"process"`` (a ``portolan serve`` child process); with
  ``placement="netns"`` portolan is always in this process, its thread joined to the hub
  namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["memory", "udp", "linux"]
Placement = Literal["inprocess", "netns"]
BACKENDS: tuple[str, ...] = ("memory", "udp", "linux")
PLACEMENTS: tuple[str, ...] = ("inprocess", "netns")
#: backend -> the placements it can run on
SUPPORTED: dict[str, tuple[str, ...]] = {
    "memory": ("inprocess",),
    "udp": ("netns",),
    "linux": ("netns",),
}

UL_PORT = 4789


class LabError(Exception):
    """The cluster could not be built or driven (a command failed, an API call was refused,
    a daemon did not start). Its text is meant for a person."""


@dataclass(frozen=True)
class NodeSpec:
    """One compute node: a varpd with its CN identity and underlay address."""

    name: str
    cn_uuid: str
    underlay_ip: str
    underlay_port: int = UL_PORT


@dataclass(frozen=True)
class DeviceSpec:
    """One overlay device created on every node, searched by the svp plugin.

    ``mtu`` is written to the device of a varpd process (netns placement); in-process nodes
    keep the shim's default."""

    name: str = "overlay0"
    vnet_id: int = 12340
    mtu: int = 1400


@dataclass(frozen=True)
class PortolanSpec:
    """The head node. ``store`` defaults to SQLite in the cluster's work folder;
    ``preload`` is a ``portolan load`` document imported (``Directory.load``: no log rows)
    before the service starts."""

    placement: Literal["inprocess", "process"] = "inprocess"
    store: str | None = None
    preload: dict[str, Any] | None = None
    reload_interval: float = 0.0


@dataclass(frozen=True)
class VarpdOptions:
    """How every node's varpd is configured.

    ``metrics`` / ``control_socket``: serve /metrics (port 0) and the control socket;
    ``firewall``: point ``portolan_api`` at the cluster's API (policy fetcher);
    ``log_interval``: the svp plugin's idle log-poll interval (None: its default);
    ``log_level``: for varpd processes (their stderr is relayed to the cluster's log)."""

    lookup_workers: int = 3
    metrics: bool = True
    control_socket: bool = True
    firewall: bool = True
    log_interval: float | None = None
    log_level: str = "INFO"


@dataclass(frozen=True)
class ClusterSpec:
    """A portolan, N compute nodes, one backend, one placement. See the module docstring."""

    nodes: tuple[NodeSpec, ...]
    backend: Backend = "memory"
    placement: Placement = "inprocess"
    devices: tuple[DeviceSpec, ...] = (DeviceSpec(),)
    portolan: PortolanSpec = field(default_factory=PortolanSpec)
    varpd: VarpdOptions = field(default_factory=VarpdOptions)
    #: first letters of every namespace, interface-name safe (netns placement)
    prefix: str = "lab"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"placement must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}"
            )
        if self.placement not in SUPPORTED[self.backend]:
            raise ValueError(
                f"the {self.backend} backend runs with placement "
                f"{' or '.join(SUPPORTED[self.backend])}, not {self.placement!r}"
            )
        for attr in ("name", "cn_uuid", "underlay_ip"):
            values = [getattr(n, attr) for n in self.nodes]
            if len(set(values)) != len(values):
                raise ValueError(f"node {attr}s must be unique")
        if len(self.prefix) > 8:
            raise ValueError("prefix: at most 8 characters (interface and namespace names)")

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def numbered_nodes(
    count: int,
    *,
    name: Callable[[int], str] = lambda i: f"cn{i}",
    cn_uuid: Callable[[int], str] = lambda i: f"00000000-0000-4000-8000-{i:012x}",
    underlay_ip: Callable[[int], str] = lambda i: (
        f"10.{20 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"
    ),
) -> tuple[NodeSpec, ...]:
    """``count`` nodes named, identified and addressed by their index (benchmarks)."""
    return tuple(NodeSpec(name(i), cn_uuid(i), underlay_ip(i)) for i in range(count))


__all__ = [
    "BACKENDS",
    "PLACEMENTS",
    "UL_PORT",
    "Backend",
    "ClusterSpec",
    "DeviceSpec",
    "LabError",
    "NodeSpec",
    "Placement",
    "PortolanSpec",
    "VarpdOptions",
    "numbered_nodes",
]
