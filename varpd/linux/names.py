"""Names of the kernel objects the linux backend creates, and how varpd recognises its own.

Every link varpd makes starts with ``pv`` and a one-letter role, followed by hex digits:

    pvx<vnetid hex>          the device's vxlan netdev        e.g. pvx10c0
    pvb<vnetid hex>          the device's Linux bridge        e.g. pvb10c0
    pvh<12 hex>              a VNIC's host-side veth end      e.g. pvh3f09c2a1d0b4
    pvt<12 hex>              a VNIC's tenant-side veth end, when the VNIC names none

The 12 hex digits of a VNIC are a hash of (vnetid, MAC), so a restarted varpd computes the
same host-end name for the same VNIC and adopts the link it finds (the tenant end may have
moved to another namespace meanwhile; a veth pair dies with either end, so the host end must
survive a restart). Interface names are at most 15 characters (IFNAMSIZ - 1); these are at
most 15. ``is_own`` is what the start-up sweep uses: only links matching these patterns are
ever deleted, nothing else in the namespace is touched. The tenant end is never matched by
the sweep (it may carry any name the operator chose, and it may be in another namespace).
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "pv"
IFNAMSIZ = 16
_OWN = re.compile(r"^pv(x|b)[0-9a-f]{1,6}$|^pvh[0-9a-f]{12}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.@:+-]{1,15}$")


def vxlan_name(vnet_id: int) -> str:
    return f"pvx{vnet_id:x}"


def bridge_name(vnet_id: int) -> str:
    return f"pvb{vnet_id:x}"


def _vnic_hash(vnet_id: int, mac: bytes) -> str:
    return hashlib.sha256(vnet_id.to_bytes(4, "big") + mac).hexdigest()[:12]


def host_name(vnet_id: int, mac: bytes) -> str:
    return "pvh" + _vnic_hash(vnet_id, mac)


def tenant_name(vnet_id: int, mac: bytes) -> str:
    return "pvt" + _vnic_hash(vnet_id, mac)


def is_own(ifname: str) -> bool:
    """A link the sweep may delete (vxlan, bridge, host-side veth of this scheme)."""
    return bool(_OWN.match(ifname))


def is_host_end(ifname: str) -> bool:
    return ifname.startswith("pvh") and is_own(ifname)


def check_ifname(name: str) -> str | None:
    """Why ``name`` cannot be a tenant-end interface name, or None."""
    if not _IFNAME.match(name) or name in (".", ".."):
        return f"{name!r} is not a valid interface name (1-15 characters, no '/' or spaces)"
    if is_own(name):
        return f"{name!r} uses varpd's own link name scheme (pvx/pvb/pvh); choose another"
    return None
