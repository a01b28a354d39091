"""The update as a state machine: states, events, ONE transition table, a resume table.

Read :data:`TRANSITIONS` top to bottom: it is every move an update can make.
A step runs the side effects of its state and returns an :class:`Event`; the
table gives the next state and, when the update is over, the final status to
report to IoT Jobs (kept in the record, apart from control flow). The record
is persisted *before* each state's side effects run, by state name.

After a restart, :data:`RESUME` maps the persisted state to where to
continue. A state not listed there (an older or newer schema, a corrupt
value) resumes as a rollback, and so does any update that restarted more than
``max_resumes`` times (a restart loop).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    RECEIVED = "received"  # the job is known; nothing done yet
    DOWNLOADING = "downloading"  # the archive is being fetched into staging
    VERIFYING = "verifying"  # signature, manifest hashes, version promised
    INSTALLING = "installing"  # extract into <models>/<name>/<version>/
    ACTIVATING = "activating"  # the agent's hot swap to the new version
    CHECKING = "checking"  # live predictions through the new version
    COMMITTING = "committing"  # the new version becomes the installed one; prune
    ROLLING_BACK = "rolling_back"  # the agent swapped back to the previous version
    CLEANING = "cleaning"  # drop the download and a version that never served
    REPORTING = "reporting"  # the final status goes to IoT Jobs, until acknowledged
    DONE = "done"  # reported; the record moves to the history


class Event(enum.StrEnum):
    OK = "ok"  # the step did what it had to
    FAIL = "fail"  # fatal error, or transient errors past their retry budget
    REJECT = "reject"  # the job does not apply to this device
    CANCEL = "cancel"  # the job was cancelled or removed in the cloud


class Outcome(enum.StrEnum):
    """The final status reported to IoT Jobs (``CANCELED`` is the cloud's, never reported)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"


@dataclass(frozen=True, slots=True)
class Move:
    to: State
    outcome: Outcome | None = None  # set when the move decides the final status


S, E, O = State, Event, Outcome  # noqa: E741 - short names keep the table one move per line

TRANSITIONS: dict[tuple[State, Event], Move] = {
    (S.RECEIVED, E.OK): Move(S.DOWNLOADING),
    (S.RECEIVED, E.REJECT): Move(S.REPORTING, O.REJECTED),
    (S.RECEIVED, E.FAIL): Move(S.REPORTING, O.FAILED),
    (S.RECEIVED, E.CANCEL): Move(S.DONE, O.CANCELED),
    (S.DOWNLOADING, E.OK): Move(S.VERIFYING),
    (S.DOWNLOADING, E.FAIL): Move(S.CLEANING, O.FAILED),
    (S.DOWNLOADING, E.CANCEL): Move(S.CLEANING, O.CANCELED),
    (S.VERIFYING, E.OK): Move(S.INSTALLING),
    (S.VERIFYING, E.FAIL): Move(S.CLEANING, O.FAILED),
    (S.VERIFYING, E.REJECT): Move(S.CLEANING, O.REJECTED),
    (S.VERIFYING, E.CANCEL): Move(S.CLEANING, O.CANCELED),
    (S.INSTALLING, E.OK): Move(S.ACTIVATING),
    (S.INSTALLING, E.FAIL): Move(S.CLEANING, O.FAILED),
    (S.INSTALLING, E.CANCEL): Move(S.CLEANING, O.CANCELED),
    (S.ACTIVATING, E.OK): Move(S.CHECKING),
    (S.ACTIVATING, E.FAIL): Move(S.ROLLING_BACK, O.FAILED),
    (S.CHECKING, E.OK): Move(S.COMMITTING),
    (S.CHECKING, E.FAIL): Move(S.ROLLING_BACK, O.FAILED),
    (S.COMMITTING, E.OK): Move(S.REPORTING, O.SUCCEEDED),
    (S.COMMITTING, E.FAIL): Move(S.ROLLING_BACK, O.FAILED),
    (S.ROLLING_BACK, E.OK): Move(S.CLEANING),
    (S.ROLLING_BACK, E.FAIL): Move(S.CLEANING),  # outcome stays FAILED; the reason says so
    (S.CLEANING, E.OK): Move(S.REPORTING),
    (S.REPORTING, E.OK): Move(S.DONE),
}

# persisted state -> where a restarted updater continues
RESUME: dict[State, State] = {
    S.RECEIVED: S.RECEIVED,  # nothing was done: decide again
    S.DOWNLOADING: S.DOWNLOADING,  # the partial download resumes (Range)
    S.VERIFYING: S.VERIFYING,  # verification has no side effect
    S.INSTALLING: S.INSTALLING,  # idempotent: a complete directory is re-verified
    S.ACTIVATING: S.ROLLING_BACK,  # the swap may or may not have happened: go back
    S.CHECKING: S.ROLLING_BACK,  # the check did not finish: the new version is unproven
    S.COMMITTING: S.COMMITTING,  # idempotent
    S.ROLLING_BACK: S.ROLLING_BACK,  # idempotent
    S.CLEANING: S.CLEANING,  # idempotent
    S.REPORTING: S.REPORTING,  # re-send; "already terminal with our status" is success
    S.DONE: S.DONE,
}

# states from which a restart loop is broken by rolling back (later ones finish)
_BEFORE_ROLLBACK = frozenset(
    {S.RECEIVED, S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.ACTIVATING, S.CHECKING}
)


class TransitionError(RuntimeError):
    """A step returned an event the table has no move for (a bug, not a field condition)."""


def next_move(state: State, event: Event) -> Move:
    move = TRANSITIONS.get((state, event))
    if move is None:
        raise TransitionError(f"no transition from {state} on {event}")
    return move


def resume_state(persisted: str, *, resumes: int, max_resumes: int) -> State:
    """Where to continue after a restart that found ``persisted`` in the record.

    Unknown names resume as a rollback; so does an update that has restarted
    more than ``max_resumes`` times before it got past its checks.
    """
    try:
        state = State(persisted)
    except ValueError:
        return S.ROLLING_BACK
    target = RESUME.get(state, S.ROLLING_BACK)
    if resumes > max_resumes and target in _BEFORE_ROLLBACK:
        return S.ROLLING_BACK
    return target
