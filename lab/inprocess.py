"""The parts of a cluster that live in this trio run (or are started from it): portolan,
in-process varpd nodes, and portolan as a ``portolan serve`` child process.

- `start_portolan_inprocess`: ``portolan serve`` itself (`portolan.cli.serve.serve_portolan`)
  in the caller's nursery, every listener on ``host`` port 0; the bound addresses come back.
- `PortolanProcess`: ``python -m portolan.cli.main serve`` with the same listeners, its
  ``READY svp=.. api=.. metrics=..`` line read from stdout; `stop` terminates it.
- `start_varpd_inprocess`: one `varpd.daemon.Varpd` on a driver of the shared memory
  underlay (or the driver a caller's factory makes), started in the caller's nursery, with
  every device of the spec created, searched by the svp plugin, and activated.
- `preload`: a ``portolan load`` document imported before the service starts.

Lifecycle: whatever is started in a nursery ends with it; `PortolanProcess.stop` is called
by the cluster on the way out (shielded).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from lab.netns import lines
from lab.spec import ClusterSpec, LabError, NodeSpec

REPO_ROOT = Path(__file__).resolve().parent.parent

#: (node spec, memory backend view) -> an OverlayDriver (a subclass that observes, say)
DriverFactory = Callable[[NodeSpec, Any], Any]


async def preload(store: str, document: dict[str, Any]) -> dict[str, int]:
    """Import ``document`` into the store (``portolan load``: all or nothing, no log rows)."""
    from portolan.service import Directory

    directory = await Directory.open(store)
    try:
        return await directory.load(document)
    finally:
        await directory.aclose()


async def start_portolan_inprocess(
    nursery: trio.Nursery, store: str, host: str, reload_interval: float = 0.0
) -> dict[str, tuple[str, int]]:
    """``portolan serve`` in ``nursery``; the bound (host, port) of svp, api and metrics."""
    from portolan.cli.serve import ServeConfig, serve_portolan

    config = ServeConfig(
        store=store,
        svp=(host, 0),
        api=(host, 0),
        metrics=(host, 0),
        reload_interval=reload_interval,
    )
    bound: dict[str, tuple[str, int]] = await nursery.start(serve_portolan, config)
    if "api" not in bound:
        raise LabError("portolan.api is not importable: the lab needs the management API")
    return bound


class PortolanProcess:
    """``portolan serve`` as a child process (benchmarks: its CPU is not this process's)."""

    def __init__(self) -> None:
        self.proc: trio.Process | None = None
        self.bound: dict[str, tuple[str, int]] = {}

    async def start(
        self, store: str, host: str, reload_interval: float = 0.0, timeout: float = 60.0
    ) -> dict[str, tuple[str, int]]:
        argv = [
            sys.executable, "-m", "portolan.cli.main", "serve", "--store", store,
            "--svp-listen", f"{host}:0", "--api-listen", f"{host}:0",
            "--metrics-listen", f"{host}:0", "--reload-interval", f"{reload_interval:g}",
        ]  # fmt: skip
        self.proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT)
        )
        with trio.move_on_after(timeout):
            async for line in lines(self.proc.stdout):
                if line.startswith("READY"):
                    for word in line.split()[1:]:
                        name, _, addr = word.partition("=")
                        h, _, port = addr.rpartition(":")
                        self.bound[name] = (h.strip("[]"), int(port))
                    return self.bound
        await self.stop()
        raise LabError(f"portolan serve printed no READY line within {timeout:g} s")

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(timeout):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def varpd_settings(
    spec: ClusterSpec, node: NodeSpec, folder: str, api_url: str, metrics_host: str
) -> dict[str, Any]:
    """The varpd configuration document of ``node`` (before devices), as TOML would give it."""
    opts = spec.varpd
    doc: dict[str, Any] = {
        "cn_uuid": node.cn_uuid,
        "state_dir": os.path.join(folder, "state"),
        "control_socket": os.path.join(folder, "varpd.sock") if opts.control_socket else "",
        "metrics": f"{metrics_host}:0" if opts.metrics else "",
        "lookup_workers": opts.lookup_workers,
    }
    if opts.firewall:
        doc["portolan_api"] = api_url
    if opts.log_interval is not None:
        doc["svp"] = {"log_interval": opts.log_interval}
    return doc


def device_props(node: NodeSpec, svp_host: str, svp_port: int) -> dict[str, Any]:
    """The properties of an svp-searched device on ``node``."""
    return {
        "vxlan/listen_ip": node.underlay_ip,
        "vxlan/listen_port": node.underlay_port,
        "svp/host": svp_host,
        "svp/port": svp_port,
        "svp/underlay_ip": node.underlay_ip,
        "svp/underlay_port": node.underlay_port,
    }


async def start_varpd_inprocess(
    nursery: trio.Nursery,
    spec: ClusterSpec,
    node: NodeSpec,
    *,
    folder: str,
    underlay: Any,
    svp: tuple[str, int],
    api_url: str,
    driver_factory: DriverFactory | None = None,
) -> tuple[Any, Any]:
    """Start ``node``'s varpd in ``nursery``; (varpd, driver) once its devices are active."""
    from varpd.config import parse_config
    from varpd.daemon import Varpd
    from varpd.shim.driver import OverlayDriver

    os.makedirs(folder, exist_ok=True)
    config = parse_config(varpd_settings(spec, node, folder, api_url, "127.0.0.1"))
    backend = underlay.backend()
    driver = driver_factory(node, backend) if driver_factory else OverlayDriver(backend)
    varpd = await nursery.start(Varpd(config, driver=driver).run)
    for device in spec.devices:
        await varpd.create(device.name, device.vnet_id, "svp", props=device_props(node, *svp))
        await varpd.activate(device.name)
    return varpd, driver


__all__ = [
    "DriverFactory",
    "PortolanProcess",
    "device_props",
    "preload",
    "start_portolan_inprocess",
    "start_varpd_inprocess",
    "varpd_settings",
]
