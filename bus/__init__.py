"""A small, dependable ZeroMQ messaging layer. Knows nothing of radiotherapy.

Public API (imported lazily so that ``m2m --help`` stays fast)::

    from m2m.bus import BusClient, Message, RequestContext, BusError
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BusClient": "m2m.bus.client",
    "BusConfig": "m2m.bus.client",
    "RequestContext": "m2m.bus.worker",
    "Worker": "m2m.bus.worker",
    "Subscription": "m2m.bus.clone",
    "Delivery": "m2m.bus.clone",
    "Message": "m2m.bus.messages",
    "Envelope": "m2m.bus.messages",
    "ErrorReply": "m2m.bus.messages",
    "register": "m2m.bus.messages",
    "encode": "m2m.bus.messages",
    "decode": "m2m.bus.messages",
    "Broker": "m2m.bus.broker",
    "BrokerConfig": "m2m.bus.broker",
    "ClientKeys": "m2m.bus.security",
    "ServerKeys": "m2m.bus.security",
    "BusError": "m2m.bus.errors",
    "DecodeError": "m2m.bus.errors",
    "UnknownSchema": "m2m.bus.errors",
    "SchemaVersionError": "m2m.bus.errors",
    "SchemaConflict": "m2m.bus.errors",
    "MessageTooLarge": "m2m.bus.errors",
    "ProtocolError": "m2m.bus.errors",
    "RequestTimeout": "m2m.bus.errors",
    "ServiceUnavailable": "m2m.bus.errors",
    "WorkerLost": "m2m.bus.errors",
    "UnhandledMessage": "m2m.bus.errors",
    "RemoteError": "m2m.bus.errors",
    "SecurityError": "m2m.bus.errors",
    "BusClosed": "m2m.bus.errors",
    "BrokerUnavailable": "m2m.bus.errors",
    "WorkerBusy": "m2m.bus.errors",
    "TooManyRequests": "m2m.bus.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'm2m.bus' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
