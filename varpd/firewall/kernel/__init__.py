"""The cloud firewall in the kernel: the compiled policy enforced by nftables on a bridge.

With ``backend = "linux"`` a VNIC is a veth whose host end is a port of a Linux bridge, so
frames never pass through varpd and the Python engine (``varpd/firewall/engine.py``) cannot
judge them. This package turns the same policy document (``GET /firewalls/cns/{cn}/policy``,
fetched by the same ``PolicyFetcher``) into nftables objects and keeps the kernel in step.

    PolicyFetcher --apply(Policy)--> KernelFirewall.apply  (applier.py, one lock)
                                       | compile.py: per VNIC chains + peer sets (pure)
                                       | compile.TableLayout.diff: the commands that change
                                       v   only what changed
                                     NftDriver.run (nftables.py): one JSON batch = one
                                       kernel transaction (libnftables, or nft -j -f -)
                                       then flows.cut_flows: conntrack entries the new
                                       rules refuse are deleted (pyroute2 netlink)
    linux backend --set_port(mac, ifname)--> the VNIC's bridge port joins the port maps

- ``compile.py``: the table layout (read its docstring first: why a ``bridge`` table filters
  and a small ``inet`` table supplies connection state), rule order, peer sets.
- ``nftables.py``: the driver (libnftables by path, ``nft -j`` fallback; namespaces).
- ``applier.py``: ``KernelFirewall``, the incremental, atomic applier and its observation
  (kernel-side state for ``varpdadm firewall``, counters).
- ``flows.py``: judging and cutting conntrack entries after a change.
- ``counters.py``: Prometheus export of the per-VNIC nft counters.
- ``service.py``: ``KernelFirewallService``, the daemon's trio task around the applier
  (policies coalesced, VNIC ports from the linux driver, kernel state read back).

Semantics are the engine's (package ``varpd.firewall``): inbound default drop, outbound
default pass, highest priority wins with the tie-break against the default, state first,
NDP (hop limit 255) and DHCP answers exempt, ARP and every non-IP frame never filtered,
flows refused by a change cut. Differences that remain, by construction:

- State is one conntrack entry per flow, not one table per VNIC: between two local VNICs, a
  datagram the receiver refused leaves no state at the sender (the engine remembers it at
  the sender); ah/esp state between two local VNICs is shared by both ends.
- Later fragments never reach the filter alone: conntrack reassembles a datagram first and
  it is judged once (the engine judges the first fragment and lets the others follow it).
  A later fragment that overtakes its first is held for reassembly, not dropped.
- IPv6 AH: conntrack looks through the AH header to the transport it carries, so its state
  is per carried flow (the engine's ah/esp state is per address pair; IPv4 AH and ESP are
  per address pair in the kernel too). AH carrying nothing (next header 59) is not tracked.
- IPv6 packets with extension headers other than fragments are "other" to the rules (first
  header), as in the engine, but conntrack follows them to their transport for state.

Lifecycle: ``KernelFirewall`` builds the tables afresh with its first transaction (replacing
those of a previous varpd in the same batch) and leaves them in place when varpd stops: the
last policy stays enforced (fail-closed) until a new varpd replaces it.
"""

from .applier import KernelFirewall
from .compile import TableLayout, compile_policy, compile_vnic
from .nftables import NftDriver, NftError

__all__ = [
    "KernelFirewall",
    "NftDriver",
    "NftError",
    "TableLayout",
    "compile_policy",
    "compile_vnic",
]
