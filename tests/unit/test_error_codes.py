"""The error codes are one registry (agent.errors.Code), each with its meaning, all in the OpenAPI document:
a code used anywhere in agent/ that is not registered fails here."""

from __future__ import annotations

import re
from pathlib import Path

from agent.api.routes import openapi_document
from agent.errors import AgentError, Code

AGENT = Path(__file__).resolve().parents[2] / "agent"


def test_every_code_used_is_registered() -> None:
    used = {
        match
        for path in AGENT.rglob("*.py")
        for match in re.findall(r"[\"'](AGENT\.[A-Z_]+)[\"']", path.read_text())
    }
    assert used, "the scan found no code at all"
    assert used - {c.value for c in Code} == set()


def test_every_code_has_a_meaning_and_the_openapi_lists_them() -> None:
    assert all(code.meaning for code in Code)
    schema = openapi_document()["components"]["schemas"]["ErrorCode"]["properties"]["code"]
    assert set(schema["enum"]) == {c.value for c in Code}
    assert all(c.meaning in schema["description"] for c in Code)


def test_every_error_class_carries_a_registered_code() -> None:
    classes = [AgentError, *_subclasses(AgentError)]
    assert len(classes) > 10
    assert all(isinstance(cls.code, Code) for cls in classes), [
        c for c in classes if not isinstance(c.code, Code)
    ]


def test_a_code_is_known_by_its_value_only_when_registered() -> None:
    assert Code.known("AGENT.TIMEOUT") is Code.TIMEOUT
    assert Code.known("AGENT.FROM_A_NEWER_AGENT") is None
    assert Code.known(None) is None


def _subclasses(cls: type[AgentError]) -> list[type[AgentError]]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]
