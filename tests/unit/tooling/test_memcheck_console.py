"""How the host reads the guest's memory checker from its console (labkit/memcheck.py): inconsistencies
count anywhere, even on a line cut by kernel output; `ok` lines only whole and after the mark; a console
that was rolled over is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit import guestdir, hostsetup, memcheck
from labkit.layout import HOSTS
from labkit.sysutil import LabError

START = "KSA-MEM start pages=4096 mib_s=2 page0=0x6036000 page1=0x6028000\n"


def test_ok_lines_after_the_mark_are_counted_and_the_last_one_gives_the_pages_checked() -> None:
    before = START + "KSA-MEM ok 1040\n"
    text = before + "KSA-ACK vda 7 x\nKSA-MEM ok 2064\nKSA-MEM ok 3104\n"
    report = memcheck.read("g", text, since=len(before))
    assert (report.oks, report.checked, report.starts, report.problems) == (2, 3104, 1, [])
    assert report.page_addresses == (0x6036000, 0x6028000)
    assert memcheck.read("g", text, since=len(text)).oks == 0


def test_a_line_cut_by_the_mark_or_by_kernel_output_is_no_ok() -> None:
    text = START + "KSA-MEM ok 1040\n"
    assert memcheck.read("g", text, since=len(START) + 3).oks == 0  # the mark fell inside the line
    assert memcheck.read("g", START + "[  12.3] KSA-MEM ok 1040\n", since=len(START)).oks == 0


def test_stale_and_bad_lines_count_anywhere_even_before_the_mark_and_cut() -> None:
    text = (
        START
        + "KSA-MEM STALE page=0 want=5 got=4\n"
        + "[ 3.1] tsc: KSA-MEM BAD page=1 want=5 got=5 what=checksum\n"
        + "KSA-MEM FAILED 2 9000\n"
    )
    report = memcheck.read("g", text, since=len(text))
    assert report.problems == [
        "KSA-MEM STALE page=0 want=5 got=4",
        "KSA-MEM BAD page=1 want=5 got=5 what=checksum",
        "KSA-MEM FAILED 2 9000",
    ]
    assert report.describe().startswith("g: memory checker: KSA-MEM STALE page=0 want=5 got=4 (and 2 more)")


def test_a_rolled_over_console_is_refused_not_read_as_a_silent_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """virtlogd rolls a console over at 2 MiB (console.log -> console.log.0, a new console.log): reading
    console.log alone after a mark showed nothing new, as if the guest had gone silent (issue 21)."""
    monkeypatch.setattr(guestdir, "GUESTS_DIR", tmp_path)
    monkeypatch.setattr(guestdir.GuestRecord, "dir_of", staticmethod(lambda name: tmp_path / name))
    (tmp_path / "g").mkdir()
    console = tmp_path / "g" / "console.log"
    console.write_text(START + "KSA-MEM ok 1040\n")
    assert memcheck.console_text("g").endswith("KSA-MEM ok 1040\n")
    (tmp_path / "g" / "console.log.0").write_text("older\n")
    with pytest.raises(LabError, match=r"rolled over \(console.log.0 beside console.log\)"):
        memcheck.console_text("g")
    with pytest.raises(LabError, match="stdio_handler"):
        guestdir.read_acks("g")


def test_the_lab_lets_qemu_write_the_console_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSA_LAB_STDIO_HANDLER", raising=False)
    assert '\nstdio_handler = "file"\n' in hostsetup.qemu_conf(HOSTS[0])
    monkeypatch.setenv("KSA_LAB_STDIO_HANDLER", "logd")
    assert '\nstdio_handler = "logd"\n' in hostsetup.qemu_conf(HOSTS[0])
