"""The svp search plugin: varpd's client of the SVP (SDC VXLAN Protocol) directory service.

Theory of operation
-------------------
An overlay device in DYNAMIC mode asks varpd where each destination MAC lives. The svp plugin
answers by asking portolan over SVP (TCP 1296, spec/svp.md) and keeps the kernel's target
cache honest by polling portolan's shootdown log. It has no cache of its own: the kernel
target cache is the only VL2 cache, VL3 answers are never cached.

::

    OverlayDriver --miss--> varpd worker --lookup()--> SvpPlugin ----+
         ^                                  arp() <-- proxy ARP/NDP    |  one per device
         |  respond / drop / cache_set / cache_remove / inject         v
         +------------------------------------------------------- Remote  (shared per
                                                                   |  |    host, port,
                 getaddrinfo every 30 s -> one Connection per address |    underlay_ip)
                 LogPoller: LOG_WAIT held by the server (extension) or |
                            LOG_REQ every 0.25 s idle; LOG_RM at once  |
                                                                   v  v
                                                             portolan SVP server(s)

Modules
- `plugin` (`SvpPlugin`): properties ``svp/host`` (required), ``svp/port`` (1296),
  ``svp/underlay_ip`` (required; no multicast, v4-compatible or 6to4), ``svp/underlay_port``
  (1339, required to start though SVP v1 never sends it). Lookup dispatch (spec §4.5): ARP ->
  proxy ARP; 33:33:* -> proxy NDP if IPv6 else drop; other broadcast/multicast -> drop; unicast
  -> VL2_REQ, OK -> respond(point), anything else -> drop. ``arp(ip)``: VL3_REQ, OK -> push the
  VL2 mapping into the kernel cache *first*, then return the MAC.
- `remote` (`Remote`, `SvpOptions`): DNS, the set of connections, degrade messages (DNS
  failure outranks "cannot reach any remote peers"), and query dispatch with a bounded wait
  for a connection and bounded retries after a reset.
- `conn` (`Connection`): the per-address state machine INITIAL / CONNECTING / BACKOFF / ACTIVE
  / WINDDOWN / ERROR, backoff 1, 2, 4, 8, 16, 32 s, degraded after more than 6 failures,
  pipelined queries matched by id, strict reply validation, 30 s query timeout.
- `shootdown` (`LogPoller`): waits with LOG_WAIT when the connection's server granted it in
  answer to our HELLO (`protocol.svp_ext`; ``Connection.caps``), else polls LOG_REQ;
  VL2 entries -> cache_remove; VL3 entries -> VL3_REQ, cache_set,
  gratuitous ARP / unsolicited NA on the entry's VLAN; LOG_RM of what was handled.

Where we differ from illumos (on purpose)
- A query issued while no connection is ACTIVE waits up to ``connect_wait`` (5 s) for one
  instead of failing at once; a connection reset retries the queries in flight (up to
  ``retries`` = 2 more times) on another or the re-established connection instead of failing
  them all (illumos quirk 9.4).
- A connection reset before it answered anything counts as a connect failure (backoff), so a
  server that accepts and drops us is not hammered.
- The log is polled every 0.25 s when idle and immediately after a non-empty batch, or, with a
  portolan that offers the extension, waited for (LOG_WAIT); LOG_RM is sent at once. Reconnect
  waits are jittered (restart storms, issue 17). VL3 shootdowns also update the kernel cache, and IPv6 entries produce an
  unsolicited Neighbor Advertisement (illumos ignores them).

Lifecycle and invariants
- ``start`` validates the properties (`PluginNotReady` naming a missing one), then finds or
  creates the remote in ``host.shared`` and attaches the instance by vnet id; the first
  instance starts the remote's tasks in ``host.nursery``. ``stop`` detaches; the last one
  cancels the remote and removes it from ``host.shared``.
- Every background task lives in the remote's cancel scope; nothing outlives ``stop``.
- Each lookup gets exactly one outcome (respond or drop, or a proxy call).
- Tunables (`SvpOptions`) are not properties, to keep illumos' property set: the daemon may
  put an `SvpOptions` (or dict) in ``host.shared["svp:options"]``.
"""

from varpd.plugins.svp.plugin import SvpPlugin
from varpd.plugins.svp.remote import Remote, SvpOptions

__all__ = ["Remote", "SvpOptions", "SvpPlugin"]
