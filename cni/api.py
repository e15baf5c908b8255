"""A small synchronous client of portolan's management API, for the plugin's few calls.

Every call is one HTTP request with the configuration's timeout. Failures become `CniError`:
an unreachable API or a 503 is ``TRY_AGAIN_LATER`` (11, the runtime may retry), a 507 is
``SUBNET_FULL`` (103), any other refusal is ``PORTOLAN_ERROR`` (100) carrying portolan's
``code: message``. `find_vnics` is how DEL and CHECK locate a container's VNIC: the VNICs of
the network on this compute node whose plugin tags name the container and interface.
"""

from __future__ import annotations

from typing import Any

import httpx

from cni.spec import (
    PORTOLAN_ERROR,
    SUBNET_FULL,
    TAG_CONTAINER,
    TAG_IFNAME,
    TRY_AGAIN_LATER,
    CniError,
)


class PortolanClient:
    """Context manager over one ``httpx.Client``."""

    def __init__(self, base: str, token: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=base, headers=headers, timeout=timeout)

    def __enter__(self) -> PortolanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def _call(self, method: str, path: str, *, ok_missing: bool = False, **kw: Any) -> Any:
        try:
            resp = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise CniError(
                TRY_AGAIN_LATER, f"portolan API unreachable: {exc}", f"{method} {path}"
            ) from None
        if resp.status_code == 404 and ok_missing:
            return None
        if resp.status_code >= 300:
            try:
                body = resp.json()
                text = f"{body.get('code')}: {body.get('message')}"
                for err in body.get("errors") or []:
                    text += f"; {err.get('field')}: {err.get('message')}"
            except Exception:
                text = resp.text[:500]
            code = {503: TRY_AGAIN_LATER, 507: SUBNET_FULL}.get(resp.status_code, PORTOLAN_ERROR)
            raise CniError(code, f"portolan: {text}", f"{method} {path} -> {resp.status_code}")
        return resp.json() if resp.content else None

    def network(self, uuid: str) -> dict[str, Any]:
        return self._call("GET", f"/networks/{uuid}")

    def create_vnic(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/vnics", json=body)

    def vnic(self, mac: str) -> dict[str, Any] | None:
        return self._call("GET", f"/vnics/{mac}", ok_missing=True)

    def delete_vnic(self, mac: str) -> None:
        """Delete; a VNIC that is already gone is success."""
        self._call("DELETE", f"/vnics/{mac}", ok_missing=True)

    def find_vnics(
        self, network_uuid: str, cn_uuid: str, container_id: str, ifname: str
    ) -> list[dict[str, Any]]:
        vnics = self._call(
            "GET", "/vnics", params={"network_uuid": network_uuid, "cn_uuid": cn_uuid}
        )
        return [
            v
            for v in vnics or []
            if (v.get("tags") or {}).get(TAG_CONTAINER) == container_id
            and (v.get("tags") or {}).get(TAG_IFNAME) == ifname
        ]
