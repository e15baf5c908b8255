"""A compute node as a real ``varpd run`` process inside its namespace (netns placement).

`write_config` renders the node's TOML: the settings `lab.inprocess.varpd_settings` gives,
``backend`` (``udp`` today; ``linux`` when varpd has it), ``log_level``, and one
``[[device]]`` per `DeviceSpec`, searched by svp. `VarpdProcess.start` runs
``ip netns exec <ns> python -m varpd.cli run --config FILE`` with this interpreter, reads the
``READY control=.. metrics=..`` line from stdout (30 s bound) and relays every stderr line to
the cluster's log under the node's name (the firewall fetcher's httpx long-poll lines are
left out). `stop` sends SIGTERM, waits 5 s, then kills.

Adding a backend is a change here only if its devices need more properties: the
``backend`` key is the spec's, and `BACKEND_PROPS` maps a backend to a function giving the
extra device properties of a node (none for udp).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from lab.inprocess import REPO_ROOT, device_props, varpd_settings
from lab.netns import Log, lines
from lab.spec import ClusterSpec, LabError, NodeSpec

#: backend -> extra device properties for a node (the linux backend registers its own here)
BACKEND_PROPS: dict[str, Callable[[NodeSpec], dict[str, Any]]] = {}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_config(
    spec: ClusterSpec, node: NodeSpec, folder: str, *, api_url: str, svp: tuple[str, int]
) -> str:
    """Write ``folder/varpd.toml`` for ``node``; its path."""
    os.makedirs(folder, exist_ok=True)
    settings = varpd_settings(spec, node, folder, api_url, node.underlay_ip)
    svp_table = settings.pop("svp", None)
    settings["backend"] = spec.backend
    settings["log_level"] = spec.varpd.log_level
    out = [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    if svp_table:
        out += ["", "[svp]", *(f"{k} = {_toml_value(v)}" for k, v in svp_table.items())]
    for device in spec.devices:
        props = device_props(node, *svp)
        props.update(BACKEND_PROPS.get(spec.backend, lambda n: {})(node))
        inline = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in props.items())
        out += [
            "",
            "[[device]]",
            f"name = {json.dumps(device.name)}",
            f"vnetid = {device.vnet_id}",
            f"mtu = {device.mtu}",
            'search = "svp"',
            f"props = {{ {inline} }}",
        ]
    path = os.path.join(folder, "varpd.toml")
    Path(path).write_text("\n".join(out) + "\n")
    return path


class VarpdProcess:
    """``varpd run`` in namespace ``ns``; `start` returns once it printed READY."""

    def __init__(self, node: NodeSpec, ns: str, log: Log) -> None:
        self.node = node
        self.ns = ns
        self.log = log
        self.proc: trio.Process | None = None
        self.metrics_url = ""
        self.control_path = ""

    async def start(self, nursery: trio.Nursery, config_path: str, timeout: float = 30.0) -> None:
        argv = [
            "ip", "netns", "exec", self.ns, sys.executable, "-m", "varpd.cli", "run",
            "--config", config_path,
        ]  # fmt: skip
        self.log("shell", "$ " + " ".join(argv))
        self.proc = proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO_ROOT)
        )
        ready = trio.Event()

        async def read_stdout() -> None:
            async for line in lines(proc.stdout):
                if line.startswith("READY"):
                    for word in line.split()[1:]:
                        key, _, value = word.partition("=")
                        if key == "metrics":
                            self.metrics_url = f"http://{value}/metrics"
                        elif key == "control":
                            self.control_path = value
                    ready.set()

        async def read_stderr() -> None:
            async for line in lines(proc.stderr):
                # "2026-.. INFO varpd.x: message" -> "INFO varpd.x: message"
                parts = line.split(" ", 2)
                text = parts[2] if len(parts) == 3 else line
                if " httpx: " not in f" {text}":  # the policy long-polls, every 30 s
                    self.log(self.node.name, text)

        nursery.start_soon(read_stdout)
        nursery.start_soon(read_stderr)
        with trio.move_on_after(timeout):
            await ready.wait()
        if not ready.is_set():
            raise LabError(f"varpd on {self.node.name} printed no READY line within {timeout:g} s")

    async def stop(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError, OSError):
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


__all__ = ["BACKEND_PROPS", "VarpdProcess", "write_config"]
