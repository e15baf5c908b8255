"""`portolan-cni`: a CNI plugin that puts containers on a Portolan overlay network.

Theory of operation
-------------------
A container runtime (podman, containerd, CRI-O) executes the plugin once per operation, with
the operation in ``CNI_COMMAND``, the container in ``CNI_CONTAINERID`` / ``CNI_NETNS`` /
``CNI_IFNAME``, and the network configuration as JSON on stdin (CNI specification 1.0.0;
0.4.0 configurations are answered in 0.4.0's result shape). The plugin is a short-lived,
single-threaded, synchronous process: it talks HTTP to portolan's management API (httpx),
the varpd control protocol (`protocol.control` frames) to the compute node's varpd over its
Unix socket, and netlink (pyroute2) to the kernel, then prints one JSON document and exits.

ADD: ``POST /vnics`` (portolan allocates MAC and IP; the container id, interface name and
network name go into tags, and ``belongs_to_uuid`` is a UUID derived from them), then varpd
``vnic_add`` on the overlay device (udp backend: a TAP; linux backend: a veth), then the
tenant end of that link is moved from varpd's network namespace into ``CNI_NETNS``, renamed
``CNI_IFNAME`` and given its MAC, MTU, address and the network's gateway as default route.
varpd's namespace is found from the peer credentials of its control socket (the pid of the
process that listens on it) unless the configuration names it.

Invariants
----------
- Portolan is written first and cleaned last: as long as anything of an ADD exists, the
  portolan VNIC tagged with the container id exists, so DEL (or a retried ADD) can always find
  the MAC and remove the varpd device and the kernel link.
- A failed ADD undoes what it did, in reverse order, before reporting the error.
- DEL is idempotent: a missing netns, VNIC, varpd device or interface is success.
- ``cni`` imports ``protocol`` only, never ``portolan`` or ``varpd``.

Lifecycle
---------
``cni.main.main`` reads environment and stdin, dispatches to one command, prints the result
(or the spec's error JSON with a non-zero exit) and returns; nothing outlives the process.
Modules: `spec` (versions, errors, config, results), `api` (portolan client), `varpdctl`
(control-socket client), `netlink` (namespaces and links), `main` (the commands).
"""
