"""The direct plugin: POINT mode, every frame of the device goes to one underlay ip:port.

Properties (spec §6): ``direct/dest_ip`` (IP, required; the unspecified address,
IPv4-compatible and 6to4 addresses are refused) and ``direct/dest_port`` (uint 1..65535,
required). varpd hands ``default_point()`` to the driver at association; after that the
device never asks varpd anything. Beyond illumos both properties may change while active:
varpd validates the new values, calls `update` and re-associates the device with the new point
(illumos needed the instance destroyed and recreated), then persists.
"""

from __future__ import annotations

from typing import ClassVar

from varpd.plugins.base import LookupReply, Plugin, PropSpec
from varpd.shim.types import LookupRequest, Point, TargetMode


class DirectPlugin(Plugin):
    name: ClassVar[str] = "direct"
    mode: ClassVar[TargetMode] = TargetMode.POINT
    props: ClassVar[tuple[PropSpec, ...]] = (
        PropSpec(
            "direct/dest_ip",
            "ip",
            required=True,
            live=True,
            description="underlay IP every frame is sent to",
        ),
        PropSpec(
            "direct/dest_port",
            "uint",
            required=True,
            min=1,
            max=65535,
            live=True,
            description="underlay UDP port every frame is sent to",
        ),
    )

    def default_point(self) -> Point:
        ip = str(self.require("direct/dest_ip"))
        port = self.require("direct/dest_port")
        assert isinstance(port, int)
        return Point.of(ip, port)

    async def start(self) -> None:
        await super().start()
        self.default_point()

    async def update(self, values: dict[str, object]) -> None:
        for spec in self.props:
            if values.get(spec.name) is None:
                from varpd.plugins.base import PropError

                raise PropError(spec.name, "a required property cannot be unset")
        self.values = dict(values)

    async def lookup(self, req: LookupRequest, reply: LookupReply) -> None:
        # A POINT device never asks; if it does, the answer is the point.
        reply.respond(self.default_point())
