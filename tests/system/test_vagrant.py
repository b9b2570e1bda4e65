"""``vagrant validate`` on vagrant/Vagrantfile with Debian's vagrant and vagrant-libvirt (installed by
scripts/setup): the file parses and every libvirt provider setting exists. Nothing is booted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def test_vagrantfile_validates(tmp_path: Path) -> None:
    secrets_before = (VAGRANT_DIR / ".secrets").exists()
    env = {
        **os.environ,
        "VAGRANT_CWD": str(VAGRANT_DIR),
        # Machine state goes to tmp, not into the checkout; no update check over the network.
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    proc = subprocess.run(
        ["vagrant", "validate"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout
    # The cluster token is made by `vagrant up` (a trigger), never by validating.
    assert (VAGRANT_DIR / ".secrets").exists() == secrets_before


def test_vagrantfile_provisions_two_hypervisors_with_the_installer() -> None:
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert 'cpu_mode = "host-passthrough"' in text and "nested = true" in text
    assert '"hv1"' in text and '"hv2"' in text
    assert "/vagrant/scripts/install" in text and "--libvirt-tcp" in text
