"""Running the CLI in-process for tests: its exit code and what it printed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.cli import main


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """``kvm-storage-agent ARGV``; argparse's own exits (usage errors, --help) count like returns."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return Run(int(code), captured.out, captured.err)
