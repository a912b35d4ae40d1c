"""Test-only fault injection: inert unless the ``YAYI_TEST_FAULTS`` variable is set.

Failures inside an engine step (a bug, the device out of memory, a dead device) cannot be
provoked on demand with a healthy model, yet the server's answer to each must be tested
against a real process.  With

    YAYI_TEST_FAULTS="error:BOOM@2,oom:NO-MEMORY,fatal:KILL-ENGINE"

a request whose prompt contains ``BOOM`` fails inside its decode step 2 (0-based; default
1, so one token has already been streamed), and requests without a marker run as usual:
a test can fail one request while others share the engine.  The engine decides how a kind
shows itself, because only it knows its device:

- ``error``: an ordinary exception, as a bug would raise (the server answers INTERNAL);
- ``oom``: the device's out-of-memory error (RESOURCE_EXHAUSTED, cache freed);
- ``fatal``: an error the device cannot recover from (the engine reports itself unhealthy).

Markers are matched in the prompt text, so no field of the wire contract exists for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_VAR = "YAYI_TEST_FAULTS"
KINDS = ("error", "oom", "fatal")


class InjectedFault(RuntimeError):
    """Stands in for a bug inside an engine step."""


@dataclass(frozen=True)
class Fault:
    kind: str
    marker: str
    step: int = 1


def parse(spec: str) -> tuple[Fault, ...]:
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        kind, sep, rest = entry.partition(":")
        marker, _, step = rest.partition("@")
        if kind not in KINDS or not sep or not marker:
            raise ValueError(f"{ENV_VAR}: bad entry {entry!r}; write KIND:MARKER[@STEP], KIND one of {', '.join(KINDS)}")
        faults.append(Fault(kind, marker, int(step) if step else 1))
    return tuple(faults)


def configured() -> tuple[Fault, ...]:
    """The faults the environment asks for; read once per request so tests can set it per process."""
    spec = os.environ.get(ENV_VAR)
    return parse(spec) if spec else ()


def for_prompt(prompt: str) -> Fault | None:
    for fault in configured():
        if fault.marker in prompt:
            return fault
    return None
