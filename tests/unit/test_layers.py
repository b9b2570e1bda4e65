"""The import rule: agent/'s layers import one way only (docs/architecture.md).

    base (errors, config, security, pki, systemd, units)
      <- virt, storage, transfer, client
      <- migration <- tasks <- report, metrics <- api <- zstack, cli

A module may import its own package and any layer below it, never one above: a lower layer that needed
an upper one would hide a cycle (the first version had one behind a late import in api/app.py). The check
reads every import statement of every module with ``ast``, the late ones inside functions included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client.models import FINAL_STATES
from agent.migration.states import TaskState

AGENT = Path(__file__).resolve().parents[2] / "agent"

RANK = {
    "__init__": 0,
    "errors": 0,
    "config": 0,
    "security": 0,
    "pki": 0,
    "systemd": 0,
    "units": 0,
    "virt": 1,
    "storage": 1,
    "transfer": 1,
    "client": 1,
    "migration": 2,
    "tasks": 3,
    "report": 4,
    "evacuation": 4,
    "metrics": 4,
    "api": 5,
    "zstack": 6,
    "cli": 6,
    "__main__": 7,
}


def imports(path: Path, *, with_names: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every absolute import of the module, the late ones inside functions included;
    ``with_names``: ``from a.b import c`` gives ``a.b.c`` as well (``c`` may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            if with_names:
                yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)


def upward_imports(root: Path) -> list[str]:
    """Every ``import agent.X`` / ``from agent.X import`` that points from a lower layer to a higher one."""
    found = []
    for path in sorted(root.rglob("*.py")):
        layer = path.relative_to(root).parts[0].removesuffix(".py")
        if layer not in RANK:
            found.append(f"{path}: {layer} is in no layer (add it to RANK and docs/architecture.md)")
            continue
        for line, name in imports(path):
            parts = name.split(".")
            if parts[0] != "agent" or len(parts) < 2 or parts[1] == layer:
                continue
            if RANK.get(parts[1], 99) > RANK[layer]:
                found.append(f"{path}:{line}: {layer} imports {name}")
    return found


#: agent/migration's engines: each moves storage its own way and none builds on another's insides; what
#: they share lives beside them (convergence, mirrors, peer, and migration's own modules).
ENGINES = ("samehost", "crosshost", "incoming", "offline")


def engine_crossings(root: Path) -> list[str]:
    """Every import from one engine package of agent/migration into another."""
    found = []
    for engine in ENGINES:
        for path in sorted((root / "migration" / engine).rglob("*.py")):
            for line, name in imports(path, with_names=True):
                parts = name.split(".")
                crossing = parts[:2] == ["agent", "migration"] and len(parts) > 2 and parts[2] in ENGINES
                if crossing and parts[2] != engine:
                    found.append(f"{path}:{line}: {engine} imports {name}")
    return sorted(set(found))


def test_imports_point_one_way() -> None:
    assert upward_imports(AGENT) == []


def test_engines_do_not_import_each_other() -> None:
    assert engine_crossings(AGENT) == []


def test_the_engine_rule_sees_a_crossing(tmp_path: Path) -> None:
    """Not vacuous: both spellings of a crossing are found, an import of a shared package is not."""
    for engine in ("offline", "crosshost", "samehost"):
        (tmp_path / "migration" / engine).mkdir(parents=True)
    (tmp_path / "migration" / "offline" / "bad.py").write_text(
        "from agent.migration.crosshost.prepare import send_layers\n"
    )
    (tmp_path / "migration" / "samehost" / "bad.py").write_text(
        "def f():\n    from agent.migration import crosshost\n    return crosshost\n"
    )
    (tmp_path / "migration" / "crosshost" / "fine.py").write_text(
        "from agent.migration import convergence\nfrom agent.migration.mirrors import hotdisk\n"
    )
    offline, samehost = tmp_path / "migration" / "offline", tmp_path / "migration" / "samehost"
    assert engine_crossings(tmp_path) == [
        f"{offline / 'bad.py'}:1: offline imports agent.migration.crosshost.prepare",
        f"{offline / 'bad.py'}:1: offline imports agent.migration.crosshost.prepare.send_layers",
        f"{samehost / 'bad.py'}:2: samehost imports agent.migration.crosshost",
    ]


def test_the_rule_sees_an_upward_import(tmp_path: Path) -> None:
    """The check is not vacuous: a deliberate upward import, even a late one inside a function, is found."""
    (tmp_path / "migration").mkdir()
    (tmp_path / "migration" / "bad.py").write_text(
        "def f():\n    from agent.api.app import make_app\n    return make_app\n"
    )
    (tmp_path / "virt").mkdir()
    (tmp_path / "virt" / "fine.py").write_text("from agent.errors import AgentError\n")
    assert upward_imports(tmp_path) == [
        f"{tmp_path / 'migration' / 'bad.py'}:2: migration imports agent.api.app"
    ]


@pytest.mark.parametrize("state", list(TaskState))
def test_the_clients_final_states_are_the_models(state: TaskState) -> None:
    assert (state.value in FINAL_STATES) is state.final
