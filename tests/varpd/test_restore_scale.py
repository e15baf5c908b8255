"""Restore is linear in the number of instances (bench/store.py ``varpd_restore`` times it).

It was quadratic: every instance restored recounted the gauges over every instance (two
`Instance.summary` calls per instance per change), scanned every instance for its vnetid, and
rewrote (with fsync) the state file it had just read. These tests count the work instead of
timing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.varpd.conftest import sample
from varpd.config import parse_config
from varpd.daemon import Varpd
from varpd.instance import Instance
from varpd.persist import InstanceRecord, StateDir

N = 60


def write_state(folder: Path, count: int) -> StateDir:
    state = StateDir(folder)
    for i in range(1, count + 1):
        state.save(
            InstanceRecord(
                id=i,
                name=f"ovl{i}",
                vnetid=1000 + i,
                mtu=1400,
                plugin="direct",
                mode=1,
                props={"direct/dest_ip": "10.0.0.2", "direct/dest_port": 4789},
                device_props={"vxlan/listen_ip": "10.0.0.1"},
                vnics=[{"mac": f"02:00:00:00:00:{i:02x}", "vlan_id": 0, "tap": None}],
            )
        )
    return state


async def restore(folder: Path) -> Varpd:
    config = parse_config(
        {"state_dir": str(folder), "control_socket": "", "metrics": "", "lookup_workers": 1}
    )
    varpd = Varpd(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(varpd.run)
        nursery.cancel_scope.cancel()
    return varpd


async def test_restore_does_linear_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = write_state(tmp_path, N)
    summaries = 0
    real_summary = Instance.summary

    def counting_summary(self: Instance) -> dict[str, object]:
        nonlocal summaries
        summaries += 1
        return real_summary(self)

    saves: list[str] = []
    real_save = StateDir.save
    monkeypatch.setattr(Instance, "summary", counting_summary)
    monkeypatch.setattr(
        StateDir, "save", lambda self, rec: (saves.append(rec.name), real_save(self, rec))
    )
    before = {f.name: f.stat().st_mtime_ns for f in state.path.iterdir()}
    varpd = await restore(tmp_path)
    assert len(varpd.restored) == N
    assert summaries <= 2 * N  # was ~N * N
    assert saves == []  # unchanged records are not written back
    assert {f.name: f.stat().st_mtime_ns for f in state.path.iterdir()} == before


async def test_gauges_are_right_after_restore_and_after_changes(
    tmp_path: Path, make_varpd: Any
) -> None:
    write_state(tmp_path / "node-state", 5)
    async with make_varpd("node") as v:
        assert len(v.restored) == 5
        assert sample(v, "varpd_instances", state="active") == 5
        assert sample(v, "varpd_instances", state="created") == 0
        assert sample(v, "varpd_degraded_instances") == 0
        await v.create("extra", 77, "direct")
        assert sample(v, "varpd_instances", state="created") == 1
        v.instances["ovl1"].set_failure("testing")
        assert sample(v, "varpd_degraded_instances") == 1
        await v.delete("ovl2")
        assert sample(v, "varpd_instances", state="active") == 4


async def test_a_changed_record_is_still_written_back(tmp_path: Path) -> None:
    state = write_state(tmp_path, 1)
    rec = state.load_all()[0][0]
    rec.props["direct/dest_port"] = "4789"  # text: canonicalised to 4789 on restore
    state.save(rec)
    await restore(tmp_path)
    assert state.load_all()[0][0].props["direct/dest_port"] == 4789
