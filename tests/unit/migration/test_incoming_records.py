"""The destination's record of an incoming migration is typed (IncomingRecord) and its JSON is the file
format: it round-trips, an older agent's record (no peer, no reservation, no layers yet) still loads, and
what a newer agent adds is left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_fakes import one_disk_spec

from agent.errors import Forbidden
from agent.migration.incoming.records import (
    IncomingRecord,
    IncomingRecords,
    IncomingState,
    Layout,
    Reservation,
)
from agent.migration.peer.wire import PreparedDisk

MIGRATION = "5a1d3c9e-0b7f-4e2a-9c61-2f8d4b7a0e13"
VM = "5a1d3c9e-0b7f-4e2a-9c61-2f8d4b7a0e14"


def record() -> IncomingRecord:
    return IncomingRecord(
        migrationId=MIGRATION,
        vmUuid=VM,
        peer="hostA",
        spec=one_disk_spec(MIGRATION, VM),
        layout=Layout(disks=[PreparedDisk(target="vda", top="/ps/top.qcow2", layers=("/ps/base.qcow2",))]),
        reserved=Reservation(storage="b" * 32, bytes=4096),
    )


def test_a_record_round_trips_through_its_file(tmp_path: Path) -> None:
    records = IncomingRecords(tmp_path)
    saved = record()
    saved.created.append("/ps/top.qcow2")
    saved.layersDone.append("/ps/base.qcow2")
    saved.state = IncomingState.PREPARED
    records.save(saved)
    assert json.loads(records.path(MIGRATION).read_text())["state"] == "prepared"
    assert records.load(MIGRATION) == saved
    assert records.load(MIGRATION).layout.tops() == {"vda": "/ps/top.qcow2"}


def test_an_older_record_loads_and_a_newer_ones_extras_are_ignored(tmp_path: Path) -> None:
    records = IncomingRecords(tmp_path)
    old = json.loads(record().model_dump_json())
    for key in ("peer", "reserved", "created", "layersDone", "state"):
        old.pop(key)
    old["fromANewerAgent"] = {"x": 1}
    records.dir.mkdir(parents=True)
    records.path(MIGRATION).write_text(json.dumps(old))
    loaded = records.load_owned(MIGRATION, "anyone")  # no peer named: an older agent's record
    assert (loaded.peer, loaded.reserved, loaded.created, loaded.state) == (None, None, [], "preparing")


def test_settling_keeps_a_note_only_its_peer_may_read(tmp_path: Path) -> None:
    records = IncomingRecords(tmp_path)
    records.save(record())
    records.settle(records.load(MIGRATION), IncomingState.COMMITTED)
    assert not records.exists(MIGRATION)
    assert records.vm_of(MIGRATION, "hostA") == VM
    with pytest.raises(Forbidden):
        records.vm_of(MIGRATION, "hostC")
