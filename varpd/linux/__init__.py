"""The kernel data path of varpd: ``backend = "linux"``.

Frames never pass through Python on this backend. Per overlay device varpd builds a Linux
bridge and a kernel ``vxlan`` netdev in it (VNI = vnetid, local/dstport = the device's
``vxlan/listen_ip``/``vxlan/listen_port``, ``nolearning l2miss l3miss proxy``); each VNIC
is a veth pair whose tenant end carries the VNIC's MAC (the orchestrator moves it into the
tenant's namespace) and whose host end is a bridge port. varpd fills the vxlan's fdb
(``MAC -> underlay ip:port``) and neighbour table (``IP -> MAC``, answered by the kernel's
proxy ARP/NDP) from the search plugins, in answer to the kernel's miss notifications.

Modules (each says more):

- `names`    the ``pv`` link-name scheme varpd recognises as its own;
- `netlink`  pyroute2 in a worker thread, the RTMGRP_NEIGH socket in the trio thread,
             AF_PACKET delivery;
- `devices`  create/remove bridge, vxlan and veth with rollback; fdb/neighbour writes;
- `neighwrite`  the hot fdb/neighbour writes as rtnetlink requests sent from the trio thread;
- `misses`   one lookup per key, negative memory, bounded queue; the synthesised frames;
- `model`    `LinuxDevice` and `LinuxVnic`, the driver's records;
- `upcalls`  lookups, injections and the target cache (a mixin of `LinuxDriver`);
- `driver`   `LinuxDriver`, the upcall interface of ``varpd.shim.OverlayDriver`` on these;
- `spoof`    the nftables spoof defence on the underlay.

What is not kernel work -- the device table, the argument and property checks, association,
degrade/restore/status, the upcall counters -- is `varpd.shim.bookkeeping`'s: it is the base
of `LinuxDevice` and `LinuxDriver` as it is of the shim's device and driver, so the two
backends accept, refuse and report alike.

Invariants: every kernel object varpd creates has a ``pv`` name (`names.is_own`) and only
those are ever deleted; no blocking netlink or file I/O runs on the trio thread (the only
netlink sent from it are `neighwrite`'s non-blocking requests, which the kernel applies inside
``send``, and the notifications it reads when they are ready); a failed creation leaves
nothing behind and names the failed step with the kernel's message.

Lifecycle: ``LinuxDriver.run`` (started by the daemon) sweeps stale vxlan/bridge links,
keeps stale host veth ends for adoption, listens and writes until cancelled, then leaves the
kernel objects in place (tenant veth ends survive a restart); the daemon calls
``finish_startup`` once its instances are restored, which deletes unclaimed host ends.

Deviations from the lead's design pins, with reasons:

- VLAN ids other than 0 are refused: this kernel (6.18, the project's CI VM) is built
  without bridge VLAN filtering, 802.1Q devices and tc classifiers, so there is no kernel
  mechanism to tag/untag per port. The udp backend keeps serving tagged VNICs.
- Gratuitous ARPs/NAs are handed to each VNIC through the host end of its veth, not sent
  into the bridge: the bridge would also flood them to the vxlan port (the proxy would
  answer them) and learn the announced MAC on the wrong port.
- ``add_vnic``/``remove_vnic`` are async here (``add_vnic_async``/``remove_vnic_async``):
  creating a veth pair is a netlink round trip that must not run on the trio thread.
"""

from varpd.linux.driver import LinuxDevice, LinuxDriver, LinuxVnic

__all__ = ["LinuxDevice", "LinuxDriver", "LinuxVnic"]
