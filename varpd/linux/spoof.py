"""Spoof defence of the linux backend: nftables drops VXLAN datagrams whose inner source MAC
is cached at another underlay address than the datagram's outer source (as the shim's
``rx_drop_spoofed``).

One table, ``inet pvspoof`` (owned by varpd: replaced at start, nothing else touched)::

    set ports    { typeof udp dport }                          listen ports of active devices
    set known    { typeof @th,96,24 . @th,176,48 }             VNI . MAC with a cached remote
    set allowed4 { typeof @th,96,24 . @th,176,48 . ip saddr }  VNI . MAC . its underlay IPv4
    set allowed6 { ... . ip6 saddr }                           ... IPv6
    chain rx (filter, input, priority -150):
      udp dport @ports  VNI.MAC @known  VNI.MAC.saddr != @allowed4  counter drop   (and ip6)

Raw payload offsets from the UDP header (``@th``): the VNI is bits 96..119 (8 bytes of UDP,
then the VXLAN flags and reserved bytes), the inner source MAC bits 176..223 (UDP 8 + VXLAN 8
+ inner destination MAC 6 bytes). The inet ``input`` hook sees the datagrams before the
kernel's vxlan socket does. nft 1.0.6 has no ``inner`` expression yet, hence raw payloads.

The driver feeds `note` with every change of its fdb mirror (which follows the kernel's
table, so entries anyone adds are covered); changes are gathered for ``settle`` seconds
(20 ms) and applied by `run` as one nft script through `NftDriver.run_text` (libnftables
in-process, else ``nft -f -``), in a worker thread, never on the trio thread; a burst of
misses costs one transaction, not a process each. The drop counter is read back as JSON
every ``poll`` seconds for the ``spoofed_dropped`` metric. A failed update is logged and
the sets are rebuilt whole on the next round.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from varpd.firewall.kernel.nftables import NftDriver, NftError
from varpd.shim.types import Point

log = logging.getLogger("varpd.linux.spoof")

TABLE = "pvspoof"

_BASE = f"""
table inet {TABLE} {{
  set ports {{ typeof udp dport; }}
  set known {{ typeof @th,96,24 . @th,176,48; }}
  set allowed4 {{ typeof @th,96,24 . @th,176,48 . ip saddr; }}
  set allowed6 {{ typeof @th,96,24 . @th,176,48 . ip6 saddr; }}
  chain rx {{
    type filter hook input priority -150; policy accept;
    udp dport @ports @th,96,24 . @th,176,48 @known @th,96,24 . @th,176,48 . ip saddr != @allowed4 counter drop
    udp dport @ports @th,96,24 . @th,176,48 @known @th,96,24 . @th,176,48 . ip6 saddr != @allowed6 counter drop
  }}
}}
"""


def _mac_int(mac: bytes) -> str:
    return "0x" + mac.hex()


class SpoofGuard:
    """The nftables table and its sets (module docstring)."""

    def __init__(self, nft: NftDriver) -> None:
        self.nft = nft
        self._limiter = trio.CapacityLimiter(1)
        self.entries: dict[tuple[int, bytes], Point] = {}
        self.ports: dict[int, int] = {}  # listen port -> active devices using it
        self.dropped_total = 0
        self.failures = 0
        self._dirty = False
        self._wakeup = trio.Event()

    @classmethod
    async def open(cls, nl: Any = None) -> SpoofGuard:
        """Replace the table; raises when nftables is not usable or refuses the ruleset."""
        try:
            nft = NftDriver()
        except NftError as exc:
            raise RuntimeError(str(exc)) from None
        guard = cls(nft)
        await guard._nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n{_BASE}")
        return guard

    async def _nft(self, script: str) -> None:
        try:
            await trio.to_thread.run_sync(self.nft.run_text, script, limiter=self._limiter)
        except NftError as exc:
            raise RuntimeError(str(exc)) from None

    # ------------------------------------------------------------------ feeding

    def note(self, vni: int, mac: bytes, point: Point | None) -> None:
        """The cached remote of (vni, mac) is now ``point`` (None: no remote / removed)."""
        key = (vni, mac)
        if point is None:
            if self.entries.pop(key, None) is None:
                return
        else:
            if self.entries.get(key) == point:
                return
            self.entries[key] = point
        self._dirty = True
        self._wakeup.set()

    def add_port(self, port: int) -> None:
        self.ports[port] = self.ports.get(port, 0) + 1
        self._dirty = True
        self._wakeup.set()

    def remove_port(self, port: int) -> None:
        left = self.ports.get(port, 0) - 1
        if left <= 0:
            self.ports.pop(port, None)
        else:
            self.ports[port] = left
        self._dirty = True
        self._wakeup.set()

    def forget_vni(self, vni: int) -> None:
        for key in [k for k in self.entries if k[0] == vni]:
            del self.entries[key]
        self._dirty = True
        self._wakeup.set()

    # ------------------------------------------------------------------ applying

    def _script(self) -> str:
        """Flush and refill every set in one transaction (sets stay small: one entry per
        cached remote MAC)."""
        lines = [f"flush set inet {TABLE} {name}" for name in ("ports", "known", "allowed4",
                                                                 "allowed6")]  # fmt: skip
        if self.ports:
            lines.append(
                f"add element inet {TABLE} ports {{ {', '.join(map(str, sorted(self.ports)))} }}"
            )
        known, four, six = [], [], []
        for (vni, mac), point in self.entries.items():
            key = f"{vni} . {_mac_int(mac)}"
            known.append(key)
            addr = point.address
            (four if addr.version == 4 else six).append(f"{key} . {addr}")
        for name, elems in (("known", known), ("allowed4", four), ("allowed6", six)):
            if elems:
                lines.append(f"add element inet {TABLE} {name} {{ {', '.join(elems)} }}")
        return "\n".join(lines) + "\n"

    async def run(self, poll: float = 2.0, settle: float = 0.02) -> None:
        """Apply changes as they come (gathered for ``settle`` s); read the drop counter
        every ``poll`` s."""
        next_read = trio.current_time()
        while True:
            with trio.move_on_at(next_read):
                await self._wakeup.wait()
                await trio.sleep(settle)
            self._wakeup = trio.Event()
            if self._dirty:
                self._dirty = False
                try:
                    await self._nft(self._script())
                except (RuntimeError, OSError) as exc:
                    self.failures += 1
                    self._dirty = True
                    log.warning("spoof defence: nft update failed: %s", exc)
                    await trio.sleep(1.0)
            if trio.current_time() >= next_read:
                await self._read_counter()
                next_read = trio.current_time() + poll

    async def _read_counter(self) -> None:
        try:
            items = await trio.to_thread.run_sync(
                self.nft.query, f"list chain inet {TABLE} rx", limiter=self._limiter
            )
        except (NftError, OSError, ValueError):
            return
        total = 0
        for item in items:
            for expr in item.get("rule", {}).get("expr", []):
                counter = expr.get("counter") if isinstance(expr, dict) else None
                if counter:
                    total += int(counter.get("packets", 0))
        self.dropped_total = total

    async def close(self) -> None:
        """Remove the table (on a clean stop; the next start replaces it anyway)."""
        try:
            await self._nft(f"delete table inet {TABLE}\n")
        except (RuntimeError, OSError):
            pass
