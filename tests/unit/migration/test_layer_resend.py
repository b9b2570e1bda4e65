"""A layer whose destination export could not be reached is sent again while the link may come back, to
the same export, and verified once; other failures, and a link down too long, end the send."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent.migration.peer import layers
from agent.transfer.send import SendResult, TransferFailed, TransferInterrupted

LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


class Peer:
    def __init__(self) -> None:
        self.opened = 0
        self.finished: list[dict[str, Any]] = []

    async def open_layer(self, migration_id: str, ref: dict[str, Any]) -> dict[str, Any]:
        self.opened += 1
        return {
            "path": "/dst/base.qcow2",
            "endpoint": {"host": "10.0.0.2", "port": 10809, "export": "e", "psk": None},
        }

    async def finish_layer(self, migration_id: str, ref: dict[str, Any], digest: dict[str, Any]) -> None:
        self.finished.append(digest)


class Digest:
    def to_dict(self) -> dict[str, Any]:
        return {"sha256": "x"}


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    """What each try of ``send_layer_to`` does: raise the given error, or succeed (None)."""
    plan: list[BaseException | None] = []

    async def send(*args: Any, **kwargs: Any) -> SendResult:
        outcome = plan.pop(0)
        if outcome is not None:
            raise outcome
        return SendResult(bytes_total=1, seconds=0.1)

    async def digest(*args: Any, **kwargs: Any) -> Digest:
        return Digest()

    monkeypatch.setattr(layers, "send_layer_to", send)
    monkeypatch.setattr(layers, "layer_digest", digest)
    monkeypatch.setattr(layers, "AGAIN_S", 0.0)
    monkeypatch.setattr(layers.NbdEndpoint, "from_dict", staticmethod(lambda d: d))
    return plan


async def _send(peer: Peer) -> None:
    await layers.send_layer_to_peer(
        peer,
        "m",
        "vda",
        0,
        "/src/base.qcow2",
        "qcow2",
        rate=lambda: None,
        on_progress=lambda d, t: None,
        log=LOG,
    )


async def test_an_unreachable_export_is_tried_again_and_verified_once(
    sends: list[BaseException | None],
) -> None:
    peer = Peer()
    sends[:] = [TransferInterrupted("cannot open the destination export"), None]
    await _send(peer)
    assert not sends and peer.opened == 1 and peer.finished == [{"sha256": "x"}]


async def test_other_failures_and_a_long_outage_end_the_send(
    sends: list[BaseException | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    sends[:] = [TransferFailed("layer is open for writing by another process")]
    with pytest.raises(TransferFailed):
        await _send(Peer())
    monkeypatch.setattr(layers, "LINK_OUTAGE_S", -1.0)
    sends[:] = [TransferInterrupted("cannot open the destination export"), None]
    peer = Peer()
    with pytest.raises(TransferInterrupted):
        await _send(peer)
    assert peer.finished == []
