"""lab: what drives the whole system -- one description of a cluster, one way to build it.

Theory of operation
-------------------
A cluster is a portolan and N compute nodes (one varpd each) on one data-path backend:
``memory`` (every node in this process on one simulated underlay), ``udp`` (``varpd run``
processes in network namespaces joined by veths to a bridge, TAP devices for the VNICs) or
``linux`` (the same placement with the kernel's vxlan data path, when varpd has it). It is
described by a `ClusterSpec` (lab/spec.py: nodes, backend, placement, devices, how portolan
and varpd are configured) and built by `open_cluster` (lab/cluster.py), an async context
manager yielding a `Cluster` that drives it the same way whatever the placement: the
management API, the nodes' control sockets, their caches and their /metrics.

On it run the things that need the whole system: ``portolan demo`` (lab/demo.py, a
`lab.scenario.Scenario` of steps each with its expected and observed outcome), the
benchmarks (bench/convergence.py, bench/datapath.py) and the end-to-end tests.

Invariants
----------
- lab is the only package that imports both ``portolan`` and ``varpd`` (checked by
  tests/test_import_graph.py); nothing in portolan or varpd imports lab.
- Everything a cluster makes (tasks, processes, namespaces, its temporary folder) is gone
  when its context manager exits, also on failure or cancellation.

Lifecycle
---------
``async with open_cluster(spec) as cluster: ...`` inside one ``trio.run``; ``python -m lab
demo [--keep] [--netns] [--quiet]`` (what ``portolan demo`` execs) runs the demo.
"""

from lab.cluster import HUB_IP, Cluster, Node, open_cluster, unavailable
from lab.spec import (
    ClusterSpec,
    DeviceSpec,
    LabError,
    NodeSpec,
    PortolanSpec,
    VarpdOptions,
    numbered_nodes,
)

__all__ = [
    "HUB_IP",
    "Cluster",
    "ClusterSpec",
    "DeviceSpec",
    "LabError",
    "Node",
    "NodeSpec",
    "PortolanSpec",
    "VarpdOptions",
    "numbered_nodes",
    "open_cluster",
    "unavailable",
]
