"""varpd's cloud firewall: per-VNIC enforcement of the policy portolan compiles.

Theory of operation
-------------------
Portolan turns the rule language into a per-compute-node *policy document*
(``protocol/fwpolicy.py``): for every firewall-enabled VNIC on the CN, its effective rules,
already owner-scoped, direction-mapped (``in`` = towards the VNIC, ``out`` = from it) and with
peers resolved to addresses. varpd keeps it current and enforces it at the VNIC boundary::

    portolan  GET /firewalls/cns/{cn}/policy?wait=N (ETag)
        |
    PolicyFetcher (fetcher.py) --apply(Policy)--> FirewallTable (engine.py)
                                                    | one VnicFirewall per MAC in the policy
    shim Vnic.filter = VnicFirewall  <--------------+ (bind(vnic); None = not filtered)
        Vnic.transmit  -> check(frame, OUT)     guest -> overlay / local switch
        Vnic.to_guest  -> check(frame, IN)      overlay / local switch -> guest

- ``packet.py`` reads what the firewall needs from a frame (fixed offsets, no scapy).
- ``conntrack.py`` is one VNIC's flow table (bounded LRU, per-state timeouts).
- ``engine.py`` compiles one VNIC's rules into an index whose per-packet cost does not grow
  with the number of rules (see its docstring), and holds ``VnicFirewall`` / ``FirewallTable``.
- ``fetcher.py`` long-polls portolan and applies every new policy.

Lifecycle: the daemon creates one ``FirewallTable``, ``bind``s every shim ``Vnic`` it creates
(``unbind`` on removal) and, when ``portolan_api`` is configured, runs
``PolicyFetcher(api, cn_uuid, table.apply)`` in its nursery. A VNIC absent from the policy is
not filtered at all (its ``filter`` stays None). Everything runs in the trio thread; the frame
path and ``apply`` never await, so a policy swap is atomic with respect to frames.

Semantics (spec/fwrule.md §3.6, §3.7, §3.11)
--------------------------------------------
For a VNIC in the policy, per IP packet:

1. **Connection state first.** A packet of a tracked flow passes (either direction).
2. **Rules.** A rule matches when direction, protocol (icmp = IPv4 proto 1, icmp6 = IPv6 next
   header 58, ah 51, esp 50, tcp 6, udp 17), remote address (source for ``in``, destination
   for ``out``; ``any`` or a prefix list) and key (destination port for tcp/udp; ICMP type
   and code, a type without code matching every code) all match. The highest priority wins;
   at equal priority the action *against* the default wins (inbound ALLOW beats BLOCK,
   outbound BLOCK beats ALLOW) - which is also why priority-0 inbound BLOCK / outbound ALLOW
   are no-ops whether or not portolan leaves them out (§7 question 5).
3. **Default.** Nothing matched: inbound is dropped, outbound passes.

Decisions on what upstream leaves open (spec/fwrule.md §3.11 step 6, §7 question 3)
---------------------------------------------------------------------------------
- **State is created by every passing packet that identifies a flow**, not only by TCP SYNs:
  TCP (any flags), UDP, ICMP/ICMPv6 echo requests, whether a rule or the outbound default let
  them through, inbound as well as outbound (so replies to an allowed inbound connection pass
  even under an outbound BLOCK, D09, without the reference's "keep state only if the VM has a
  BLOCK of that protocol" subtlety). Creating TCP state mid-stream means established
  connections survive a varpd restart or a firewall being enabled: the first outbound packet
  re-creates the state.
- **Timeouts**: TCP 30 s until both sides have been seen, 1 h established, 2 min after a FIN or
  RST; UDP 60 s; ICMP echo 30 s; AH/ESP 60 s. Each packet refreshes its flow. At most 32768
  flows per VNIC (configurable); beyond that the least recently used flow is evicted.
- **ICMP echo**: a request opens a flow keyed by the echo identifier; the reply passes only in
  the opposite direction of the request. Echo replies and other ICMP types never open flows.
- **ICMP errors** (v4 3/4/5/11/12, v6 1..4) pass when the header they quote belongs to a tracked
  flow (the quoted packet is looked up as travelling the opposite way), whoever sends them (a
  router on the path included). Otherwise they are judged by the rules like any ICMP packet.
- **Non-TCP/UDP/ICMP outbound** (AH, ESP, GRE, IPv6 extension headers...): the documented
  policy is "allow all outbound", so the default passes them, **untracked** (no flow, so a
  peer cannot answer on the strength of it). AH/ESP passed by an explicit ALLOW rule *are*
  tracked (an inbound ALLOW ah lets the replies out past an outbound block, D16).
- **Neighbour discovery** is treated like ARP, as an operator expects: ICMPv6 types 133..137
  (RS, RA, NS, NA, redirect) pass in both directions, but only with hop limit 255 (RFC 4861),
  so the exemption cannot be used from off-link. ARP and every non-IP ethertype are below the
  firewall (never filtered), as with ipf. MLD (carried after a hop-by-hop header) is not
  exempt: IPv6 packets with extension headers are "other" protocols (see packet.py).
- **DHCP**: client requests are broadcast, so the server's reply does not match the request's
  flow. While the VNIC's own DHCP request is recent (60 s after an outbound UDP 68->67, or
  546->547 for DHCPv6), inbound UDP 67->68 (547->546) passes. Renewals to the server's
  unicast address are ordinary UDP state.
- **Fragments**: IPv4 later fragments (offset > 0) carry no ports, so they follow their
  datagram's first fragment: they pass iff a first fragment with the same (src, dst, proto,
  IP id) passed in the last 30 s (a 4096-entry LRU table per VNIC). A later fragment that
  overtakes its first fragment is dropped (the datagram is lost; the sender retransmits) -
  the simplest choice that cannot be used to slip past a rule. A first fragment whose
  transport header is incomplete is malformed and dropped. Every passing first fragment is
  remembered, whatever let it through (a rule, the default, state of a TCP/UDP, ICMP echo or
  AH/ESP flow, an exemption). IPv6 fragments (a fragment header right after the fixed header)
  are handled the same way: the first one is judged as the datagram it starts, the later ones
  follow it (key: src, dst, next header, 32-bit identification), so fragments of an allowed
  flow pass in this engine as in the kernel's (which reassembles before judging).
- **Malformed IP** (truncated headers, bad IHL) is dropped in both directions.
- **Rule changes drop state they no longer allow**: on every new policy each tracked flow's
  first packet (direction, remote address, protocol, port/type) is judged again by the new
  rules (default included) and the flow is dropped if it would now be refused. Remembered
  first fragments are forgotten. Unchanged VNICs are not recompiled and keep everything.
- ``ips`` of a VNIC are informational (metrics, varpdadm): rules match the packet's
  addresses; the firewall is not an anti-spoofing filter. ``vnet_id`` is informational too:
  policies are keyed by MAC.
- ``log`` is carried but not acted upon yet (spec §3.8: "later").

Invariants
----------
- ``check`` never raises for any byte string; it never awaits.
- A frame's verdict depends only on the VNIC's compiled rules, its flows and the clock.
- ``FirewallTable.apply`` either installs the whole policy or (if compiling raises) nothing.
"""

from .conntrack import Conntrack, Flow, Timeouts
from .engine import FirewallTable, VnicFirewall, compile_rules
from .fetcher import PolicyFetcher
from .packet import MALFORMED, NOT_IP, Packet, parse_frame

__all__ = [
    "MALFORMED",
    "NOT_IP",
    "Conntrack",
    "FirewallTable",
    "Flow",
    "Packet",
    "PolicyFetcher",
    "Timeouts",
    "VnicFirewall",
    "compile_rules",
    "parse_frame",
]
