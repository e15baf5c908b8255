"""``portolan load`` is strict: unknown keys are refused with their path, changes to stored
objects need ``--replace`` (which then writes the shootdowns of the moves), a refused load
leaves no new database file, large files report progress, and the summary is one plain line
(issue 12 item 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import portolan.cli.load as load_cli
from portolan.cli.main import main
from portolan.service import Directory
from protocol.addr import parse_mac

CN1 = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
CN2 = "c5f6aa75-7b40-11e4-a6fa-d34c824a42ce"
CN3 = "d6a7bb86-7b40-11e4-a6fa-d34c824a42cf"
VNET = 12340
MAC1 = "00:0a:95:9d:68:16"
MAC2 = "00:0a:95:9d:68:17"
MAC3 = "00:0a:95:9d:68:18"


def base_doc() -> dict:
    return {
        "cns": [
            {"uuid": CN1, "ip": "192.168.1.1"},
            {"uuid": CN2, "ip": "192.168.1.2"},
            {"uuid": CN3, "ip": "192.168.1.3"},
        ],
        "vnics": [
            {"mac": MAC1, "ip": "10.0.0.1", "vnet_id": VNET, "cn_uuid": CN1, "tags": {"a": "b"}},
            {"mac": MAC2, "ip": "10.0.0.2", "vnet_id": VNET, "cn_uuid": CN2},
            {"mac": MAC3, "ip": "10.9.0.3", "vnet_id": 999, "cn_uuid": CN3},
        ],
    }


def write(tmp_path: Path, doc: dict, name: str = "doc.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def load(tmp_path: Path, doc: dict, *extra: str, db: str = "p.db") -> int:
    return main(["load", write(tmp_path, doc), "--store", f"sqlite:{tmp_path / db}", *extra])


def read_store(tmp_path: Path, fn, db: str = "p.db"):
    async def go():
        d = await Directory.open(f"sqlite:{tmp_path / db}")
        try:
            return await fn(d)
        finally:
            await d.aclose()

    return trio.run(go)


# ----------------------------------------------------------------------------------------------
# Unknown keys


def test_an_unknown_top_level_key_is_refused_by_name_and_leaves_no_database(tmp_path, capsys):
    doc = {"cns": base_doc()["cns"], "vnic": base_doc()["vnics"]}
    assert load(tmp_path, doc) == 1
    err = capsys.readouterr().err
    assert "nothing was written" in err
    assert "  vnic: unknown key" in err and 'did you mean "vnics"?' in err
    assert not (tmp_path / "p.db").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "doc.json"]


def test_an_unknown_key_in_an_entry_is_refused_with_its_path(tmp_path, capsys):
    doc = base_doc()
    doc["cns"][1]["prot"] = 5
    doc["vnics"][2]["vlan_idd"] = 3
    assert load(tmp_path, doc) == 1
    err = capsys.readouterr().err
    assert "cns[1].prot: unknown key" in err and 'did you mean "port"?' in err
    assert "vnics[2].vlan_idd: unknown key" in err
    assert not (tmp_path / "p.db").exists()


def test_a_refused_load_into_an_existing_store_keeps_the_file(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    bad = base_doc()
    bad["extra"] = 1
    assert load(tmp_path, bad) == 1
    assert (tmp_path / "p.db").exists()
    assert len(read_store(tmp_path, lambda d: d.list_vnics())) == 3


# ----------------------------------------------------------------------------------------------
# Changes to stored objects


def test_loading_the_same_document_again_changes_nothing(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    first = capsys.readouterr().out
    assert load(tmp_path, base_doc()) == 0
    again = capsys.readouterr().out
    assert first.startswith("loaded 3 cns, 3 vnics and 0 routes from ")
    assert first.rstrip().endswith("6 new, 0 replaced, 0 unchanged")
    assert again.rstrip().endswith("0 new, 0 replaced, 6 unchanged")
    assert "(version 1)" in first and "(version 1)" in again  # nothing written, no new version
    assert first.count("\n") == again.count("\n") == 1


def test_a_load_that_would_change_a_stored_vnic_is_refused_without_replace(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    before = read_store(tmp_path, lambda d: d.get_vnic(parse_mac(MAC1)))
    moved = base_doc()
    moved["vnics"][0]["cn_uuid"] = CN2
    del moved["vnics"][0]["tags"]
    capsys.readouterr()
    assert load(tmp_path, moved) == 1
    err = capsys.readouterr().err
    assert "would change objects already in the store" in err and "--replace" in err
    assert f"vnics[0]: VNIC {MAC1} exists:" in err
    assert f"cn_uuid '{CN1}' -> '{CN2}'" in err and "tags" in err
    assert read_store(tmp_path, lambda d: d.get_vnic(parse_mac(MAC1))) == before


def test_a_changed_cn_underlay_is_refused_without_replace(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    doc = {"cns": [{"uuid": CN1, "ip": "192.168.1.9", "port": 4790}]}
    assert load(tmp_path, doc) == 1
    err = capsys.readouterr().err
    assert "cns[0]: CN exists: ip '192.168.1.1' -> '192.168.1.9', port 4789 -> 4790" in err


def test_replace_moves_a_vnic_and_writes_the_shootdowns_of_the_move(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    assert read_store(tmp_path, lambda d: d.log_records(CN1)) == []
    moved = base_doc()
    moved["vnics"][0]["cn_uuid"] = CN2  # MAC1: CN1 -> CN2, tags kept
    capsys.readouterr()
    assert load(tmp_path, moved, "--replace") == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("0 new, 1 replaced, 5 unchanged; 4 shootdowns queued")

    async def check(d: Directory):
        v = await d.get_vnic(parse_mac(MAC1))
        assert v.cn_uuid == CN2 and v.tags == {"a": "b"}
        # the vnet's CNs after the move (CN2) and the old CN (CN1): a VL2 and a VL3 each
        logs = {
            cn: [(r.type, r.vnet_id) for r in await d.log_records(cn)] for cn in (CN1, CN2, CN3)
        }
        assert sorted(logs[CN1]) == sorted(logs[CN2]) == [(1, VNET), (2, VNET)]
        assert logs[CN3] == []  # not in that vnet

    read_store(tmp_path, check)


def test_replace_keeps_the_network_of_a_vnic_created_through_the_api(tmp_path, capsys):
    async def setup(d: Directory):
        await d.put_cn(CN1, "192.168.1.1")
        await d.put_cn(CN2, "192.168.1.2")
        net = await d.create_network(
            name="n", owner_uuid=CN3, vnet_id=VNET, vlan_id=0, subnet="10.0.0.0/24"
        )
        await d.create_vnic(
            network_uuid=net.uuid, cn_uuid=CN1, mac=parse_mac(MAC1), ip="10.0.0.1", tags={"x": 1}
        )
        return net.uuid

    net_uuid = read_store(tmp_path, setup)
    doc = {"vnics": [{"mac": MAC1, "ip": "10.0.0.1", "vnet_id": VNET, "cn_uuid": CN1}]}
    assert load(tmp_path, doc) == 1  # would drop its tags
    assert "tags {'x': 1} -> {}" in capsys.readouterr().err
    doc["vnics"][0]["tags"] = {"x": 1}
    assert load(tmp_path, doc) == 0  # identical apart from the network: unchanged
    doc["vnics"][0]["cn_uuid"] = CN2
    assert load(tmp_path, doc, "--replace") == 0
    v = read_store(tmp_path, lambda d: d.get_vnic(parse_mac(MAC1)))
    assert v.network_uuid == net_uuid and v.cn_uuid == CN2 and v.tags == {"x": 1}


def test_replace_lets_two_vnics_swap_ips(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    doc = base_doc()
    doc["vnics"][0]["ip"], doc["vnics"][1]["ip"] = "10.0.0.2", "10.0.0.1"
    assert load(tmp_path, doc, "--replace") == 0
    v1 = read_store(tmp_path, lambda d: d.get_vnic(parse_mac(MAC1)))
    assert v1.ip == "10.0.0.2"


# ----------------------------------------------------------------------------------------------
# Progress and summary


def test_a_large_document_reports_progress_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(load_cli, "PROGRESS_MIN_ENTRIES", 5)
    monkeypatch.setattr("portolan.service.LOAD_BATCH", 2)
    assert load(tmp_path, base_doc()) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("portolan load: read ") and "3 CNs, 3 VNICs, 0 routes" in lines[0]
    assert any("wrote 2 of 3 new VNICs" in x for x in lines)
    assert any("wrote 3 of 3 new VNICs" in x for x in lines)
    assert lines[-1].startswith("portolan load: done (")
    assert all(x.endswith(" s)") for x in lines)
    assert captured.out.count("\n") == 1


def test_a_small_document_is_quiet_on_stderr(tmp_path, capsys):
    assert load(tmp_path, base_doc()) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag", ["--json"])
def test_the_json_summary_splits_new_replaced_and_unchanged(tmp_path, capsys, flag):
    assert load(tmp_path, base_doc(), flag) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vnics"] == 3 and summary["created"]["vnics"] == 3
    assert summary["replaced"] == {"cns": 0, "vnics": 0, "routes": 0}
