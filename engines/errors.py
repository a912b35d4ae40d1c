"""Errors an engine raises; the server turns each into one gRPC status (server/errors.py).

Engines never import grpc: these classes carry the meaning, the server picks the code.
"""


class EngineError(Exception):
    """Base class: anything an engine raises on purpose."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked (bad prompt or sampling values).

    ``field``: the neutral name of the field at fault (``prompt``, ``max_new_tokens``, ...), or
    None; each front end names it in its own words (HTTP's ``max_tokens``).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class QueueFull(EngineError):
    """Every slot is busy and the waiting queue is at its bound (in requests, or in estimated wait).

    ``retry_after_s``: about when a slot should be free, or None where nothing is measured yet;
    each front end says it in its own words (HTTP's Retry-After, gRPC's retry pushback).
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(EngineError):
    """The engine is not loaded yet, is shutting down, or has failed for good."""


class EngineOutOfMemory(EngineError):
    """The device ran out of memory for this request; the engine itself keeps serving."""


class Unsupported(EngineError):
    """This engine does not offer the operation at all."""


class ModelRefused(EngineError):
    """The model cannot be loaded as configured: code of its own not trusted, or too big for the memory free.

    Raised before anything loads; the message says what to change.
    """
