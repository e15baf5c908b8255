"""``KernelFirewall``: keep the nftables tables equal to (policy, port map), one transaction
per change, and cut the flows a change refuses.

State it keeps (what it believes is in the kernel): the compiled objects of every VNIC of the
last applied policy (``compile.VnicObjects``), the port map it last installed (VNIC MAC ->
bridge port ifname) and the policy generation.

- ``apply(policy)``: compile the VNICs whose rules changed (unchanged VNICs reuse their
  objects), compute the diff against what is installed and send it as **one** batch. Then
  judge the conntrack entries of the VNICs whose rules changed (or that are new to the
  policy) and delete the refused ones (``flows.py``).
- ``set_port(mac, ifname | None)`` / ``set_ports(mapping)``: a VNIC's port appeared, moved
  or went away. A port of a VNIC that is not in the policy is remembered and installs nothing
  (that VNIC is not filtered); once the policy names it, its map entries go in with the same
  transaction as its chains. Map keys are interface *names*, so an entry can be installed
  before its port exists: a port whose name is known in advance is filtered from its first
  frame.
- The first transaction of a ``KernelFirewall`` object is a **full rebuild**: delete whatever
  tables of that name exist and build them again, in one batch (so a varpd that restarts
  replaces its predecessor's tables without a moment where they are absent; until its first
  policy arrives, the old tables stay in force). After a refused batch the next change is a
  full rebuild too (we no longer know what is installed).
- Nothing is removed on shutdown: the last tables stay in force while varpd is down
  (fail-closed for firewalled VNICs). ``remove()`` deletes the tables, for tests and for an
  operator turning the kernel firewall off.

Thread-safety: every public method takes one lock; they block (netlink), so trio callers use
``trio.to_thread.run_sync``. Nothing here raises for a valid policy except ``NftError`` when
the kernel refuses a batch (then nothing of that batch is in force).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from protocol.addr import format_mac, parse_mac
from protocol.fwpolicy import Policy, VnicPolicy

from .compile import TableLayout, VnicObjects, compile_vnic
from .flows import FlowJudge, cut_flows
from .nftables import NftDriver, NftError

log = logging.getLogger("varpd.firewall.kernel")


def _mac(mac: bytes | str) -> str:
    return format_mac(mac if isinstance(mac, bytes) else parse_mac(mac))


class KernelFirewall:
    """The nftables side of one varpd's firewall (see the module docstring)."""

    def __init__(
        self,
        driver: NftDriver | None = None,
        *,
        table: str = "portolan",
        netns: str | None = None,
        cut_flows: bool = True,
    ) -> None:
        self.driver = driver if driver is not None else NftDriver(netns)
        self.netns = self.driver.netns
        self.layout = TableLayout(table)
        self.table = table
        self.cut = cut_flows
        self._lock = threading.Lock()
        self.policy: Policy | None = None
        self.vnics: dict[str, VnicObjects] = {}
        self._sources: dict[str, VnicPolicy] = {}
        self.ports: dict[str, str] = {}  # wanted (MAC -> ifname), including unfiltered VNICs
        self._installed_ports: dict[str, str] = {}
        self._fresh = True  # next transaction rebuilds everything
        self.generation: int | None = None
        self.counters: dict[str, int] = {
            "transactions": 0,
            "full_rebuilds": 0,
            "refused": 0,
            "flows_cut": 0,
            "cut_errors": 0,
        }
        self.last_transaction_seconds: float | None = None
        self.last_commands = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ changes

    def apply(self, policy: Policy) -> int:
        """Install ``policy``; returns the number of commands sent (0: nothing changed)."""
        with self._lock:
            new: dict[str, VnicObjects] = {}
            judged: dict[str, VnicPolicy] = {}
            for mac, vp in policy.vnics.items():
                old = self._sources.get(mac)
                if old is not None and old.rules == vp.rules and mac in self.vnics:
                    new[mac] = self.vnics[mac]
                    if old.ips != vp.ips:
                        judged[mac] = vp
                else:
                    new[mac] = compile_vnic(vp)
                    judged[mac] = vp
            sent = self._commit(new, self.ports, policy.generation)
            self.policy = policy
            self._sources = dict(policy.vnics)
            if self.cut and judged:
                deleted, error = cut_flows(FlowJudge(judged), self.netns)
                self.counters["flows_cut"] += deleted
                if error is not None:
                    self.counters["cut_errors"] += 1
                    log.warning("firewall: could not cut refused flows: %s", error)
            return sent

    def set_port(self, mac: bytes | str, port: str | None) -> int:
        """Record (or forget, with None) a VNIC's bridge port; installs it if filtered."""
        with self._lock:
            ports = dict(self.ports)
            key = _mac(mac)
            if port is None:
                ports.pop(key, None)
            else:
                ports[key] = port
            return self._ports_changed(ports)

    def set_ports(self, ports: Mapping[bytes | str, str]) -> int:
        """Replace the whole port map."""
        with self._lock:
            return self._ports_changed({_mac(m): p for m, p in ports.items()})

    def _ports_changed(self, ports: dict[str, str]) -> int:
        if self.policy is None:
            # No policy yet: install nothing. A rebuild now would replace the tables of a
            # previous varpd (still enforcing its last policy) with empty ones.
            self.ports = ports
            return 0
        return self._commit(self.vnics, ports, self.generation)

    def rebuild(self) -> int:
        """Send a full rebuild of the current state (what restart does)."""
        with self._lock:
            self._fresh = True
            return self._commit(self.vnics, self.ports, self.generation)

    def remove(self) -> None:
        """Delete both tables (tests; turning the kernel firewall off). Idempotent."""
        with self._lock:
            cmds: list[dict[str, Any]] = []
            for family, name in (("bridge", self.layout.name), ("inet", self.layout.ct_name)):
                t = {"family": family, "name": name}
                cmds += [{"add": {"table": t}}, {"delete": {"table": t}}]
            self.driver.run(cmds)
            self._fresh = True
            self._installed_ports = {}

    def _commit(
        self, vnics: Mapping[str, VnicObjects], ports: Mapping[str, str], generation: int | None
    ) -> int:
        if self._fresh:
            cmds = self.layout.full(vnics, ports, generation or 0)
        else:
            cmds = self.layout.diff(self.vnics, self._installed_ports, vnics, ports, generation)
            if not cmds and generation is not None and generation != self.generation:
                cmds = self.layout.generation(generation)  # nothing else changed
        if cmds:
            started = time.perf_counter()
            try:
                self.driver.run(cmds)
            except NftError as exc:
                self.counters["refused"] += 1
                self.last_error = str(exc)
                self._fresh = True
                raise
            self.last_transaction_seconds = time.perf_counter() - started
            self.last_commands = len(cmds)
            self.counters["transactions"] += 1
            if self._fresh:
                self.counters["full_rebuilds"] += 1
            self.last_error = None
            self._fresh = False
            self._installed_ports = {m: p for m, p in ports.items() if m in vnics}
        self.vnics = dict(vnics)
        self.ports = dict(ports)
        self.generation = generation
        return len(cmds)

    # ------------------------------------------------------------------ observation

    def read_counters(self) -> dict[str, dict[str, int]]:
        """Per VNIC (MAC text) the packet counts of its six named counters, from the kernel.

        Keys: ``in_pass_rule``, ``in_drop_rule``, ``in_drop_default``, ``out_pass_rule``,
        ``out_drop_rule``, ``out_pass_default``.
        """
        objs = self.driver.query(f"list counters table bridge {self.layout.name}")
        by_id = {v.id: mac for mac, v in self.vnics.items()}
        out: dict[str, dict[str, int]] = {}
        for obj in objs:
            c = obj.get("counter")
            if not c:
                continue
            cid, _, kind = str(c.get("name", "")).partition("_")
            mac = by_id.get(cid)
            if mac is not None:
                out.setdefault(mac, {})[kind] = int(c.get("packets", 0))
        return out

    def kernel_state(self) -> dict[str, Any]:
        """What the kernel holds now: generation, chains and set sizes per VNIC, map entries."""
        objs = self.driver.query(f"list table bridge {self.layout.name}")
        if not objs:
            return {"present": False}
        by_id = {v.id: mac for mac, v in self.vnics.items()}
        generation = None
        chains: dict[str, list[str]] = {}
        rules: dict[str, int] = {}
        sets: dict[str, dict[str, int]] = {}
        counters: dict[str, dict[str, int]] = {}
        ports: dict[str, str] = {}
        for obj in objs:
            if "counter" in obj:
                c = obj["counter"]
                if c.get("name") == "generation":
                    generation = c.get("packets")
                    continue
                cid, _, kind = str(c.get("name", "")).partition("_")
                counters.setdefault(by_id.get(cid, cid), {})[kind] = int(c.get("packets", 0))
            elif "chain" in obj:
                name = obj["chain"].get("name", "")
                if name.startswith(("in_", "out_")):
                    cid = name.partition("_")[2]
                    chains.setdefault(by_id.get(cid, cid), []).append(name)
            elif "rule" in obj:
                name = obj["rule"].get("chain", "")
                if name.startswith(("in_", "out_")):
                    rules[name] = rules.get(name, 0) + 1
            elif "map" in obj:
                m = obj["map"]
                if m.get("name") == "in_ports":
                    for elem in m.get("elem", []):
                        if isinstance(elem, list) and len(elem) == 2:
                            target = elem[1].get("jump", {}).get("target", "")
                            cid = target.partition("_")[2]
                            ports[by_id.get(cid, cid)] = elem[0]
            elif "set" in obj:
                s = obj["set"]
                name = str(s.get("name", ""))
                cid = name.partition("_")[0]
                if name != "dhcp":
                    sets.setdefault(by_id.get(cid, cid), {})[name] = len(s.get("elem", []))
        vnics = {}
        for mac in sorted(set(chains) | set(ports)):
            vnics[mac] = {
                "chains": sorted(chains.get(mac, [])),
                "rules": {c: rules.get(c, 0) for c in sorted(chains.get(mac, []))},
                "port": ports.get(mac),
                "sets": len(sets.get(mac, {})),
                "set_elements": sum(sets.get(mac, {}).values()),
                "counters": counters.get(mac, {}),
            }
        return {
            "present": True,
            "table": f"bridge {self.layout.name}",
            "glue_table": f"inet {self.layout.ct_name}",
            "generation": generation,
            "vnics": vnics,
        }

    def status(self) -> dict[str, Any]:
        """The applier's own view (no kernel call)."""
        return {
            "backend": self.driver.backend,
            "table": self.layout.name,
            "generation": self.generation,
            "vnics": len(self.vnics),
            "ports": dict(sorted(self._installed_ports.items())),
            "last_transaction_seconds": self.last_transaction_seconds,
            "last_commands": self.last_commands,
            "last_error": self.last_error,
            **self.counters,
        }
