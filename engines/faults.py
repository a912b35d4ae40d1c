"""Test-only fault injection, kept off the live request path.

Failures inside an engine step (a bug, the device out of memory, a dead device) cannot be
provoked on demand with a healthy model, yet the server's answer to each must be tested
against a real process.  With

    YAYI_TEST_FAULTS="error:BOOM@2,oom:NO-MEMORY,fatal:KILL-ENGINE" yayi-serve --allow-test-faults ...

a request whose prompt contains ``BOOM`` fails inside its decode step 2 (0-based; default
1, so one token has already been streamed), and requests without a marker run as usual:
a test can fail one request while others share the engine.  The server refuses to start
with the variable set unless ``--allow-test-faults`` is given too, so a stray variable in
production cannot hand every client a switch that disables the engine.

Nothing here runs unless faults are configured: ``injecting(cls, faults)`` (called by the
registry only then) puts the engine's ``FaultInjection`` mixin in front of its class.  The
engine decides how a kind shows itself, because only it knows its device:

- ``error``: an ordinary exception, as a bug would raise (the server answers INTERNAL);
- ``oom``: the device's out-of-memory error (RESOURCE_EXHAUSTED, cache freed);
- ``fatal``: an error the device cannot recover from (the engine reports itself unhealthy).

Markers are matched in the prompt text, so no field of the wire contract exists for tests.
The default mixin below raises ``error`` faults between outputs, for engines whose steps
run out of reach (vLLM's run in another process).
"""

from __future__ import annotations

import contextlib
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
            raise ValueError(
                f"{ENV_VAR}: bad entry {entry!r}; write KIND:MARKER[@STEP], KIND one of {', '.join(KINDS)}"
            )
        faults.append(Fault(kind, marker, int(step) if step else 1))
    return tuple(faults)


def from_environment() -> tuple[Fault, ...]:
    spec = os.environ.get(ENV_VAR)
    return parse(spec) if spec else ()


def match(faults: tuple[Fault, ...], prompt: str) -> Fault | None:
    return next((fault for fault in faults if fault.marker in prompt), None)


class FaultInjection:
    """The default mixin: an ``error`` fault raised once ``step`` tokens have been streamed."""

    test_faults: tuple[Fault, ...] = ()

    def stream_tokens(self, request):
        fault = match(self.test_faults, request.prompt)
        inner = super().stream_tokens(request)
        return inner if fault is None else self._failing(inner, fault)

    async def _failing(self, inner, fault: Fault):
        async with contextlib.aclosing(inner):
            async for output in inner:
                if fault.kind == "error" and output.completion_tokens > fault.step:
                    # Leaving the loop closes the engine's stream, which aborts the request inside it.
                    raise InjectedFault(f"injected engine fault ({fault.marker})")
                yield output


def injecting(engine_class: type, faults: tuple[Fault, ...]) -> type:
    """``engine_class`` with its fault mixin in front, armed with ``faults``."""
    mixin = getattr(engine_class, "FaultInjection", FaultInjection)
    return type(f"FaultInjecting{engine_class.__name__}", (mixin, engine_class), {"test_faults": faults})
