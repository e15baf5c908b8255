"""Proxy ARP, NDP and DHCP: the helpers plugins use to answer broadcast-ish frames locally.

These are varpd code, as in libvarpd (libvarpd_arp.c); they see the head frame of a lookup
request (``req.frame``) and talk to the shim only through the upcall interface:

- **ARP** (`proxy_arp`): only a well-formed Ethernet/IPv4 ARP *request* is answered; replies,
  other operations and gratuitous ARP (sender IP == target IP) are dropped. The plugin's
  ``arp(target_ip)`` gives the MAC; the frame is rewritten into a reply *in place* (so the L2
  header, VLAN tag included, and any padding are kept): op 2, sender = (answer MAC, target IP),
  target = (requester MAC, requester IP), Ethernet dst = requester, src = answer. The reply is
  INJECTed up to the device's VNICs, then the request is DROPped.
- **NDP** (`proxy_ndp`): a Neighbor Solicitation to 33:33:xx multicast, IPv6 with ICMPv6 as the
  next header, IPv6 destination in ff02::/16, target not multicast/v4-mapped/loopback, and a
  Source Link-Layer Address option (zero-length options refuse the frame). The type check keeps
  the illumos quirk (refused only if type != 135 *and* code != 0). The answer is a new frame:
  the original L2 header with dst/src rewritten, IPv6 from the target to the solicitor (hop
  limit, traffic class and flow label kept), a Neighbor Advertisement with Solicited+Override
  and a Target Link-Layer Address option, with its ICMPv6 checksum. INJECT, then DROP.
- **DHCP** (`proxy_dhcp`): a broadcast IPv4/UDP 68->67 frame of at least IPv4+UDP+300 bytes
  (the IP check keeps the illumos AND quirk). The plugin's ``dhcp(req)`` names the DHCP server
  MAC; the Ethernet destination is rewritten to it and the frame RESENT into the transmit path
  (where it meets the target cache as unicast), then the request is DROPped.

Every refusal drops the request and is counted in ``proxy_dropped{kind,reason}``; every answer
in ``proxied{kind}``. Frame validation and construction are the sans-I/O helpers of
`protocol.ethernet` (``check_arp_request``/``build_arp_reply``, ``parse_ndp_ns``/``build_ndp_na``,
``check_dhcp_client_broadcast``/``set_dst_mac``); this module adds the upcall choreography
(ask the plugin, inject or resend, always DROP the request exactly once) and the counters.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from protocol.ethernet import (
    FrameError,
    build_arp_reply,
    build_ndp_na,
    check_arp_request,
    check_dhcp_client_broadcast,
    parse_ndp_ns,
    set_dst_mac,
)

if TYPE_CHECKING:
    from varpd.metrics import VarpdMetrics
    from varpd.plugins.base import Plugin

__all__ = ["proxy_arp", "proxy_dhcp", "proxy_ndp"]

Parsed = TypeVar("Parsed")


async def _proxy(
    kind: str,
    driver: Any,
    req: Any,
    metrics: VarpdMetrics,
    check: Callable[[bytes], Parsed],
    ask: Callable[[Parsed], Awaitable[bytes | None]],
    answer: Callable[[Parsed, bytes], None],
) -> bool:
    """Validate the head frame, ask the plugin for a MAC, answer; always DROPs the request."""
    try:
        try:
            parsed = check(req.frame)
        except (FrameError, struct.error) as exc:
            reason = getattr(exc, "reason", "malformed")
            metrics.proxy_dropped.labels(kind=kind, reason=reason).inc()
            return False
        mac = await ask(parsed)
        if mac is None:
            metrics.proxy_dropped.labels(kind=kind, reason="no_answer").inc()
            return False
        answer(parsed, bytes(mac))
        metrics.proxied.labels(kind=kind).inc()
        return True
    finally:
        driver.drop(req.req_id)


async def proxy_arp(driver: Any, req: Any, plugin: Plugin, metrics: VarpdMetrics) -> bool:
    """Answer the ARP request of ``req``; always DROPs the request. True if a reply went up."""
    return await _proxy(
        "arp",
        driver,
        req,
        metrics,
        check_arp_request,
        lambda arp: plugin.arp(arp.target_ip),
        lambda _arp, mac: driver.inject(req.device, build_arp_reply(req.frame, mac)),
    )


async def proxy_ndp(driver: Any, req: Any, plugin: Plugin, metrics: VarpdMetrics) -> bool:
    """Answer the Neighbor Solicitation of ``req``; always DROPs the request."""
    return await _proxy(
        "ndp",
        driver,
        req,
        metrics,
        parse_ndp_ns,
        lambda ns: plugin.arp(ns.target),
        lambda ns, mac: driver.inject(req.device, build_ndp_na(req.frame, ns.target, mac)),
    )


async def proxy_dhcp(driver: Any, req: Any, plugin: Plugin, metrics: VarpdMetrics) -> bool:
    """Redirect a broadcast DHCP request to the plugin's DHCP server MAC (RESEND); DROPs."""
    return await _proxy(
        "dhcp",
        driver,
        req,
        metrics,
        check_dhcp_client_broadcast,
        lambda _l2: plugin.dhcp(req),
        lambda _l2, mac: driver.resend(req.device, set_dst_mac(req.frame, mac)),
    )
