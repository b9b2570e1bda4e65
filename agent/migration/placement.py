"""Where the VM is once a move's job is over, and what that means for the move: the rule every engine that
can lose track of its VM follows (a restart, a cut link, a libvirt job that ended without a word). The
runner's verdict follows from it: never a failure for a VM that runs on the destination, never a cleanup
while unsure."""

from __future__ import annotations

import enum

from agent.virt.states import DomainState


class Place(enum.Enum):
    """Where the VM is once a move's job is over, as the hypervisors say."""

    SOURCE = "source"
    DESTINATION = "destination"
    UNKNOWN = "unknown"


class Settlement(enum.Enum):
    """What an engine must do once it knows where the VM is (``settle``)."""

    COMMIT = "commit"  # the VM runs from its new volumes: confirm, report them; the task succeeds
    ROLL_BACK = "roll back"  # it runs from its source volumes: remove what was made; the task fails
    KEEP_ALL = "keep all"  # nobody can tell: remove nothing anywhere; AGENT.VM_LOCATION_UNKNOWN


def place_of(source_state: DomainState | None, destination_state: DomainState | None) -> Place:
    """The rule, from each side's word on the VM (``running``, ``paused``, ``shutoff``, ``undefined``, or
    None when that side did not answer). An incoming migration shows as a *paused* domain on the destination
    until it switches over: only a running domain there, or one defined there while the source has none,
    means it arrived."""
    if destination_state == DomainState.RUNNING:
        return Place.DESTINATION
    if source_state not in (None, DomainState.UNDEFINED):
        return Place.SOURCE
    if source_state == DomainState.UNDEFINED and destination_state not in (None, DomainState.UNDEFINED):
        return Place.DESTINATION
    return Place.UNKNOWN


def settle(place: Place) -> Settlement:
    """The ending follows where the VM is, whatever brought the job to its end (error, cancel, deadline,
    restart): never a failure for a VM that runs on the destination, never a cleanup while unsure."""
    return {
        Place.DESTINATION: Settlement.COMMIT,
        Place.SOURCE: Settlement.ROLL_BACK,
        Place.UNKNOWN: Settlement.KEEP_ALL,
    }[place]
