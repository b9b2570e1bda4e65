"""The guest's memory checker (labkit/memcheck.c, docs/lab.md) catches what it is there for: a page put back
to an older generation (what a migration that failed to resend a dirtied page leaves), a page that is not
whole, and a checker that stopped. Pages are changed from outside the guest through QEMU's gdbstub in
physical-memory mode (tests/lab/gdbpoke.py), at the guest-physical addresses the checker reports when it
starts; so the check that every migrating test makes (``Guest.wait_for_acks``) cannot pass by doing
nothing."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest
from gdbpoke import GdbStub
from labtools import Guest, Lab, lab_cli

from labkit import memcheck
from labkit.guestdir import GuestRecord

pytestmark = pytest.mark.lab

MAGIC = 0x4B53414D454D3031  # "KSAMEM01": words 0-3 of a page are magic, index, generation, checksum


def header(page: bytes) -> tuple[int, int, int]:
    magic, index, gen, _ = struct.unpack("<4Q", page[:32])
    return magic, index, gen


def test_checker_names_a_silence_a_stale_page_and_a_broken_one(
    lab: Lab, make_guest: Callable[..., Guest]
) -> None:
    guest = make_guest(memory_mib=128, disk_size_mib=256)
    host = lab.host(guest.host)
    guest.assert_memory_whole(0)

    # A checker that stopped reporting (here: the guest paused) fails the check.
    host.virsh("suspend", guest.name)
    try:
        with pytest.raises(memcheck.MemCheckError, match="stopped reporting"):
            memcheck.fresh(guest.name, memcheck.mark(guest.name), timeout=5)
    finally:
        host.virsh("resume", guest.name)

    report = memcheck.read(guest.name, guest.console())
    assert report.starts == 1 and report.page_addresses, report
    page0, page1 = report.page_addresses
    sock = GuestRecord.dir_of(guest.name) / "gdb.sock"

    with GdbStub(host, guest.name, sock) as stub:  # the guest is paused while attached
        old = stub.read(page0, 4096)
    assert header(old)[:2] == (MAGIC, 0), "the reported address holds no checker page 0"
    old_gen = header(old)[2]
    deadline = time.monotonic() + 60  # the checker rewrites page 0 once a pass (16 MiB at 2 MiB/s)
    while True:
        with GdbStub(host, guest.name, sock) as stub:
            now = stub.read(page0, 4096)
            if header(now)[2] > old_gen:
                stub.write(page0, old)  # page 0 goes back one or more generations, whole and consistent
                broken = bytearray(stub.read(page1, 4096))
                assert header(bytes(broken))[:2] == (MAGIC, 1)
                broken[2048] ^= 0xFF  # one byte of page 1's pattern
                stub.write(page1, bytes(broken))
                break
        assert time.monotonic() < deadline, f"page 0 stayed at generation {old_gen}"
        time.sleep(1)
    want, got = header(now)[2], old_gen

    stale = f"KSA-MEM STALE page=0 want={want} got={got}"
    bad = f"KSA-MEM BAD page=1 want={want} got={want} what=checksum"
    deadline = time.monotonic() + 60
    while not (stale in guest.console() and bad in guest.console()):
        assert time.monotonic() < deadline, f"no {stale!r} and {bad!r}:\n{guest.console()[-2000:]}"
        time.sleep(0.5)
    # What every migrating test goes through fails, and so does `scripts/lab guest memcheck`.
    with pytest.raises(AssertionError, match=f"memory checker: {stale}"):
        guest.wait_for_acks(5)
    proc = lab_cli("guest", "memcheck", guest.name, check=False)
    assert proc.returncode == 1 and stale in proc.stdout, proc.stdout
    assert "KSA-MEM FAILED 2 " in guest.console()  # it counts on, and never says ok again
