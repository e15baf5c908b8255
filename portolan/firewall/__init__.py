"""Portolan's side of the cloud firewall: rules, selection, and per-CN compiled policies.

Theory of operation
-------------------
::

    API /rules ──► rules.py ──► Directory.write (one store transaction, RuleChange)
    API /vnics ──► Directory (VNIC writes, IndexChange)        │
                                                               ▼ Directory.subscribe
                                           policy_service.PolicyService.on_change
                                               FirewallModel (selection.py)  ── indexes
                                               compile_vnic   (compiler.py)  ── entries
                                               per-CN document + generation, trio Events
    varpd ◄── GET /firewalls/cns/{cn}/policy?wait=N (ETag = generation, 304 on no change)

- **rules.py**: rule CRUD. Validation is ``protocol.fwrule.create_rule`` with FWAPI's options
  (``enforce_global``, ``enforce_subnet_mask``); its messages reach the client unchanged in a
  422 ``InvalidParameters``. Rules are stored as canonical text; ``version`` is the store's
  change counter at the last change.
- **selection.py**: which VNICs a rule names. ``vm <uuid>`` is a VNIC's ``belongs_to_uuid``;
  tags are the VNIC's tags, compared as strings (JavaScript ``String()``); a bare tag matches
  any value. Owner scoping: an owned rule selects only VNICs of its owner; a global rule
  selects every VNIC. Peers are owner-scoped the fwadm way (skipped only when both owners are
  set and differ).
- **compiler.py**: per VNIC, direction mapping (FROM side -> ``out`` with the TO side as peers;
  TO side -> ``in`` with the FROM side as peers; both when on both), priority-0 no-op
  elimination (outbound ALLOW, inbound BLOCK), icmp/icmp6 peer families, peers as CIDR text.
- **policy_service.py**: keeps every CN's document current incrementally, bumps a CN's
  generation only when its document changes, wakes that CN's long-poll waiters; can rebuild
  everything from the store (``reload``) and be told that others changed it (``invalidate``).

Decisions
---------
- **Peers are resolved datacenter-wide** (spec/fwrule.md §7 q9): the compiler sees every VNIC
  of every CN, so a rule's ``vm``/``tag``/``all vms`` peers are all matching VNICs wherever they
  live -- for owned *and* global rules (fwadm's agent never fetched remote VMs for global rules,
  so on SmartOS their peers were only the CN's local VMs and stored remote VMs). One central
  answer, the same on every CN; a global ``FROM all vms TO all vms ...`` rule lists every VNIC.
- Peers ignore vnets: a VNIC's IP is a peer whatever its vnet (as fwadm used every IP of a VM).
- A VNIC without ``owner_uuid`` is selected only by global rules, and is a peer of everyone's
  rules (fwadm's treatment of owner-less remote VMs).
- Disabled rules contribute nothing to policies but are listed by ``GET /firewalls/vnics/{mac}``
  (as FWAPI's ``/firewalls/vms/:uuid`` does) and by ``GET /rules``.
- Generations are store versions (see policy_service), so ETags survive restarts and agree
  between instances sharing a PostgreSQL database.
- A duplicate uuid on create is 409 ``Conflict`` (CONVENTIONS), not FWAPI's 422.
- An update that changes nothing keeps the rule's version (FWAPI-237: unchanged rules are
  ignored).

Lifecycle
---------
``policy_service_for(directory)`` creates the service on first use (the API's firewall routes),
subscribed to the Directory and stale; the first read loads it from the store. ``portolan
serve`` needs nothing more. ``service.close()`` unsubscribes.
"""

from __future__ import annotations

from .policy_service import CnDocument, PolicyService, policy_service_for
from .selection import FirewallModel, FwRule, tag_text

__all__ = [
    "CnDocument",
    "FirewallModel",
    "FwRule",
    "PolicyService",
    "policy_service_for",
    "tag_text",
]
