"""Instance state files: one msgpack file per activated instance, written atomically.

File ``<state_dir>/<device name>.varpd`` (mode 0600) holds a msgpack map
``{"magic": "varpd", "version": 1, "sha256": <32 bytes>, "payload": <bytes>}`` where payload is
the msgpack of an `InstanceRecord` and sha256 its digest. Writes go to a temp file in the same
folder, are fsynced, then renamed over the old file (and the folder fsynced), so a crash leaves
either the old or the new file, never a mix.

Unlike illumos (which deletes any file it cannot restore), a file that cannot be decoded —
bad msgpack, wrong magic/version, checksum mismatch, missing or mistyped fields, or a record
whose name does not match the file name — is renamed to ``<file>.corrupt`` with the reason
logged, so an operator can inspect it. Our "kernel" lives in the same process, so a record
carries the device too (vnetid, mtu, device props, VNICs) and restore re-creates it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("varpd.persist")

MAGIC = "varpd"
VERSION = 1
SUFFIX = ".varpd"
CORRUPT_SUFFIX = ".corrupt"


class CorruptState(ValueError):
    pass


@dataclass
class InstanceRecord:
    id: int
    name: str
    vnetid: int
    mtu: int
    plugin: str
    mode: int
    props: dict[str, Any] = field(default_factory=dict)
    device_props: dict[str, Any] = field(default_factory=dict)
    vnics: list[dict[str, Any]] = field(default_factory=list)  # {"mac", "vlan_id", "tap"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> InstanceRecord:
        if not isinstance(d, dict):
            raise CorruptState("payload is not a map")
        kinds: dict[str, type | tuple[type, ...]] = {
            "id": int,
            "name": str,
            "vnetid": int,
            "mtu": int,
            "plugin": str,
            "mode": int,
            "props": dict,
            "device_props": dict,
            "vnics": list,
        }
        for key, kind in kinds.items():
            if key not in d:
                raise CorruptState(f"field {key!r} is missing")
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise CorruptState(f"field {key!r} has the wrong type")
        if not 1 <= d["id"] <= 2**31 - 1:
            raise CorruptState(f"instance id {d['id']} is out of range")
        for v in d["vnics"]:
            if not isinstance(v, dict) or not isinstance(v.get("mac"), str):
                raise CorruptState("a VNIC entry is malformed")
        return cls(**{k: d[k] for k in kinds})


def encode_record(rec: InstanceRecord) -> bytes:
    payload = msgpack.packb(rec.to_dict(), use_bin_type=True)
    return msgpack.packb(
        {
            "magic": MAGIC,
            "version": VERSION,
            "sha256": hashlib.sha256(payload).digest(),
            "payload": payload,
        },
        use_bin_type=True,
    )


def decode_record(data: bytes) -> InstanceRecord:
    try:
        outer = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise CorruptState(f"not msgpack: {exc}") from None
    if not isinstance(outer, dict) or outer.get("magic") != MAGIC:
        raise CorruptState("bad magic")
    if outer.get("version") != VERSION:
        raise CorruptState(f"unsupported version {outer.get('version')!r}")
    payload, digest = outer.get("payload"), outer.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(digest, bytes):
        raise CorruptState("payload or checksum missing")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptState("checksum mismatch")
    try:
        inner = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise CorruptState(f"payload is not msgpack: {exc}") from None
    return InstanceRecord.from_dict(inner)


class StateDir:
    """The folder of state files. Methods are synchronous; callers run them in a thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def file_for(self, name: str) -> Path:
        return self.path / f"{name}{SUFFIX}"

    def save(self, rec: InstanceRecord) -> None:
        self.ensure()
        data = encode_record(rec)
        fd, tmp = tempfile.mkstemp(prefix=f".{rec.name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.file_for(rec.name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._sync_dir()

    def delete(self, name: str) -> None:
        try:
            self.file_for(name).unlink()
        except FileNotFoundError:
            return
        self._sync_dir()

    def _sync_dir(self) -> None:
        try:
            dfd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)

    def move_aside(self, file: Path, reason: str) -> Path:
        target = file.with_name(file.name + CORRUPT_SUFFIX)
        log.error("state file %s cannot be restored (%s); moved to %s", file, reason, target)
        os.replace(file, target)
        return target

    def load_all(self) -> tuple[list[InstanceRecord], list[tuple[str, str]]]:
        """(records in file-name order, [(file, reason)] of files moved aside)."""
        records: list[InstanceRecord] = []
        bad: list[tuple[str, str]] = []
        if not self.path.is_dir():
            return records, bad
        for file in sorted(self.path.iterdir()):
            if not file.name.endswith(SUFFIX) or file.name.startswith(".") or not file.is_file():
                continue
            try:
                rec = decode_record(file.read_bytes())
                if file.name != f"{rec.name}{SUFFIX}":
                    raise CorruptState(f"record names device {rec.name!r}")
            except (CorruptState, OSError) as exc:
                self.move_aside(file, str(exc))
                bad.append((str(file), str(exc)))
                continue
            records.append(rec)
        # remove stale temp files from an interrupted write
        for tmp in self.path.glob(".*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                pass
        return records, bad
