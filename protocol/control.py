"""varpd control-socket messages: 4-byte big-endian length + one msgpack map per frame.

Request ``{"id": int, "op": str, "args": {...}}``; reply ``{"id": int, "ok": true, "result":
...}`` or ``{"id": int, "ok": false, "error": {"code": str, "message": str, "field": str |
None}}``. Sans I/O: `encode_*` return bytes, `Decoder` takes bytes and yields decoded messages.
Frames larger than ``max_size`` (default 1 MiB) or that are not a msgpack map of the right shape
raise `ControlProtocolError`; the decoder is then poisoned and the connection must be closed.
Binary values never appear: MACs and IPs travel as text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

LENGTH = struct.Struct(">I")
DEFAULT_MAX_SIZE = 1 << 20


class ControlProtocolError(Exception):
    """A frame that cannot be a control message; the stream is unusable afterwards."""


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: str
    message: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


Message = Request | Reply


def _frame(obj: dict[str, Any], max_size: int) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_size:
        raise ControlProtocolError(f"message of {len(body)} bytes exceeds the {max_size} limit")
    return LENGTH.pack(len(body)) + body


def encode_request(req: Request, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    return _frame({"id": req.id, "op": req.op, "args": req.args}, max_size)


def encode_reply(rep: Reply, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    if rep.ok:
        return _frame({"id": rep.id, "ok": True, "result": rep.result}, max_size)
    err = rep.error or ErrorInfo("internal", "unspecified error")
    return _frame(
        {
            "id": rep.id,
            "ok": False,
            "error": {"code": err.code, "message": err.message, "field": err.field},
        },
        max_size,
    )


def encode(msg: Message, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    if isinstance(msg, Request):
        return encode_request(msg, max_size)
    return encode_reply(msg, max_size)


def _as_message(obj: object) -> Message:
    if not isinstance(obj, dict):
        raise ControlProtocolError("a control message must be a msgpack map")
    mid = obj.get("id")
    if not isinstance(mid, int) or isinstance(mid, bool):
        raise ControlProtocolError("a control message needs an integer 'id'")
    if "op" in obj:
        op = obj["op"]
        args = obj.get("args", {})
        if args is None:
            args = {}
        if not isinstance(op, str) or not isinstance(args, dict):
            raise ControlProtocolError("a request needs a string 'op' and a map 'args'")
        return Request(mid, op, args)
    if "ok" in obj:
        ok = obj["ok"]
        if not isinstance(ok, bool):
            raise ControlProtocolError("'ok' must be a boolean")
        if ok:
            return Reply(mid, True, obj.get("result"))
        err = obj.get("error")
        if not isinstance(err, dict):
            raise ControlProtocolError("an error reply needs an 'error' map")
        fld = err.get("field")
        return Reply(
            mid,
            False,
            None,
            ErrorInfo(
                str(err.get("code", "internal")),
                str(err.get("message", "")),
                None if fld is None else str(fld),
            ),
        )
    raise ControlProtocolError("a control message is a request ('op') or a reply ('ok')")


def decode_frame(frame: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Message:
    """Decode exactly one whole frame (length prefix included)."""
    dec = Decoder(max_size)
    dec.receive_data(frame)
    msg = dec.next_message()
    if msg is None or dec.buffered:
        raise ControlProtocolError("not exactly one whole frame")
    return msg


class Decoder:
    """Incremental decoder: feed bytes, take whole messages."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._poisoned: ControlProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._poisoned:
            raise self._poisoned
        self._buf += data

    def next_message(self) -> Message | None:
        if self._poisoned:
            raise self._poisoned
        if len(self._buf) < LENGTH.size:
            return None
        (size,) = LENGTH.unpack_from(self._buf)
        if size > self.max_size:
            self._poisoned = ControlProtocolError(
                f"frame of {size} bytes exceeds the {self.max_size} limit"
            )
            raise self._poisoned
        if len(self._buf) < LENGTH.size + size:
            return None
        body = bytes(self._buf[LENGTH.size : LENGTH.size + size])
        del self._buf[: LENGTH.size + size]
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
            return _as_message(obj)
        except ControlProtocolError as exc:
            self._poisoned = exc
            raise
        except Exception as exc:
            self._poisoned = ControlProtocolError(f"undecodable msgpack: {exc}")
            raise self._poisoned from exc
