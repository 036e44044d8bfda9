"""Typed, versioned messages: declared msgspec schemas over msgpack, with numeric arrays as raw frames.

An application declares a message type by subclassing :class:`Message` with two class variables::

    class ComputeDose(Message):
        schema = "dose.compute"      # wire name, stable across renames of the class
        version = 1                  # a breaking change is a new class with version = 2
        plan_id: str
        weights: np.ndarray          # travels as a raw frame, dtype/shape in the envelope

Encoding a message gives frames ``[envelope, payload, *array_frames]``. Decoding looks the (schema, version)
of the envelope up in the registry and returns the typed object, or raises a :class:`~m2m.bus.errors.DecodeError`
subclass. Fields unknown to this process (sent by a newer minor revision) are ignored.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

import msgspec
import numpy as np

from m2m.bus.errors import DecodeError, SchemaConflict, SchemaVersionError, UnknownSchema

MAX_ARRAY_DIMS = 32
_ARRAY_KINDS = frozenset("biufc")  # bool, ints, unsigned, floats, complex; never object dtypes


class ArraySpec(msgspec.Struct, array_like=True, frozen=True):
    """dtype (numpy ``dtype.str``, e.g. ``<f8``) and shape of one raw array frame."""

    dtype: str
    shape: tuple[int, ...]


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What every message carries besides its payload.

    ``id``: unique message id. ``corr``: the request id a reply or error answers. ``sender``: the agent's name.
    ``incarnation``: changes on every start/swap of the sender process. ``seq``: per-sender sequence number.
    ``ts``: send time (epoch s). ``deadline``: epoch s after which nobody should work on it (0 = none).
    ``schema``/``version``: the payload's declared type. ``kind``: request/reply/event/error.
    ``route``: service (requests, replies) or topic (events). ``session``: the session the recorder indexes.
    ``idem``: idempotency key of a request (retries keep it; replies copy it). ``arrays``: specs of the
    raw frames that follow the payload, in order.
    """

    id: str
    schema: str
    version: int
    sender: str = ""
    incarnation: str = ""
    seq: int = 0
    ts: float = 0.0
    kind: str = "event"
    route: str = ""
    corr: str = ""
    deadline: float = 0.0
    session: str = ""
    idem: str = ""
    arrays: list[ArraySpec] = []


class Message(msgspec.Struct, kw_only=True):
    """Base class of every message type; subclasses register themselves under (schema, version)."""

    schema: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("schema"):
            register(cls)


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[tuple[str, int], type[Message]] = {}
_DECODERS: dict[type[Message], msgspec.msgpack.Decoder[Any]] = {}
_lock = threading.Lock()


def register(cls: type[Message]) -> type[Message]:
    """Register a message class (done automatically by subclassing :class:`Message`)."""
    if not isinstance(cls.schema, str) or not cls.schema or not isinstance(cls.version, int) or cls.version < 1:
        raise SchemaConflict(f"{cls.__qualname__}: schema must be a non-empty str and version an int >= 1")
    key = (cls.schema, cls.version)
    with _lock:
        old = _REGISTRY.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise SchemaConflict(f"{key} is already declared by {old.__module__}.{old.__qualname__}")
        _REGISTRY[key] = cls
        _DECODERS.pop(cls, None)
    return cls


def lookup(schema: str, version: int) -> type[Message]:
    """The class for (schema, version), or :class:`UnknownSchema` / :class:`SchemaVersionError`."""
    cls = _REGISTRY.get((schema, version))
    if cls is not None:
        return cls
    versions = sorted(v for s, v in _REGISTRY if s == schema)
    if versions:
        raise SchemaVersionError(f"schema {schema!r} version {version} unknown here (known: {versions})")
    raise UnknownSchema(f"schema {schema!r} is not registered")


def registered() -> dict[tuple[str, int], type[Message]]:
    return dict(_REGISTRY)


# ---------------------------------------------------------------------------------------------- array frames
class _Frames(threading.local):
    out: list[np.ndarray] | None = None
    inp: Sequence[bytes] = ()
    specs: Sequence[ArraySpec] = ()


_ctx = _Frames()


# msgspec's hook protocol: a hook raises NotImplementedError for a type it does not handle, and msgspec turns it
# into its own typed EncodeError/ValidationError (which the codec maps to BusError).
def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) and _ctx.out is not None:
        if obj.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot travel on the bus")
        _ctx.out.append(obj)
        return len(_ctx.out) - 1
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is np.ndarray:
        if type(obj) is not int or not 0 <= obj < len(_ctx.specs) or obj >= len(_ctx.inp):
            raise ValueError(f"array reference {obj!r} does not name an array frame")
        return _array_from_frame(_ctx.specs[obj], _ctx.inp[obj])
    raise NotImplementedError(f"cannot decode {typ}")


def _array_from_frame(spec: ArraySpec, frame: bytes) -> np.ndarray:
    """The read-only array a frame holds; raises :class:`DecodeError` (and nothing else) for any spec and bytes:
    numpy answers hostile dtype strings with whatever it likes (``SyntaxError`` for ``","``, ``TypeError``,
    ``ValueError`` ...), so every failure is wrapped here, at the decode boundary."""
    try:
        return _checked_array(spec, frame)
    except DecodeError:
        raise
    except Exception as exc:  # hostile input: numpy's errors are not a closed set
        raise DecodeError(f"bad array frame ({spec.dtype!r}, {spec.shape!r}): {type(exc).__name__}: {exc}") from None


def _checked_array(spec: ArraySpec, frame: bytes) -> np.ndarray:
    if len(spec.shape) > MAX_ARRAY_DIMS or any(d < 0 for d in spec.shape):
        raise DecodeError(f"bad array shape {spec.shape}")
    dtype = np.dtype(spec.dtype)
    if dtype.kind not in _ARRAY_KINDS or dtype.subdtype is not None or dtype.fields is not None:
        raise DecodeError(f"array dtype {spec.dtype!r} not allowed")
    count = 1
    for d in spec.shape:
        count *= d
    if count * dtype.itemsize != len(frame):
        raise DecodeError(f"array frame of {len(frame)} bytes does not hold {spec.shape} of {dtype}")
    return np.frombuffer(frame, dtype=dtype).reshape(spec.shape)  # read-only, zero copy


# ---------------------------------------------------------------------------------------------- codec
_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_plain_encoder = msgspec.msgpack.Encoder()
_env_decoder = msgspec.msgpack.Decoder(Envelope)

INCARNATION = uuid.uuid4().hex[:16]
"""This process's incarnation: new at every start, so a swapped-in agent is told apart from its predecessor."""


def new_id() -> str:
    """A unique, unguessable id: 128 random bits as 32 hex digits (``os.urandom``; a third of ``uuid4().hex``'s
    cost, which showed in every request)."""
    return os.urandom(16).hex()


def encode(msg: Message, env: Envelope) -> list[bytes | memoryview]:
    """Frames ``[envelope, payload, *arrays]``; fills ``env.schema``, ``env.version`` and ``env.arrays``."""
    if not isinstance(msg, Message) or not type(msg).schema:
        raise TypeError(f"{type(msg).__name__} is not a registered Message")
    arrays: list[np.ndarray] = []
    _ctx.out = arrays
    try:
        payload = _encoder.encode(msg)
    finally:
        _ctx.out = None
    env.schema = type(msg).schema
    env.version = type(msg).version
    frames: list[bytes | memoryview] = [b"", payload]
    if arrays:
        env.arrays = [ArraySpec(a.dtype.str, tuple(a.shape)) for a in arrays]
        for a in arrays:
            frames.append(np.ascontiguousarray(a).data.cast("B"))
    frames[0] = _plain_encoder.encode(env)
    return frames


def decode_envelope(data: bytes) -> Envelope:
    """The envelope in ``data``; raises :class:`DecodeError` and nothing else, whatever the bytes."""
    try:
        env = _env_decoder.decode(data)
    except Exception as exc:  # the decode boundary: any failure on hostile bytes is a DecodeError
        raise DecodeError(f"bad envelope: {type(exc).__name__}: {exc}") from None
    return env


def decode_payload(env: Envelope, payload: bytes, arrays: Sequence[bytes] = ()) -> Message:
    """Decode the payload declared by ``env``; raises a :class:`DecodeError` subclass, never anything else."""
    cls = lookup(env.schema, env.version)
    if len(arrays) != len(env.arrays):
        raise DecodeError(f"envelope declares {len(env.arrays)} array frames, {len(arrays)} arrived")
    _ctx.inp, _ctx.specs = arrays, env.arrays
    try:
        decoder = _DECODERS.get(cls)
        if decoder is None:  # built lazily: msgspec cannot build one inside __init_subclass__
            decoder = _DECODERS[cls] = msgspec.msgpack.Decoder(cls, dec_hook=_dec_hook)
        msg: Message = decoder.decode(payload)
        return msg
    except DecodeError:  # raised by the array hook
        raise
    except Exception as exc:  # the decode boundary (KeyboardInterrupt/SystemExit pass through)
        raise DecodeError(f"bad {env.schema} v{env.version} payload: {type(exc).__name__}: {exc}") from None
    finally:
        _ctx.inp, _ctx.specs = (), ()


def decode(frames: Sequence[bytes]) -> tuple[Envelope, Message]:
    """``[envelope, payload, *arrays]`` → (envelope, typed message)."""
    if len(frames) < 2:
        raise DecodeError(f"a message needs at least 2 frames, got {len(frames)}")
    env = decode_envelope(frames[0])
    return env, decode_payload(env, frames[1], frames[2:])


def frames_size(frames: Sequence[bytes | memoryview]) -> int:
    """Bytes in ``frames`` (``nbytes`` of a memoryview, whatever its format)."""
    n = 0
    for f in frames:
        n += f.nbytes if type(f) is memoryview else len(f)
    return n


class ErrorReply(Message):
    """The payload of an error crossing a process; ``code`` maps back to a :class:`BusError` class."""

    schema = "bus.error"
    version = 1
    code: str
    message: str = ""
    retryable: bool = False
