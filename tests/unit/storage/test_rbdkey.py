"""The agent's own key to an RBD pool (agent/storage/rbdkey.py): the keyring read, the refusal without one,
what QEMU tools are handed. The copies it serves are proven in the lab (tests/lab/test_kinds_samehost.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.errors import Code, PreflightFailed
from agent.storage.locations import RbdImage
from agent.storage.rbdkey import keyed, read_key, snapshot_name
from agent.storage.rbdpool import RbdPool

KEY = "AQBxT0VlAAAAABAAv1yNn3y1yC0a3l2Zl7uDUg=="
POOL = RbdPool("6c1e4a52-0000-4000-8000-000000000001", "ksa", "", (("10.0.0.1", 6789),), "ksalab", "s")


def _keyring(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ceph.client.ksalab.keyring"
    path.write_text(text)
    return str(path)


def test_the_users_key_is_read_from_its_section(tmp_path: Path) -> None:
    text = f'[client.admin]\n\tkey = AQAAAA==\n[client.ksalab]\n\tkey = {KEY}\n\tcaps mon = "profile rbd"\n'
    assert read_key(_keyring(tmp_path, text), "ksalab") == KEY


@pytest.mark.parametrize(
    "text",
    ["[client.other]\n\tkey = AQAAAA==\n", "not a keyring", None],
    ids=["no section", "garbage", "missing"],
)
def test_a_keyring_without_the_users_key_is_refused_naming_it(tmp_path: Path, text: str | None) -> None:
    path = _keyring(tmp_path, text) if text is not None else str(tmp_path / "absent")
    with pytest.raises(PreflightFailed) as err:
        read_key(path, "ksalab")
    assert err.value.code is Code.CEPH_ACCESS and path in err.value.description


async def test_a_pool_without_a_keyring_is_refused_for_what_needs_it() -> None:
    with pytest.raises(PreflightFailed) as err:
        async with keyed(POOL, "a stopped VM's copy", field="vmUuid"):
            pass
    assert err.value.code is Code.STORAGE_KIND_UNSUPPORTED and err.value.field == "vmUuid"
    assert "names no keyring" in err.value.description and "keyring" in (err.value.details or "")


async def test_qemu_gets_the_key_from_a_private_file_removed_afterwards(tmp_path: Path) -> None:
    pool = RbdPool(
        POOL.uuid,
        "ksa",
        "tenant",
        POOL.monitors,
        "ksalab",
        "s",
        _keyring(tmp_path, f"[client.ksalab]\nkey = {KEY}\n"),
    )
    async with keyed(pool, "test") as key:
        secret = key.secret_file
        assert secret.read_text() == KEY and stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
        assert key.qemu_objects() == ["--object", f"secret,id={key.secret_id},file={secret},format=base64"]
        spec = json.loads(
            key.image_json(RbdImage("ksa", "tenant", "vol"), snapshot="s1").removeprefix("json:")
        )
        assert spec == {
            "driver": "raw",
            "file": {
                "driver": "rbd",
                "pool": "ksa",
                "namespace": "tenant",
                "image": "vol",
                "snapshot": "s1",
                "user": "ksalab",
                "server": [{"host": "10.0.0.1", "port": "6789"}],
                "key-secret": key.secret_id,
            },
        }
        assert KEY not in " ".join(key.qemu_objects())  # never on a command line
    assert not secret.exists() and not secret.parent.exists()


def test_a_layer_keeps_its_file_name_as_snapshot_name() -> None:
    assert (
        snapshot_name("/var/lib/ps1/6f1c2a5e-0b8e-4d4f-9c4e-0a1b2c3d4e5f.qcow2")
        == "6f1c2a5e-0b8e-4d4f-9c4e-0a1b2c3d4e5f"
    )
    assert snapshot_name("/x/base layer@1.qcow2") == "base-layer-1"
