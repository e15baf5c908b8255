from __future__ import annotations

import os
from pathlib import Path

from varpd.persist import InstanceRecord, StateDir, decode_record, encode_record


def _rec(name: str = "overlay0", id: int = 1) -> InstanceRecord:
    return InstanceRecord(
        id=id,
        name=name,
        vnetid=12,
        mtu=1400,
        plugin="direct",
        mode=1,
        props={"direct/dest_ip": "10.0.0.2", "direct/dest_port": 4789},
        device_props={"vxlan/listen_ip": "10.0.0.1"},
        vnics=[{"mac": "02:00:00:00:00:01", "vlan_id": 3, "tap": None}],
    )


def test_record_round_trips() -> None:
    assert decode_record(encode_record(_rec())) == _rec()


def test_save_is_atomic_and_private(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.save(_rec())
    state.save(_rec())
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == ["overlay0.varpd"]  # no temp file left behind
    assert os.stat(tmp_path / "state" / "overlay0.varpd").st_mode & 0o777 == 0o600
    records, bad = state.load_all()
    assert records == [_rec()] and bad == []


def test_corrupt_files_are_moved_aside_with_a_reason(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save(_rec("good"))
    (tmp_path / "garbage.varpd").write_bytes(b"\x00\x01not msgpack\xc1")
    data = bytearray(encode_record(_rec("flipped")))
    data[-3] ^= 0xFF  # payload changed: checksum mismatch
    (tmp_path / "flipped.varpd").write_bytes(bytes(data))
    (tmp_path / "renamed.varpd").write_bytes(encode_record(_rec("other")))
    records, bad = state.load_all()
    assert [r.name for r in records] == ["good"]
    reasons = {Path(f).name: r for f, r in bad}
    assert set(reasons) == {"garbage.varpd", "flipped.varpd", "renamed.varpd"}
    assert "checksum" in reasons["flipped.varpd"]
    for name in reasons:
        assert (tmp_path / f"{name}.corrupt").exists()
        assert not (tmp_path / name).exists()


def test_delete_removes_the_file(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save(_rec())
    state.delete("overlay0")
    state.delete("overlay0")  # idempotent
    assert state.load_all() == ([], [])
