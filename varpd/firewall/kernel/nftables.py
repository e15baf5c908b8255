"""``NftDriver``: run nftables JSON commands, each call one kernel transaction.

Two ways to reach the kernel, chosen once when the driver is made:

1. **libnftables** (preferred): the project's Python (pyenv 3.11) cannot import Debian's
   ``python3-nftables`` package, which lives in ``/usr/lib/python3/dist-packages``, but that
   package is one pure-Python file, a ctypes wrapper of ``libnftables.so.1``. We load that
   file by path (``importlib``), never adding the system site-packages to ``sys.path``. A
   command list goes in as ``{"nftables": [...]}`` through ``json_cmd``: libnftables
   evaluates all of it and sends one netlink batch, which the kernel commits atomically or
   not at all.
2. **``nft -j -f -``** (fallback, when the module or the library cannot be loaded): the same
   JSON document on stdin; one invocation is one batch too.

``run(commands)`` raises ``NftError`` (with nft's message) when the batch is refused: then
nothing of it is in force. ``query(text)`` runs a read-only listing (``"list table bridge
portolan"``) and returns the parsed JSON output; no text output is ever parsed.

Namespaces: with ``netns="name"`` every call runs with the calling thread switched into
``/var/run/netns/name`` (``setns(2)``; the tests use this to drive a table in a namespace of
their own). libnftables opens its netlink socket when a context is created, so in that mode a
context is made per call, inside the namespace.

Calls block (a big batch can take a second); async callers go through
``trio.to_thread.run_sync``. One driver must not be used from two threads at once (the
applier serializes with a lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

SYSTEM_BINDING = "/usr/lib/python3/dist-packages/nftables/nftables.py"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_binding: Any = None


class NftError(RuntimeError):
    """nftables refused a batch (nothing of it was applied) or could not be run."""


def _load_binding() -> Any:
    """The ``nftables`` module of python3-nftables, loaded by path; None if unavailable."""
    global _binding
    if _binding is None:
        try:
            spec = importlib.util.spec_from_file_location("_portolan_nftables", SYSTEM_BINDING)
            if spec is None or spec.loader is None:
                raise ImportError(SYSTEM_BINDING)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.Nftables().cmd("list tables")  # the library loads and answers
            _binding = module
        except Exception:  # noqa: BLE001 - any failure means: use the nft command instead
            _binding = False
    return _binding or None


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the block with the calling thread in namespace ``netns`` (None: stay)."""
    if netns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)


class NftDriver:
    """Runs JSON command batches through libnftables (or ``nft -j -f -``)."""

    def __init__(self, netns: str | None = None, *, backend: str = "auto") -> None:
        if backend not in ("auto", "libnftables", "nft"):
            raise ValueError(f"backend must be auto, libnftables or nft, got {backend!r}")
        self.netns = netns
        binding = _load_binding() if backend in ("auto", "libnftables") else None
        if backend == "libnftables" and binding is None:
            raise NftError(f"libnftables binding not loadable from {SYSTEM_BINDING}")
        if binding is None and shutil.which("nft") is None:
            raise NftError("neither libnftables (python3-nftables) nor the nft command is here")
        self.backend = "libnftables" if binding is not None else "nft"
        self._binding = binding
        self._ctx: Any = None
        self.batches = 0

    def _context(self) -> Any:
        if self.netns is not None:
            ctx = self._binding.Nftables()
        else:
            if self._ctx is None:
                self._ctx = self._binding.Nftables()
            ctx = self._ctx
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        return ctx

    def run(self, commands: list[dict[str, Any]]) -> None:
        """Apply ``commands`` as one transaction; ``NftError`` if refused (nothing applied)."""
        if not commands:
            return
        doc = {"nftables": commands}
        with in_netns(self.netns):
            if self.backend == "libnftables":
                rc, _out, err = self._context().json_cmd(doc)
            else:
                proc = subprocess.run(
                    ["nft", "-j", "-f", "-"],
                    input=json.dumps(doc),
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                rc, err = proc.returncode, proc.stderr
        self.batches += 1
        if rc != 0:
            raise NftError(f"nftables refused the batch: {str(err).strip()[:2000]}")

    def run_text(self, script: str) -> None:
        """Apply a script in nft's own syntax as one transaction (``nft -f``); ``NftError`` if
        refused. For rules the JSON schema cannot say simply (raw payload set keys)."""
        with in_netns(self.netns):
            if self.backend == "libnftables":
                rc, _out, err = self._context().cmd(script)
            else:
                proc = subprocess.run(
                    ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=120
                )
                rc, err = proc.returncode, proc.stderr
        self.batches += 1
        if rc != 0:
            raise NftError(f"nftables refused the script: {str(err).strip()[:2000]}")

    def query(self, command: str) -> list[dict[str, Any]]:
        """A listing command's JSON objects (``[]`` when the object does not exist)."""
        with in_netns(self.netns):
            if self.backend == "libnftables":
                rc, out, err = self._context().cmd(command)
            else:
                proc = subprocess.run(
                    ["nft", "-j", *command.split()], capture_output=True, text=True, timeout=60
                )
                rc, out, err = proc.returncode, proc.stdout, proc.stderr
        if rc != 0:
            if "No such file or directory" in str(err):
                return []
            raise NftError(f"nft {command}: {str(err).strip()[:500]}")
        if not out:
            return []
        return [obj for obj in json.loads(out).get("nftables", []) if "metainfo" not in obj]
