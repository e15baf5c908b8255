"""The files plugin: DYNAMIC mode, destinations read from a JSON file (spec §5).

``files/config`` (string, required, absolute path) names a JSON object keyed by MAC (any
spelling `protocol.addr.parse_mac` accepts; illumos writes ``0:a:95:9d:68:16``). Each value is an
object with ``ip`` (underlay IPv4/IPv6, required), ``port`` (1..65535, required), and optionally
``arp`` (overlay IPv4 answered by proxy ARP), ``ndp`` (overlay IPv6 answered by proxy NDP) and
``dhcp-proxy`` (MAC that this MAC's broadcast DHCP requests are redirected to). Other keys are
reserved and ignored. Any invalid entry refuses the whole file, naming the entry and the field:
``files/config: entry "0:a:95:9d:68:16": port must be 1..65535``.

Lookup order (libvarpd_files.c): ARP → proxy ARP; IPv6 to 33:33:* → proxy NDP; IPv4 to
broadcast → proxy DHCP if the *source* MAC's entry has ``dhcp-proxy``, else drop; anything else
→ the destination MAC's entry (respond ip:port), or drop.

Beyond illumos (which loads the file only at start): a watcher task polls the file's
(mtime, size, inode) every second and reloads it when it changes. An invalid new file keeps the
old content in force, is logged, counted (``files_reloads{result="invalid"}``) and degrades the
instance with the reason until a valid file appears. After a successful reload the kernel cache
entries of MACs whose destination changed or vanished are removed, so the next frame asks again.
``files/config`` may also be changed while active (`update` loads the new path first and refuses
it if invalid).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, ClassVar

import trio

from protocol.addr import BROADCAST_MAC, format_mac, ip_to_wire, parse_mac
from protocol.ethernet import ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6
from varpd.plugins.base import (
    LookupReply,
    Plugin,
    PropError,
    PropSpec,
    check_underlay_ip,
)
from varpd.shim.types import LookupRequest, Point, TargetMode

log = logging.getLogger("varpd.plugins.files")

PROP = "files/config"
POLL_INTERVAL = 1.0
MAX_FILE = 16 << 20
_io_limiter = trio.CapacityLimiter(4)


@dataclass(frozen=True)
class FileEntry:
    mac: bytes
    point: Point
    arp: IPv4Address | None = None
    ndp: IPv6Address | None = None
    dhcp_proxy: bytes | None = None


@dataclass(frozen=True)
class FilesTable:
    entries: dict[bytes, FileEntry]
    by_ip: dict[IPv4Address | IPv6Address, bytes]

    @classmethod
    def empty(cls) -> FilesTable:
        return cls({}, {})


def _entry_error(key: str, message: str) -> PropError:
    return PropError(PROP, f"entry {json.dumps(key)}: {message}")


def parse_files(text: str | bytes) -> FilesTable:
    """Parse and validate the JSON document; `PropError` names the offending entry."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PropError(PROP, f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PropError(PROP, "the top level must be a JSON object keyed by MAC address")
    entries: dict[bytes, FileEntry] = {}
    by_ip: dict[IPv4Address | IPv6Address, bytes] = {}
    for key, value in doc.items():
        try:
            mac = parse_mac(key)
        except ValueError:
            raise _entry_error(key, "key is not a MAC address") from None
        if mac in entries:
            raise _entry_error(key, f"duplicate of MAC {format_mac(mac)}")
        if not isinstance(value, dict):
            raise _entry_error(key, "value must be an object")
        ip_text = value.get("ip")
        if not isinstance(ip_text, str):
            raise _entry_error(key, "ip is required (an IPv4 or IPv6 address string)")
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError:
            raise _entry_error(key, f"ip {ip_text!r} is not an IP address") from None
        why = check_underlay_ip(ip)
        if why:
            raise _entry_error(key, f"ip {ip_text}: {why}")
        port = value.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise _entry_error(key, "port must be 1..65535")
        arp = ndp = None
        dhcp = None
        if "arp" in value:
            try:
                arp = IPv4Address(value["arp"])
            except (ValueError, TypeError):
                raise _entry_error(key, f"arp {value['arp']!r} is not an IPv4 address") from None
        if "ndp" in value:
            try:
                ndp = IPv6Address(value["ndp"])
            except (ValueError, TypeError):
                raise _entry_error(key, f"ndp {value['ndp']!r} is not an IPv6 address") from None
        if "dhcp-proxy" in value:
            try:
                dhcp = parse_mac(value["dhcp-proxy"])
            except ValueError:
                raise _entry_error(
                    key, f"dhcp-proxy {value['dhcp-proxy']!r} is not a MAC address"
                ) from None
        for overlay_ip in (arp, ndp):
            if overlay_ip is not None:
                if overlay_ip in by_ip:
                    raise _entry_error(
                        key, f"{overlay_ip} is already answered by {format_mac(by_ip[overlay_ip])}"
                    )
                by_ip[overlay_ip] = mac
        entries[mac] = FileEntry(mac, Point(ip_to_wire(ip), port), arp, ndp, dhcp)
    return FilesTable(entries, by_ip)


def _read(path: str) -> tuple[bytes, tuple[int, int, int]]:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size > MAX_FILE:
            raise PropError(PROP, f"{path} is larger than {MAX_FILE} bytes")
        return f.read(), (st.st_mtime_ns, st.st_size, st.st_ino)


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def load_file(path: str) -> tuple[FilesTable, tuple[int, int, int]]:
    try:
        data, sig = await trio.to_thread.run_sync(_read, path, limiter=_io_limiter)
    except OSError as exc:
        raise PropError(PROP, f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_files(data), sig


class FilesPlugin(Plugin):
    name: ClassVar[str] = "files"
    mode: ClassVar[TargetMode] = TargetMode.DYNAMIC
    props: ClassVar[tuple[PropSpec, ...]] = (
        PropSpec(
            PROP,
            "string",
            required=True,
            absolute_path=True,
            live=True,
            description="absolute path of the JSON mapping file",
        ),
    )
    poll_interval: ClassVar[float] = POLL_INTERVAL

    def __init__(self, host: Any, values: dict[str, object]) -> None:
        super().__init__(host, values)
        self.table = FilesTable.empty()
        self._sig: tuple[int, int, int] | None = None
        self._bad_sig: tuple[int, int, int] | None = None
        self._watch_scope: trio.CancelScope | None = None
        self.reloads = 0

    @property
    def path(self) -> str:
        return str(self.require(PROP))

    async def start(self) -> None:
        await super().start()
        self.table, self._sig = await load_file(self.path)
        self._watch_scope = await self.host.nursery.start(self._watch)

    async def stop(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.cancel()
            self._watch_scope = None

    async def update(self, values: dict[str, object]) -> None:
        path = values.get(PROP)
        if not isinstance(path, str):
            raise PropError(PROP, "a required property cannot be unset")
        table, sig = await load_file(path)
        self.values = dict(values)
        self._apply(table, sig)

    def _apply(self, table: FilesTable, sig: tuple[int, int, int]) -> None:
        old = self.table
        self.table, self._sig, self._bad_sig = table, sig, None
        self.reloads += 1
        for mac, entry in old.entries.items():
            new = table.entries.get(mac)
            if new is None or new.point != entry.point:
                try:
                    self.host.driver.cache_remove(self.host.device, mac)
                except Exception:  # not cached: nothing to invalidate
                    pass
        self.host.restore()

    async def _watch(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await trio.sleep(self.poll_interval)
                await self.check_reload()

    async def check_reload(self) -> None:
        """Reload the file if its (mtime, size, inode) changed since the last look."""
        path = self.path
        sig = await trio.to_thread.run_sync(_stat, path, limiter=_io_limiter)
        if sig is None or sig == self._sig or sig == self._bad_sig:
            return
        try:
            table, sig = await load_file(path)
        except PropError as exc:
            self._bad_sig = sig
            self.host.metrics.files_reloads.labels(result="invalid").inc()
            self.host.log.warning(
                "%s changed but is invalid, keeping the previous content: %s", path, exc
            )
            self.host.degrade(f"{exc}; keeping the previous content")
            return
        self._apply(table, sig)
        self.host.metrics.files_reloads.labels(result="ok").inc()
        self.host.log.info("reloaded %s (%d entries)", path, len(table.entries))

    async def lookup(self, req: LookupRequest, reply: LookupReply) -> None:
        if req.sap == ETH_P_ARP:
            await reply.proxy_arp()
        elif req.sap == ETH_P_IPV6 and req.dst_mac[:2] == b"\x33\x33":
            await reply.proxy_ndp()
        elif req.sap == ETH_P_IPV4 and req.dst_mac == BROADCAST_MAC:
            src = self.table.entries.get(req.src_mac)
            if src is not None and src.dhcp_proxy is not None:
                await reply.proxy_dhcp()
            else:
                reply.drop()
        else:
            entry = self.table.entries.get(req.dst_mac)
            if entry is None:
                reply.drop()
            else:
                reply.respond(entry.point)

    async def arp(self, ip: IPv4Address | IPv6Address) -> bytes | None:
        return self.table.by_ip.get(ip)

    async def dhcp(self, req: LookupRequest) -> bytes | None:
        entry = self.table.entries.get(req.src_mac)
        return entry.dhcp_proxy if entry is not None else None

    def status(self) -> dict[str, object]:
        return {"entries": len(self.table.entries), "reloads": self.reloads}
