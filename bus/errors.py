"""Typed errors of the bus. Every error the bus raises or sends across a process is a :class:`BusError`.

Errors that cross a process travel as an :class:`~m2m.bus.messages.ErrorReply` carrying ``code``; the receiving
side maps the code back to the class through :func:`error_for_code`.
"""

from __future__ import annotations

from typing import ClassVar


class BusError(Exception):
    """Root of every bus error."""

    code: ClassVar[str] = "bus_error"
    retryable: ClassVar[bool] = False
    remembered: ClassVar[bool] = True
    """Whether a non-retryable error reply is kept in the reply caches (broker and worker) for its idempotency key,
    like an answer. False for cheap refusals of malformed input: a flood of them (fuzz) must not evict real
    answers from the bounded caches."""


class DecodeError(BusError):
    """Bytes that are not a valid message (truncated, wrong types, hostile input, bad array frames)."""

    code = "decode_error"
    remembered = False


class UnknownSchema(DecodeError):
    """The schema name is not registered in this process."""

    code = "unknown_schema"


class SchemaVersionError(DecodeError):
    """The schema is known but not at this version (a breaking change is a new version)."""

    code = "schema_version"


class SchemaConflict(BusError):
    """Two different classes declared the same (schema, version)."""

    code = "schema_conflict"


class MessageTooLarge(BusError):
    """A message is over the bus's maximum message size."""

    code = "message_too_large"
    remembered = False


class ProtocolError(BusError):
    """Frames that do not follow the bus protocol (wrong header, command or frame count)."""

    code = "protocol_error"
    remembered = False


class RequestTimeout(BusError):
    """No reply arrived before the request's deadline."""

    code = "deadline_exceeded"
    retryable = True


class ServiceUnavailable(BusError):
    """No live worker served the service before the request's deadline."""

    code = "service_unavailable"
    retryable = True


class WorkerLost(BusError):
    """The worker holding the request died (missed heartbeats); the request may be retried."""

    code = "worker_lost"
    retryable = True


class BrokerUnavailable(BusError):
    """The client lost its broker: no answer to ``liveness`` heartbeats in a row (``heartbeat × liveness`` s),
    or none at start. Pending requests fail with it; a broker that comes back within that window is re-joined
    transparently (requests are resent with their idempotency keys)."""

    code = "broker_unavailable"
    retryable = True


class WorkerBusy(BusError):
    """A worker got a request beyond its capacity (the broker requeues it; a client never sees this)."""

    code = "worker_busy"
    retryable = True


class TooManyRequests(BusError):
    """The client has more requests pending at the broker than the broker allows per client."""

    code = "too_many_requests"
    retryable = True


class UnhandledMessage(BusError):
    """The service has no handler for this message type."""

    code = "unhandled_message"
    remembered = False


class RemoteError(BusError):
    """The remote handler raised; ``message`` holds its exception type and text."""

    code = "remote_error"


class BadRequest(BusError):
    """A well-formed request whose content the handler refuses (e.g. it names an input that cannot be read); the
    message says what is wrong. Not retryable: the same request fails again. The worker keeps serving."""

    code = "bad_request"


class SecurityError(BusError):
    """A configuration that would expose the bus without authentication."""

    code = "security_error"


class BusClosed(BusError):
    """The client was closed."""

    code = "closed"


_BY_CODE: dict[str, type[BusError]] = {}


def _collect(cls: type[BusError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(BusError)


def error_for_code(code: str) -> type[BusError]:
    """The error class for a wire code; unknown codes map to :class:`RemoteError`."""
    return _BY_CODE.get(code, RemoteError)
