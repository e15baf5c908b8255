"""A blocking client of varpd's control socket (`protocol.control` frames over a Unix socket).

One connection per plugin run; requests are sent one at a time and each reply is read before
the next request (varpd answers a connection's requests in order). varpd serialises device
changes itself, so concurrent plugins need no locking of their own.

`peer_netns()` is how the plugin finds varpd's network namespace without configuration: the
``SO_PEERCRED`` credentials of a connected Unix socket name the pid of the process that
listens on it, and ``/proc/<pid>/ns/net`` is that process's namespace. Unix socket paths
resolve in the file system, not in a network namespace, so a plugin in the host namespace
reaches a varpd that runs inside a compute node's namespace.

Errors: a missing or refusing socket is ``TRY_AGAIN_LATER`` (varpd down), a malformed reply is
``IO_FAILURE``, an error reply is `VarpdRefused` (``VARPD_ERROR`` carrying varpd's code).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from typing import Any

from cni.spec import IO_FAILURE, TRY_AGAIN_LATER, VARPD_ERROR, CniError
from protocol.control import ControlProtocolError, Decoder, Reply, Request, encode_request

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class VarpdRefused(CniError):
    """varpd answered with an error reply; ``varpd_code`` is its code (``not_found``, ...)."""

    def __init__(self, op: str, varpd_code: str, message: str) -> None:
        super().__init__(VARPD_ERROR, f"varpd {op}: {varpd_code}: {message}")
        self.varpd_code = varpd_code


class VarpdClient:
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._decoder = Decoder()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise CniError(
                TRY_AGAIN_LATER, f"cannot reach varpd at {path}: {exc.strerror or exc}"
            ) from None
        self._sock = sock

    def __enter__(self) -> VarpdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def peer_pid(self) -> int:
        raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
        return _CRED.unpack(raw)[0]

    def peer_netns(self) -> str:
        """Path of the network namespace varpd lives in."""
        path = f"/proc/{self.peer_pid()}/ns/net"
        if not os.path.exists(path):
            raise CniError(IO_FAILURE, f"varpd's namespace {path} is not visible")
        return path

    def call(self, op: str, **args: Any) -> Any:
        req = Request(next(self._ids), op, {k: v for k, v in args.items() if v is not None})
        try:
            self._sock.sendall(encode_request(req))
            while True:
                msg = self._decoder.next_message()
                if msg is not None:
                    break
                data = self._sock.recv(65536)
                if not data:
                    raise CniError(IO_FAILURE, f"varpd closed the connection during {op}")
                self._decoder.receive_data(data)
        except ControlProtocolError as exc:
            raise CniError(IO_FAILURE, f"bad reply from varpd to {op}: {exc}") from None
        except OSError as exc:
            raise CniError(TRY_AGAIN_LATER, f"varpd {op}: {exc}") from None
        if not isinstance(msg, Reply) or msg.id != req.id:
            raise CniError(IO_FAILURE, f"varpd answered {op} out of order")
        if not msg.ok:
            err = msg.error
            raise VarpdRefused(op, err.code if err else "internal", err.message if err else "")
        return msg.result
