"""The kernel firewall's per-VNIC nft counters as Prometheus metrics.

Every firewalled VNIC has six named counters in the bridge table (``compile.COUNTER_KINDS``),
counting the packets its chains judged (packets of tracked flows are accepted before the
per-VNIC chains and are not counted here):

=============  ==============  =========================================
direction      verdict         what
=============  ==============  =========================================
in             pass_rule       an ALLOW rule let it in
in             drop_rule       a BLOCK rule dropped it
in             drop_default    no rule matched: the inbound default
out            pass_rule       an ALLOW rule let it out
out            drop_rule       a BLOCK rule dropped it
out            pass_default    no rule matched: the outbound default
=============  ==============  =========================================

Exported as ``varpd_firewall_packets_total{vnic, direction, verdict}`` (``vnic`` is the MAC).
Counters of a VNIC that leaves the policy are deleted with its chains; its last values are
folded into ``vnic="retired"`` so the totals stay monotonic.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import CounterMetricFamily

from .compile import COUNTER_KINDS

METRIC = "varpd_firewall_packets"


def split_kind(kind: str) -> tuple[str, str] | None:
    """``in_drop_default`` -> ("in", "drop_default"); None for unknown names."""
    direction, _, verdict = kind.partition("_")
    if direction in COUNTER_KINDS and verdict in COUNTER_KINDS[direction]:
        return direction, verdict
    return None


def packets_family(
    per_vnic: Mapping[str, Mapping[str, int]], retired: Mapping[str, int] | None = None
) -> CounterMetricFamily:
    fam = CounterMetricFamily(
        METRIC,
        "Packets the kernel firewall judged by a VNIC's rules or default, per VNIC",
        labels=["vnic", "direction", "verdict"],
    )
    rows = sorted(per_vnic.items())
    if retired:
        rows.append(("retired", retired))
    for vnic, kinds in rows:
        for kind, value in sorted(kinds.items()):
            split = split_kind(kind)
            if split is not None:
                fam.add_metric([vnic, *split], value)
    return fam
